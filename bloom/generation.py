"""Generation for BloomForCausalLM: a preallocated KV cache, prefill, one-token decode, sampling.

`generate` and `stream` share one loop (`_decode`); rows of a left-padded batch finish independently,
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


# ----------------------------------------------------------------------------- sampling


def _per_row(value, batch: int, name: str, device) -> torch.Tensor:
    """A scalar or one value per row → (B, 1) float tensor."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1, 1)
    if t.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be a number or one value per row ({batch}), got {t.shape[0]} values")
    return t.expand(batch, 1)


@dataclass
class SamplingParams:
    """Per-row sampling settings as (B, 1) tensors; built by `generate` from scalars or sequences."""

    do_sample: bool
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    repetition_penalty: torch.Tensor
    generators: list[torch.Generator | None]


def _sampling_params(batch, device, do_sample, temperature, top_k, top_p, repetition_penalty, seed):
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
    return SamplingParams(do_sample, generators=generators, **params)


def _apply_repetition_penalty(logits, seen, penalty):
    """The CTRL penalty: logits of tokens already in the row are divided by `penalty` when positive,
    multiplied when negative. seen: (B, V) bool."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def next_token(logits: torch.Tensor, seen: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(B, V) fp32 logits of the last position → (B,) token ids, greedy or sampled.

    Order as the reference: repetition penalty, then temperature, top-k, top-p."""
    if (p.repetition_penalty != 1).any():
        logits = _apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if not p.do_sample:
        return logits.argmax(-1)
    logits = logits / p.temperature
    sorted_logits, order = logits.sort(-1, descending=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None]
    k = torch.where(p.top_k > 0, p.top_k, float(logits.shape[-1]))
    drop = rank >= k
    # top-p keeps the smallest set of tokens whose probability reaches p (at least one token).
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    drop |= (probs.cumsum(-1) - probs) >= p.top_p
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(-1)
    picks = [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(p.generators)]
    return order.gather(-1, torch.stack(picks)).squeeze(-1)


# ----------------------------------------------------------------------------- the decode loop


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


class _StopStrings:
    """Detects stop strings in each row's generated text by decoding only a tail window of tokens."""

    def __init__(self, stop_strings, tokenizer, batch):
        self.stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        if self.stops and tokenizer is None:
            raise ValueError("stop_strings need the tokenizer= argument to read the generated text")
        if any(not isinstance(s, str) or not s for s in self.stops):
            raise ValueError("stop_strings must be non-empty strings")
        self.tokenizer = tokenizer
        # Each token is at least one byte and a character at most four, so this window holds any stop string.
        self.window = 4 * max((len(s) for s in self.stops), default=0) + 4
        self.tokens: list[list[int]] = [[] for _ in range(batch)]

    def hit(self, row: int, token: int) -> bool:
        if not self.stops:
            return False
        self.tokens[row].append(token)
        tail = self.tokenizer.decode(self.tokens[row][-self.window :])
        return any(s in tail for s in self.stops)


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
) -> Iterator[StreamStep]:
    cfg = model.config
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, seq_len) with seq_len > 0, got {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    device = model.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device, torch.long)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(input_ids.shape)}")
    if (mask.sum(-1) == 0).any():
        raise ValueError("every row needs at least one real token (an all-padding row was given)")
    eos = eos_token_id if eos_token_id is not None else cfg.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=device)
    pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None else eos)
    pad = 0 if pad is None else pad
    params = _sampling_params(B, device, do_sample, temperature, top_k, top_p, repetition_penalty, seed)
    stops = _StopStrings(stop_strings, tokenizer, B)

    seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
    if (params.repetition_penalty != 1).any():  # padding is not part of the text, so it is not penalised
        seen.scatter_(1, input_ids.masked_fill(mask == 0, 0), mask.bool())
    reasons: list[str | None] = [None] * B
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache(cfg.n_layer, capacity=T + max_new_tokens)
    # The mask for every step at once: step k attends to the prompt and the k tokens before it.
    full_mask = torch.cat([mask, mask.new_ones(B, max_new_tokens)], dim=1)
    step_ids = input_ids
    for step in range(max_new_tokens):
        logits = model(step_ids, past_key_values=cache, attention_mask=full_mask[:, : T + step], use_cache=True,
                       logits_to_keep=1).logits
        token = next_token(logits[:, -1].float(), seen, params)
        token = token.masked_fill(done, pad)
        active = ~done
        seen[torch.arange(B, device=device), token] |= active
        finished_eos = active & torch.isin(token, eos_ids)
        # The step's one device-to-host copy: the finish checks (and stop strings) need the tokens.
        host_tokens, host_eos = torch.stack([token, finished_eos.to(token.dtype)]).tolist()
        for row in range(B):
            if reasons[row] is not None:
                continue
            if host_eos[row]:
                reasons[row] = "eos"
            elif stops.hit(row, host_tokens[row]):
                reasons[row] = "stop"
            elif step == max_new_tokens - 1:
                reasons[row] = "length"
        yield StreamStep(token, active, list(reasons))
        if all(r is not None for r in reasons):
            return
        done = torch.tensor([r is not None for r in reasons], device=device)
        step_ids = token[:, None]


class GenerationMixin:
    """`generate` and `stream` for BloomForCausalLM (arguments as transformers' `generate`)."""

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 return_dict_in_generate: bool = False, **kwargs) -> torch.Tensor | GenerateOutput:
        """Generate up to max_new_tokens after each (left-padded) prompt row.

        input_ids, attention_mask: (B, T). Parameters: max_new_tokens, do_sample, temperature, top_k,
        top_p, repetition_penalty (each a number or one per row), eos_token_id, pad_token_id, seed (an
        int or one per row), stop_strings with tokenizer. Returns sequences (B, T + n) like the
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
