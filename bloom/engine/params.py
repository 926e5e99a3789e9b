"""One sequence's generation settings (`GenerationParams`), as `model.generate`'s arguments for one row."""

from __future__ import annotations

from dataclasses import dataclass

from ..generation import check_max_new_tokens
from .constraints import Constraint


@dataclass(frozen=True)
class GenerationParams:
    """One sequence's settings, as `model.generate`'s arguments for one row.

    top_k 0 and top_p 1 disable them; seed None samples from torch's global generator; eos_token_id None
    means the model config's, an empty tuple none; stop_strings need the engine's tokenizer.
    logprobs: record each new token's log-probability and the `logprobs` most likely tokens' (0: the
    chosen token's only) in `Sequence.logprobs`; prompt_logprobs: the same for every prompt token after
    the first, in `Sequence.prompt_logprobs` (with max_new_tokens 0 the prompt is still run, to score it).
    None computes nothing.

    OpenAI's settings, applied to the logits before the greedy choice or sampling (and before the
    repetition penalty, temperature, top-k and top-p); logprobs stay those of the model's own logits:
    logit_bias: token id → a bias in [-100, 100] added to that token's logit (100 all but forces it,
    -100 all but bans it); frequency_penalty, presence_penalty in [-2, 2]: each token's logit is lowered
    by count · frequency_penalty + (count > 0) · presence_penalty, count = how often it is among the
    tokens generated so far (the prompt is not counted; negative values encourage repeats);
    min_tokens: no eos and no stop string ends the sequence before it has generated this many tokens
    (the eos logits are -inf until then), at most max_new_tokens.

    constraint: the output must match a choice, a regex, a JSON Schema or a Lark grammar
    (`bloom.engine.constraints.Constraint`; a one-key dict such as {"json_schema": {...}} is taken too);
    tokens outside it are -inf before the choice, after logit_bias and the penalties. The sequence ends with
    "stop" once the structure is complete and nothing may follow; if it ends before (max_new_tokens, a
    stop string) `Sequence.incomplete` is set. Compiled at submit: a spec that cannot be is a ValueError."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    eos_token_id: int | tuple[int, ...] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_tokens: int = 0
    adapter: str | None = None  # a LoRA adapter of the engine's AdapterBank (bloom.lora); None: the base model
    constraint: Constraint | None = None

    def __post_init__(self):
        if isinstance(self.constraint, dict):  # frozen: set through object
            object.__setattr__(self, "constraint", Constraint.of(self.constraint))

    @property
    def adjusts_logits(self) -> bool:
        """Whether any of OpenAI's logit settings is on (the sampler then works on a copy of the logits)."""
        return bool(self.logit_bias) or self.frequency_penalty != 0 or self.presence_penalty != 0 or self.min_tokens > 0

    @property
    def counts_tokens(self) -> bool:
        """Whether the sequence must count its generated tokens (for the frequency or presence penalty)."""
        return self.frequency_penalty != 0 or self.presence_penalty != 0


def check_params(params: GenerationParams, vocab_size: int) -> None:
    """Raise ValueError naming the first setting of `params` out of its bounds (the sampling settings are
    checked where they are built, `bloom.generation.sampling_params`)."""
    check_max_new_tokens(params.max_new_tokens)
    for name in ("logprobs", "prompt_logprobs"):
        n = getattr(params, name)
        if n is not None and not (isinstance(n, int) and 0 <= n <= vocab_size):
            raise ValueError(f"{name} must be None or an integer in [0, {vocab_size}], got {n!r}")
    for name in ("frequency_penalty", "presence_penalty"):
        x = getattr(params, name)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not -2 <= x <= 2:
            raise ValueError(f"{name} must be a number in [-2, 2], got {x!r}")
    m = params.min_tokens
    if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= params.max_new_tokens:
        raise ValueError(f"min_tokens must be an integer in [0, max_new_tokens={params.max_new_tokens}], got {m!r}")
    c = params.constraint
    if c is not None and not isinstance(c, Constraint):
        raise ValueError(f"constraint must be a Constraint or None, got {type(c).__name__}")
    if c is not None and m:  # min_tokens holds eos back, the grammar may allow nothing else
        raise ValueError("min_tokens cannot be combined with a constraint: the constraint decides where the output ends")
    bias = params.logit_bias
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise ValueError(f"logit_bias must be a mapping of token id to bias, got {type(bias).__name__}")
    for t, b in bias.items():
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"logit_bias token ids must be integers in [0, {vocab_size}), got {t!r}")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {b!r} for token {t}")
