"""Generation for BloomForCausalLM: a preallocated KV cache, prefill, one-token decode, sampling.

The small pieces here are shared by the static batch loop below (`generate`, `stream`) and by the
continuous-batching engine (`bloom.engine`): `prefill` / `decode_step` run the model, `next_token`
samples, `finish_reason` decides when a row ends. Rows of a left-padded batch finish independently,
each with a reason: "eos", "stop" (a stop string appeared) or "length" (max_new_tokens reached).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of every layer, (B, H, capacity, D) buffers filled in place.

    Buffers are allocated at a layer's first update, on that layer's device (so a model spread over
    several devices keeps each layer's cache beside it), with room for `capacity` tokens; a longer
    sequence grows them by doubling. `length` counts the tokens already cached.
    """

    def __init__(self, n_layer: int, capacity: int = 0):
        self.keys: list[torch.Tensor | None] = [None] * n_layer
        self.values: list[torch.Tensor | None] = [None] * n_layer
        self.capacity = capacity
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, H, T, D) after the cached tokens; return views of all (B, H, length + T, D)."""
        end = self.length + k.shape[2]
        buf_k, buf_v = self.keys[layer], self.values[layer]
        if buf_k is None or buf_k.shape[2] < end:
            size = max(self.capacity, end) if buf_k is None else max(2 * buf_k.shape[2], end)
            new_k = k.new_empty(*k.shape[:2], size, k.shape[3])
            new_v = v.new_empty(*v.shape[:2], size, v.shape[3])
            if buf_k is not None:
                new_k[:, :, : self.length] = buf_k[:, :, : self.length]
                new_v[:, :, : self.length] = buf_v[:, :, : self.length]
            self.keys[layer], self.values[layer] = buf_k, buf_v = new_k, new_v
        buf_k[:, :, self.length : end] = k
        buf_v[:, :, self.length : end] = v
        return buf_k[:, :, :end], buf_v[:, :, :end]

    def advance(self, n: int) -> None:
        """Called by the model once every layer has appended its n new tokens."""
        self.length += n

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A new cache holding the given batch rows, (n,) indices, repeats allowed: drop finished rows,
        or share one prompt's cache among several continuations."""
        out = KVCache(len(self.keys), self.capacity)
        out.length = self.length
        out.keys = [None if t is None else t.index_select(0, rows.to(t.device)) for t in self.keys]
        out.values = [None if t is None else t.index_select(0, rows.to(t.device)) for t in self.values]
        return out


# ----------------------------------------------------------------------------- one forward


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, lora=None) -> torch.Tensor:
    """Run the prompts (B, T) through the model, filling `cache`; attention_mask (B, S) covers the cache
    and the prompts; lora: each row's adapter (`bloom.lora.LoraBatch`) or None. Returns the fp32 logits
    (B, V) of each row's last position."""
    out = model(input_ids, past_key_values=cache, attention_mask=attention_mask, use_cache=True, logits_to_keep=1,
                lora=lora)
    return out.logits[:, -1].float()


def decode_step(model, tokens: torch.Tensor, attention_mask: torch.Tensor, cache, lora=None) -> torch.Tensor:
    """Feed one token per row, tokens (B,), after the cached ones → fp32 logits (B, V) of the next."""
    return prefill(model, tokens[:, None], attention_mask, cache, lora)


# ----------------------------------------------------------------------------- sampling


def _per_row(value, batch: int, name: str, device) -> torch.Tensor:
    """A scalar or one value per row → (B, 1) float tensor."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1, 1)
    if t.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be a number or one value per row ({batch}), got {t.shape[0]} values")
    return t.expand(batch, 1)


@dataclass
class SamplingParams:
    """Per-row sampling settings: (B, 1) tensors, one do_sample flag and one generator per row.

    Built by `sampling_params` from scalars or sequences; `SamplingParams.cat` stacks the one-row
    params of the engine's sequences into the batch of a step."""

    do_sample: list[bool]
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    repetition_penalty: torch.Tensor
    generators: list[torch.Generator | None]

    @staticmethod
    def cat(rows: list["SamplingParams"]) -> "SamplingParams":
        return SamplingParams(
            [d for r in rows for d in r.do_sample],
            *(torch.cat([getattr(r, name) for r in rows]) for name in ("temperature", "top_k", "top_p",
                                                                      "repetition_penalty")),
            [g for r in rows for g in r.generators],
        )


