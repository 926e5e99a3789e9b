"""One sequence's generation settings (`GenerationParams`), as `model.generate`'s arguments for one row."""

from __future__ import annotations

from dataclasses import dataclass

from ..generation import check_max_new_tokens


@dataclass(frozen=True)
class GenerationParams:
    """One sequence's settings, as `model.generate`'s arguments for one row.

    top_k 0 and top_p 1 disable them; seed None samples from torch's global generator; eos_token_id None
    means the model config's, an empty tuple none; stop_strings need the engine's tokenizer.
    logprobs: record each new token's log-probability and the `logprobs` most likely tokens' (0: the
    chosen token's only) in `Sequence.logprobs`; prompt_logprobs: the same for every prompt token after
    the first, in `Sequence.prompt_logprobs` (with max_new_tokens 0 the prompt is still run, to score it).
    None computes nothing."""

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


def check_params(params: GenerationParams, vocab_size: int) -> None:
    """Raise ValueError naming the first setting of `params` out of its bounds (the sampling settings are
    checked where they are built, `bloom.generation.sampling_params`)."""
    check_max_new_tokens(params.max_new_tokens)
    for name in ("logprobs", "prompt_logprobs"):
        n = getattr(params, name)
        if n is not None and not (isinstance(n, int) and 0 <= n <= vocab_size):
            raise ValueError(f"{name} must be None or an integer in [0, {vocab_size}], got {n!r}")
