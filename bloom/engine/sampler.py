"""The sampler: each row of a step's logits → its sequence's next token, with that sequence's own settings.

Rows sample independently (a mixed batch: greedy beside sampled, each with its own temperature, top-k,
top-p, repetition penalty and generator) through `bloom.generation.next_token`, the same function as the
static `model.generate`, so a sequence's tokens equal `generate` on its prompt alone. OpenAI's
logit_bias, frequency and presence penalties and min_tokens change a copy of a row's logits first; then a
constrained row's tokens outside its constraint are set to -inf (`constraints.Constrainer.allowed`). Log-probabilities
are of the model's own distribution: log_softmax of the fp32 logits, before any setting changes them.
"""

from __future__ import annotations

import torch

from ..generation import SamplingParams, next_token, sampling_params, token_logprobs
from .constraints import Constrainer, consume
from .params import GenerationParams
from .sequence import SamplingState, Sequence


def sampling_state(params: GenerationParams, prompt: list[int], vocab_size: int, device: torch.device,
                   matcher=None) -> SamplingState:
    """A sequence's sampler state: its sampling row (settings checked, its own generator), the (V,) mask of
    tokens seen (the prompt's) when it has a repetition penalty, zero counts when it has a frequency or
    presence penalty, its logit_bias as tensors, and `matcher` (its constraint's, from the engine's
    Constrainer). Raises ValueError naming a bad setting."""
    state = SamplingState(sampling_params(1, device, params.do_sample, params.temperature, params.top_k,
                                          params.top_p, params.repetition_penalty, params.seed), matcher=matcher)
    if params.repetition_penalty != 1:
        state.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        state.seen[torch.tensor(prompt, device=device)] = True
    if params.counts_tokens:
        state.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
    if params.logit_bias:
        state.bias_ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=device)
        state.bias_values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=device)
    return state


def sample(rows: list[Sequence], logits: torch.Tensor,
           allowed: tuple[list[int], torch.Tensor] | None = None, *, scratch: bool = False,
           constrainer: Constrainer | None = None) -> list[int]:
    """fp32 logits (B, V), one row per sequence → each sequence's next token. The logits are not changed
    (OpenAI's settings and the constraints work on a copy) unless `scratch`: the caller needs them no
    more, and they are changed in place (a (B, V) copy less per step). allowed: (row indices, their packed bitmasks
    (K, ceil(V / 32)) int32) the tokens the constrained rows may take; constrainer: the engine's, whose
    greedy rows that `Constrainer.checks` are not in `allowed`: their argmax is checked against their
    matcher, and their masks computed only where it refuses it. Draws from each sampled row's own
    generator and counts the token in its sampler state, and advances its constraint's matcher (the only
    state it moves on)."""
    states = [s.sampling for s in rows]
    adjusts = any(s.params.adjusts_logits for s in rows)
    if adjusts:
        logits = adjusted(rows, logits if scratch else logits.clone())
    if allowed is not None:
        logits = constrained(logits, *allowed, copy=not (adjusts or scratch))
    seen = None
    if any(st.seen is not None for st in states):
        none = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        seen = torch.stack([none if st.seen is None else st.seen for st in states])
    tokens = next_token(logits, seen, SamplingParams.cat([st.row for st in states])).tolist()
    if constrainer is not None:
        _settle(rows, logits, tokens, constrainer)
    for st, token in zip(states, tokens):
        if st.seen is not None:
            st.seen[token] = True
        if st.counts is not None:
            st.counts[token] += 1
    consume(rows, tokens)
    return tokens


def _settle(rows: list[Sequence], logits: torch.Tensor, tokens: list[int], constrainer: Constrainer) -> None:
    """The tokens of the greedy constrained rows left unmasked (`Constrainer.checks`), set in `tokens`: each
    row's argmax where its matcher takes it, else the first maximum of its logits over the tokens its mask,
    computed now, allows (ascending ids, so ties go to the lowest, as argmax over masked logits; no
    allowed token: 0, as argmax over all -inf, which `consume` then refuses)."""
    refused = [i for i, s in enumerate(rows)
               if constrainer.checks(s) and s.sampling.matcher.validate_tokens([tokens[i]]) != 1]
    if not refused:
        return
    masks = constrainer.compute([rows[i].sampling.matcher for i in refused]).to(logits.device)
    for i, words in zip(refused, masks):
        ids = allowed_ids(words, logits.shape[-1])
        tokens[i] = int(ids[logits[i, ids].argmax()]) if len(ids) else 0