def sampling_params(batch, device, do_sample=False, temperature=1.0, top_k=None, top_p=1.0,
                    repetition_penalty=1.0, seed=None) -> SamplingParams:
    """Check the settings and build a SamplingParams for `batch` rows; each setting is a number or one per
    row, seed an int, None or one per row. Raises ValueError naming the bad setting."""
    params = {
        "temperature": _per_row(temperature, batch, "temperature", device),
        "top_k": _per_row(top_k or 0, batch, "top_k", device),
        "top_p": _per_row(top_p, batch, "top_p", device),
        "repetition_penalty": _per_row(repetition_penalty, batch, "repetition_penalty", device),
    }
    if do_sample and (params["temperature"] <= 0).any():
        raise ValueError("temperature must be > 0 when sampling (use do_sample=False for greedy)")
    if ((params["top_p"] <= 0) | (params["top_p"] > 1)).any():
        raise ValueError("top_p must be in (0, 1]")
    if (params["top_k"] < 0).any():
        raise ValueError("top_k must be >= 0 (0 disables it)")
    if (params["repetition_penalty"] <= 0).any():
        raise ValueError("repetition_penalty must be > 0")
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * batch
    if len(seeds) != batch:
        raise ValueError(f"seed must be an int or one per row ({batch}), got {len(seeds)}")
    # One generator per row: a row's samples depend on its own seed, not on the batch it shares.
    generators = []
    for s in seeds:
        g = None
        if s is not None:
            g = torch.Generator(device=device)
            g.manual_seed(int(s))
        generators.append(g)
    return SamplingParams([bool(do_sample)] * batch, generators=generators, **params)


