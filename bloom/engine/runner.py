"""The runner: one packed forward of the model per engine step, over the slot cache.

`Runner.forward` feeds each decoding sequence's last token and each planned prompt chunk as one packed
row (`PackedAttention`), and returns the fp32 logits of each row's last new token; the prompt logprobs
that sequences ask for come from the same hidden states. It reads the sequences and writes only the
cache (their keys and values); the engine moves their counters on.
"""

from __future__ import annotations

import torch

from ..generation import token_logprobs
from ..model import attention, attention_bias
from .cache import SlotKVCache
from .sequence import Sequence

PROMPT_LOGPROBS_ROWS = 64  # (64, V) fp32 logits at a time when scoring a prompt, never (N, V)


class PackedAttention:
    """One step's forward over the slot cache: every row's new tokens packed into one sequence of N tokens,
    with no padding, passed to the model as its `packed=` argument (`BloomModel.forward`).

    The rows are R decoding sequences (one token each, in slots 0 .. R-1, c_i tokens cached) followed by P
    prompt chunks (n_j tokens each, in their own slots, c_j cached). The linears, LayerNorms and the MLP
    see all N = R + sum(n_j) tokens as one (1, N, C) batch, so a step costs one forward however many
    prompts join it, and nothing is computed for padding. Only attention needs to know the rows: `attend`
    writes each new token's key and value at its position in its slot, then
      - the R decode queries attend together over slots 0 .. R-1 (a view; on CPU in bf16 a copy, which
        is faster there), right-padded to the longest of them, max(c_i) + 1 keys; the mask hides each
        row's padding;
      - each prompt chunk attends over its own slot's first c_j + n_j keys, causally.
    ALiBi positions are each row's own token positions 0, 1, 2, ... (the mask's cumulative sum, as in
    BloomModel), so a row's result does not depend on what else is in the step."""

    def __init__(self, cache: SlotKVCache, decode_cached: list[int], chunks: list[tuple[int, int, int]],
                 n_head: int, dtype: torch.dtype):
        """decode_cached: c_i of the sequences in slots 0 .. R-1; chunks: (slot, c_j, n_j) of each prompt chunk."""
        device = cache.keys[0].device
        self.cache, self.R = cache, len(decode_cached)
        slots = list(range(self.R)) + [slot for slot, _, n in chunks for _ in range(n)]
        positions = list(decode_cached) + [c + t for _, c, n in chunks for t in range(n)]
        # Each new token's row, per head, in a layer's cache seen as (num_slots * H * max_seq_len, D): one
        # index_copy_ per layer writes them all (an index_put with two index tensors costs ~10x more).
        H, L = cache.keys[0].shape[1], cache.max_seq_len
        slot_t, pos_t = torch.tensor(slots, device=device), torch.tensor(positions, device=device)
        self.write_rows = ((slot_t[:, None] * H + torch.arange(H, device=device)) * L + pos_t[:, None]).reshape(-1)
        # Offsets of each row's new tokens in the packed sequence; `last` picks each row's last token.
        self.offsets, self.last, at = list(range(self.R)), list(range(self.R)), self.R
        for _, _, n in chunks:
            self.offsets.append(at)
            self.last.append(at + n - 1)
            at += n
        self.chunks = chunks
        biases = []
        if self.R:
            self.end = max(decode_cached) + 1
            mask = torch.arange(self.end, device=device) < torch.tensor(decode_cached, device=device)[:, None] + 1
            biases.append(attention_bias(mask, 1, n_head, dtype))  # (R, H, 1, end)
        for _, c, n in chunks:  # (1, H, n, c + n): causal over the row's own tokens
            biases.append(attention_bias(torch.ones(1, c + n, dtype=torch.long, device=device), n, n_head, dtype))
        self._biases = biases
        self._on_device: dict[torch.device, tuple] = {}

    def _moved(self, device: torch.device) -> tuple:
        """(write_rows, biases) on `device` (a layer's, under a device map), moved once a forward."""
        if device not in self._on_device:
            self._on_device[device] = (self.write_rows.to(device), [b.to(device) for b in self._biases])
        return self._on_device[device]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q, k, v (1, H, N, D) of the packed tokens → attention output (1, H, N, D), each row over its own
        tokens; stores k, v in the rows' slots first."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        rows, biases = self._moved(keys.device)
        for buf, new in ((keys, k), (values, v)):
            buf.view(-1, buf.shape[-1]).index_copy_(0, rows, new[0].transpose(0, 1).reshape(-1, buf.shape[-1]))
        out, R = [], self.R
        if R:  # (R, H, 1, D) queries over slots 0 .. R-1
            k_, v_ = keys[:R, :, : self.end], values[:R, :, : self.end]
            if keys.device.type == "cpu" and keys.dtype != torch.float32:
                # A bf16 batched product over this view (each slot's first `end` keys, not one block) is
                # slower on CPU than copying the keys out first: bench_recipe's 200 rows at fixed lengths
                # through a replica in-process, 8.2 s against 9.0 s (median of 8, interleaved). In fp32
                # the copy costs more than it saves.
                k_, v_ = k_.contiguous(), v_.contiguous()
            y, _ = attention(q[0, :, :R].transpose(0, 1)[:, :, None], k_, v_, biases[0], scale)
            out.append(y[:, :, 0].transpose(0, 1)[None])  # (1, H, R, D)
        for j, (slot, c, n) in enumerate(self.chunks):
            o = self.offsets[R + j]
            y, _ = attention(q[:, :, o : o + n], keys[slot : slot + 1, :, : c + n], values[slot : slot + 1, :, : c + n],
                             biases[j + (1 if R else 0)], scale)
            out.append(y)  # (1, H, n, D)
        return out[0] if len(out) == 1 else torch.cat(out, 2)