def allowed_ids(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The token ids below `vocab_size` that a packed bitmask (ceil(V / 32),) int32 allows, ascending; read
    from its nonzero words only (few outside a JSON string), never unpacking all V bits."""
    bit = torch.arange(32, device=words.device, dtype=torch.int32)
    at = words.nonzero().squeeze(1)
    ids = (at[:, None] * 32 + bit)[((words[at, None] >> bit) & 1).bool()]
    return ids[ids < vocab_size]


_PENALTIES: dict[tuple, torch.Tensor] = {}


def _penalties(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8): byte → what its 8 bits, least significant first, add to their tokens' logits: 0 where
    the bit is set (allowed), -inf where it is clear."""
    key = (device, dtype)
    if key not in _PENALTIES:
        bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1
        _PENALTIES[key] = torch.where(bits == 1, 0.0, float("-inf")).to(device, dtype)
    return _PENALTIES[key]


def constrained(logits: torch.Tensor, index: list[int], allowed: torch.Tensor, copy: bool) -> torch.Tensor:
    """logits (B, V) with -inf at the tokens that rows `index` (ascending) may not take, from their packed
    bitmasks `allowed` (K, ceil(V / 32)) int32 (bit j of word w: token 32w + j allowed; llguidance's);
    on a copy when `copy`. The bits are never unpacked to a (K, V) bool mask: each byte picks its row of
    a (256, 8) table of 0 / -inf (one gather of 32-byte rows), added to the logits; at 250,880 tokens and
    16 rows less than half the time of unpacking and masked_fill (docs/engine.md). Adding 0 keeps an
    allowed logit exact, so greedy choices are those of a masked_fill."""
    K, V = allowed.shape[0], logits.shape[-1]
    # Little-endian words: byte b of word w holds tokens 32w + 8b .. 32w + 8b + 7.
    octets = allowed.to(logits.device, non_blocking=True).view(torch.uint8).int()  # (K, 4 · words)
    penalty = torch.nn.functional.embedding(octets, _penalties(logits.device, logits.dtype)).view(K, -1)[:, :V]
    if len(index) == logits.shape[0]:  # every row constrained (the labeling job's usual batch)
        return logits + penalty if copy else logits.add_(penalty)
    logits = logits.clone() if copy else logits
    logits[index] += penalty
    return logits


def adjusted(rows: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
    """OpenAI's settings, each row its own, applied in place to logits (B, V) and returned: logit_bias
    added; count · frequency_penalty + (count > 0) · presence_penalty subtracted (count over the tokens
    generated so far); eos set to -inf while a row has fewer than min_tokens tokens."""
    device = logits.device
    biased = [(i, s.sampling) for i, s in enumerate(rows) if s.sampling.bias_ids is not None]
    if biased:  # one scatter-add for every row's biases
        where = torch.cat([torch.full_like(st.bias_ids, i) for i, st in biased])
        logits.index_put_((where, torch.cat([st.bias_ids for _, st in biased])),
                          torch.cat([st.bias_values for _, st in biased]), accumulate=True)
    counting = [i for i, s in enumerate(rows) if s.sampling.counts is not None]
    if counting:
        counts = torch.stack([rows[i].sampling.counts for i in counting])  # (K, V)
        freq = torch.tensor([[rows[i].params.frequency_penalty] for i in counting], device=device)
        presence = torch.tensor([[rows[i].params.presence_penalty] for i in counting], device=device)
        index = torch.tensor(counting, device=device)
        logits[index] = logits[index] - (counts * freq + (counts > 0) * presence)
    held = [(i, s.eos) for i, s in enumerate(rows) if s.eos and len(s.output_ids) < s.params.min_tokens]
    if held:  # after the bias, so no bias lets eos through before min_tokens
        where = torch.tensor([i for i, eos in held for _ in eos], device=device)
        logits.index_put_((where, torch.tensor([t for _, eos in held for t in eos], device=device)),
                          torch.tensor(float("-inf"), device=device))
    return logits


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