def _apply_repetition_penalty(logits, seen, penalty):
    """The CTRL penalty: logits of tokens already in the row are divided by `penalty` when positive,
    multiplied when negative. seen: (B, V) bool."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def next_token(logits: torch.Tensor, seen: torch.Tensor | None, p: SamplingParams) -> torch.Tensor:
    """(B, V) fp32 logits of the last position → (B,) token ids, greedy or sampled per row.

    seen: (B, V) bool, the tokens of each row so far (None when no row has a repetition penalty).
    Order as the reference: repetition penalty, then temperature, top-k, top-p. Only sampled rows draw
    from their generator, so a row's draws never depend on its neighbours."""
    if seen is not None and (p.repetition_penalty != 1).any():
        logits = _apply_repetition_penalty(logits, seen, p.repetition_penalty)
    greedy = logits.argmax(-1)
    sampled_rows = [i for i, d in enumerate(p.do_sample) if d]
    if not sampled_rows:
        return greedy
    rows = torch.tensor(sampled_rows, device=logits.device)
    logits = logits[rows] / p.temperature[rows]
    sorted_logits, order = logits.sort(-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None]
    top_k = p.top_k[rows]
    drop = rank >= torch.where(top_k > 0, top_k, float(logits.shape[-1]))
    # top-p keeps the smallest set of tokens whose probability reaches p (at least one token).
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    drop |= (probs.cumsum(-1) - probs) >= p.top_p[rows]
    drop[:, 0] = False
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    picks = [torch.multinomial(probs[j], 1, generator=p.generators[i]) for j, i in enumerate(sampled_rows)]
    return greedy.index_copy(0, rows, order.gather(-1, torch.stack(picks)).squeeze(-1))


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], n: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """fp32 logits (P, V) at P positions and the token that came after each → per position (that token's
    log-probability, [(id, logprob)] of the n most likely tokens, most likely first). The model's own
    distribution: log_softmax of the raw logits, before repetition penalty, temperature, top-k or top-p."""
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(-1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    top_lp, top_ids = lp.topk(n, -1)
    return [(c, list(zip(ids, vals))) for c, ids, vals in zip(chosen, top_ids.tolist(), top_lp.tolist())]


# ----------------------------------------------------------------------------- when a row ends


class StopStrings:
    """Detects stop strings in one row's generated text by decoding only a tail window of its tokens."""

    def __init__(self, stop_strings: str | Sequence[str] | None, tokenizer):
        self.stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        if self.stops and tokenizer is None:
            raise ValueError("stop_strings need the tokenizer= argument to read the generated text")
        if any(not isinstance(s, str) or not s for s in self.stops):
            raise ValueError("stop_strings must be non-empty strings")
        self.tokenizer = tokenizer
        # Each token is at least one byte and a character at most four, so this window holds any stop string.
        self.window = 4 * max((len(s) for s in self.stops), default=0) + 4
        self.tokens: list[int] = []
        self.held = 0  # the first `held` tokens may not end a stop string (they came before min_tokens)

    def hit(self, token: int, check: bool = True) -> bool:
        """Add `token` to the row's text; whether a stop string now ends in it. check False: only add it
        (before min_tokens), and no later match may end in the text added so far."""
        if not self.stops:
            return False
        self.tokens.append(token)
        if not check:
            self.held = len(self.tokens)
            return False
        start = max(0, len(self.tokens) - self.window)
        tail = self.tokenizer.decode(self.tokens[start:])
        if self.held <= start:
            return any(s in tail for s in self.stops)
        held = len(self.tokenizer.decode(self.tokens[start : self.held]))  # a match must end after this text
        return any(tail.find(s, max(0, held - len(s) + 1)) >= 0 for s in self.stops)


def eos_ids(config, eos_token_id) -> tuple[int, ...]:
    """The end-of-sequence ids: `eos_token_id` (an int or several; [] for none) or, when None, the config's."""
    eos = eos_token_id if eos_token_id is not None else config.eos_token_id
    return tuple([eos] if isinstance(eos, int) else list(eos or []))


def finish_reason(token: int, num_new: int, max_new_tokens: int, eos: tuple[int, ...], stop: StopStrings,
                  min_tokens: int = 0) -> str | None:
    """Why a row ends after producing `token` as its num_new-th new token: "eos", "stop", "length", or None.
    Before min_tokens new tokens no eos ends it (a sampler masks eos until then, as OpenAI's min_tokens),
    and no stop string ends in the first min_tokens - 1 tokens' text."""
    if token in eos and num_new > min_tokens:
        return "eos"
    if stop.hit(token, check=num_new >= min_tokens):
        return "stop"
    if num_new >= max_new_tokens:
        return "length"
    return None


def check_max_new_tokens(max_new_tokens) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")


# ----------------------------------------------------------------------------- the static batch loop


@dataclass
class GenerateOutput:
    """sequences (B, T + n): prompts followed by the new tokens, pad_token_id after a row finished.
    finish_reason: per row "eos", "stop" or "length". num_new_tokens: per row, tokens generated."""

    sequences: torch.Tensor
    finish_reason: list[str]
    num_new_tokens: list[int]


@dataclass
class StreamStep:
    """One decode step: tokens (B,) just generated (pad for rows already finished), active (B,) rows that
    produced a token this step, finish_reason per row (None while running)."""

    tokens: torch.Tensor
    active: torch.Tensor
    finish_reason: list[str | None]


def _prompts(model, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a left-padded prompt batch; return input_ids and mask (B, T) on the embedding's device."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, seq_len) with seq_len > 0, got {tuple(input_ids.shape)}")
    device = model.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device, torch.long)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(input_ids.shape)}")
    if (mask.sum(-1) == 0).any():
        raise ValueError("every row needs at least one real token (an all-padding row was given)")
    return input_ids, mask