class Runner:
    """Runs `model` (a BloomForCausalLM) over `cache`, one packed forward per step."""

    def __init__(self, model, cache: SlotKVCache, adapters=None):
        """adapters: the `bloom.lora.AdapterBank` that sequences' params.adapter names, or None."""
        self.model, self.cache, self.adapters = model, cache, adapters
        self.device = model.get_input_embeddings().weight.device

    def forward(self, decoding: list[Sequence], plan: list[tuple[Sequence, int]]
                ) -> tuple[torch.Tensor, list[list | None]]:
        """One forward for the whole step: each decoding sequence's last token (it sits in slot i, i its
        place in `decoding`) and each planned prompt chunk (sequence, tokens to feed), packed into one row.

        Returns the fp32 logits (R + P, V) of each row's last new token (decode rows, then chunks) and,
        per chunk, the logprob entries of its prompt tokens when its sequence asks for them, else None."""
        ids = [s.output_ids[-1] for s in decoding]
        for s, n in plan:
            ids += s.prompt_ids[s.num_cached : s.num_cached + n]
        step = PackedAttention(self.cache, [s.num_cached for s in decoding],
                               [(s.slot, s.num_cached, n) for s, n in plan], self.model.config.n_head,
                               self.cache.keys[0].dtype)
        lora = None
        if self.adapters is not None:  # each packed token runs its sequence's adapter (or the base)
            names = [s.params.adapter for s in decoding] + [s.params.adapter for s, n in plan for _ in range(n)]
            lora = self.adapters.batch(names, per_token=True)
        h = self.model.transformer(torch.tensor([ids], device=self.device), packed=step, lora=lora,
                                   return_dict=True).last_hidden_state[0]  # (N, C)
        scored = [self._prompt_logprobs(s, n, h[o : o + n]) for (s, n), o in zip(plan, step.offsets[len(decoding) :])]
        return self.model.get_output_embeddings()(h[step.last]).float(), scored

    def _prompt_logprobs(self, seq: Sequence, n: int, h: torch.Tensor) -> list | None:
        """h (n, C): the final hidden states of seq's chunk of n prompt tokens, at positions c .. c + n - 1
        (c = its tokens cached before the chunk); position p's logits score prompt token p + 1. None when
        the sequence asks for no prompt logprobs."""
        if seq.params.prompt_logprobs is None:
            return None
        head, c, out = self.model.get_output_embeddings(), seq.num_cached, []
        scored = min(n, len(seq.prompt_ids) - 1 - c)  # the last prompt position predicts a new token
        for a in range(0, scored, PROMPT_LOGPROBS_ROWS):
            b = min(a + PROMPT_LOGPROBS_ROWS, scored)
            out += token_logprobs(head(h[a:b]).float(), seq.prompt_ids[c + a + 1 : c + b + 1], seq.params.prompt_logprobs)
        return out
