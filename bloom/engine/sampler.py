"""The sampler: each row of a step's logits → its sequence's next token, with that sequence's own settings.

Rows sample independently (a mixed batch: greedy beside sampled, each with its own temperature, top-k,
top-p, repetition penalty and generator), through `bloom.generation.next_token`, the same function as the
static `model.generate`, so a sequence's tokens equal `generate` on its prompt alone. Log-probabilities
are of the model's own distribution: log_softmax of the fp32 logits, before any setting changes them.
"""

from __future__ import annotations

import torch

from ..generation import SamplingParams, next_token, sampling_params, token_logprobs
from .params import GenerationParams
from .sequence import Sequence


def sampling_state(params: GenerationParams, prompt: list[int], vocab_size: int, device: torch.device
                   ) -> tuple[SamplingParams, torch.Tensor | None]:
    """A sequence's sampling row (its settings, checked, and its own generator) and, when it has a
    repetition penalty, its (V,) bool mask of tokens seen so far (the prompt's); None otherwise.
    Raises ValueError naming a bad setting."""
    sampling = sampling_params(1, device, params.do_sample, params.temperature, params.top_k, params.top_p,
                               params.repetition_penalty, params.seed)
    seen = None
    if params.repetition_penalty != 1:
        seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        seen[torch.tensor(prompt, device=device)] = True
    return sampling, seen


def sample(rows: list[Sequence], logits: torch.Tensor) -> list[int]:
    """fp32 logits (B, V), one row per sequence → each sequence's next token. Draws from each sampled
    row's own generator and marks the token in its `seen` (the only state it moves on)."""
    params = SamplingParams.cat([s.sampling for s in rows])
    seen = None
    if any(s.seen is not None for s in rows):
        none = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        seen = torch.stack([none if s.seen is None else s.seen for s in rows])
    tokens = next_token(logits, seen, params).tolist()
    for s, token in zip(rows, tokens):
        if s.seen is not None:
            s.seen[token] = True
    return tokens


def logprobs(rows: list[Sequence], logits: torch.Tensor, tokens: list[int]) -> list[tuple | None]:
    """Per row, (the chosen token's logprob, [(id, logprob)] of its `params.logprobs` most likely tokens)
    for the sequences that ask for logprobs, None for the others. logits (B, V): the model's, unchanged."""
    asking = [j for j, s in enumerate(rows) if s.logprobs is not None]
    out: list[tuple | None] = [None] * len(rows)
    if not asking:
        return out
    top = max(rows[j].params.logprobs for j in asking)
    for j, (lp, alternatives) in zip(asking, token_logprobs(logits[asking], [tokens[j] for j in asking], top)):
        out[j] = (lp, alternatives[: rows[j].params.logprobs])
    return out