@torch.inference_mode()
def _decode(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float | Sequence[float] = 1.0,
    top_k: int | Sequence[int] | None = None,
    top_p: float | Sequence[float] = 1.0,
    repetition_penalty: float | Sequence[float] = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | Sequence[int] | None = None,
    stop_strings: str | Sequence[str] | None = None,
    tokenizer=None,
    lora=None,
) -> Iterator[StreamStep]:
    """All rows start together and the batch runs until its last row ends; finished rows get pad."""
    cfg = model.config
    input_ids, mask = _prompts(model, input_ids, attention_mask)
    check_max_new_tokens(max_new_tokens)
    B, T = input_ids.shape
    device = input_ids.device
    eos = eos_ids(cfg, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    if pad is None:  # no pad token: pad with the (first) end-of-sequence id, else 0
        pad = eos[0] if eos else 0
    params = sampling_params(B, device, do_sample, temperature, top_k, top_p, repetition_penalty, seed)
    stops = [StopStrings(stop_strings, tokenizer) for _ in range(B)]
    seen = None
    if (params.repetition_penalty != 1).any():  # padding is not part of the text, so it is not penalised
        seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids.masked_fill(mask == 0, 0), mask.bool())
    if max_new_tokens == 0:
        return
    reasons: list[str | None] = [None] * B
    cache = KVCache(cfg.n_layer, capacity=T + max_new_tokens)
    # The mask for every step at once: step k attends to the prompt and the k tokens before it.
    full_mask = torch.cat([mask, mask.new_ones(B, max_new_tokens)], dim=1)
    logits = prefill(model, input_ids, mask, cache, lora)
    for step in range(max_new_tokens):
        active = torch.tensor([r is None for r in reasons], device=device)
        token = next_token(logits, seen, params).masked_fill(~active, pad)
        if seen is not None:
            seen[torch.arange(B, device=device), token] |= active
        # The step's one device-to-host copy: the finish checks (and stop strings) need the tokens.
        for row, t in enumerate(token.tolist()):
            if reasons[row] is None:
                reasons[row] = finish_reason(t, step + 1, max_new_tokens, eos, stops[row])
        yield StreamStep(token, active, list(reasons))
        if all(r is not None for r in reasons):
            return
        logits = decode_step(model, token, full_mask[:, : T + step + 1], cache, lora)


class GenerationMixin:
    """`generate` and `stream` for BloomForCausalLM (arguments as transformers' `generate`)."""

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 return_dict_in_generate: bool = False, **kwargs) -> torch.Tensor | GenerateOutput:
        """Generate up to max_new_tokens after each (left-padded) prompt row.

        input_ids, attention_mask: (B, T). Parameters: max_new_tokens, do_sample, temperature, top_k,
        top_p, repetition_penalty (each a number or one per row), eos_token_id, pad_token_id, seed (an
        int or one per row), stop_strings with tokenizer, lora (each row's adapter, `AdapterBank.batch`). Returns sequences (B, T + n) like the
        reference, or a GenerateOutput with finish reasons when return_dict_in_generate=True.
        """
        B = input_ids.shape[0]
        new, reasons = [], [None] * B
        active_steps = torch.zeros(B, dtype=torch.long, device=input_ids.device)
        for step in _decode(self, input_ids, attention_mask, **kwargs):
            new.append(step.tokens)
            reasons = step.finish_reason
            active_steps = active_steps + step.active.to(active_steps.device)
        counts = active_steps.tolist()
        sequences = torch.cat([input_ids.to(self.get_input_embeddings().weight.device), *[t[:, None] for t in new]], 1)
        if not return_dict_in_generate:
            return sequences
        # max_new_tokens=0 generates nothing: every row stops for length.
        return GenerateOutput(sequences, [r or "length" for r in reasons], counts)

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               **kwargs) -> Iterator[StreamStep]:
        """Like generate, but yields a StreamStep as each token is produced (same arguments)."""
        yield from _decode(self, input_ids, attention_mask, **kwargs)
