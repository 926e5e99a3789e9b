"""The embed task: one vector per row from the bare transformer's last hidden states, pooled over the
row's real tokens.

Poolings (`pooling`):
- "weightedmean" (SGPT-BLOOM's): token t of the n real tokens (t = 1..n) weighs t, normalised by their
  sum n(n+1)/2, so later tokens, which have seen more of the text, count more;
- "mean": every real token the same;
- "last": the last real token's state (what a causal model has read the whole text into).

Weights count real tokens only (padding is left out, wherever it sits), so a row gets the same vector
alone and in a padded batch. Pooling is in float32 whatever the model's dtype; `normalize` divides by
the L2 norm. A causal-LM checkpoint loads into the bare `BloomModel` (its LM head is left unused).
"""

from __future__ import annotations

import pyarrow as pa
import torch
import torch.nn.functional as F

import bloom

from .base import Task, batches, encode_capped, lora_batch

POOLINGS = ("weightedmean", "mean", "last")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str, normalize: bool = False) -> torch.Tensor:
    """hidden (B, T, C) last hidden states, mask (B, T) of 1 for real tokens → (B, C) float32 embeddings."""
    h, m = hidden.float(), mask.to(hidden.device, torch.float32)
    if how == "last":
        # The last real token: the highest position whose mask is 1 (left or right padding alike).
        positions = torch.arange(m.shape[1], device=h.device, dtype=torch.float32)
        out = h[torch.arange(h.shape[0], device=h.device), (positions * m).argmax(-1)]
    elif how in ("weightedmean", "mean"):
        w = m.cumsum(-1) * m if how == "weightedmean" else m  # (B, T): 1..n over the real tokens
        out = (h * w[..., None]).sum(1) / w.sum(1, keepdim=True)
    else:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {how!r}")
    return F.normalize(out, dim=-1) if normalize else out


def is_token_ids(value) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


class Embed(Task):
    """The text column (or, from the endpoint, a list of token ids) → `embedding`, a fixed-size
    list<float32> of the model's hidden size (a Delta table holds it as list<float32>: `delta.table_schema`)."""

    name = "embed"
    fields = [("embedding", pa.list_(pa.float32()))]  # fixed to the hidden size once the model is known
    embeds = True

    def model_class(self, c):
        return bloom.BloomModel

    def output_fields(self, rt=None, c=None):
        """With a runtime, `embedding` is list<float32> of the model's hidden size, fixed."""
        out = super().output_fields(rt, c)
        if rt is not None:
            out[0] = pa.field("embedding", pa.list_(pa.float32(), rt.model.config.hidden_size))
        return out

    def row_input(self, row, c, text):
        value = row.get(c.text_column)
        return list(value) if is_token_ids(value) else text(row, c.text_column)

    def label(self, rt, inputs, results, c, adapters=None):
        texts = {i: x for i, x in inputs.items() if not isinstance(x, list)}
        encoded = encode_capped(rt, texts, results, c)
        vocab = rt.model.config.vocab_size
        for i, ids in inputs.items():  # token ids given: checked here, capped like a text's
            if i in texts:
                continue
            results[i]["input_tokens"] = len(ids)
            bad = next((j for j, t in enumerate(ids) if not 0 <= t < vocab), None)
            if not ids:
                results[i].update(error="input has no tokens", error_code="invalid_input")
            elif bad is not None:
                results[i].update(error=f"token id {ids[bad]} at {bad} is not in the vocabulary [0, {vocab})",
                                  error_code="invalid_input")
            elif len(ids) > c.max_input_tokens and c.too_long == "error":
                results[i].update(error=f"input has {len(ids)} tokens, over the limit of {c.max_input_tokens}",
                                  error_code="too_long")
            else:
                results[i]["truncated"] = len(ids) > c.max_input_tokens
                encoded[i] = ids[: c.max_input_tokens]
        for idx, ids, mask in batches(rt, encoded, c):
            hidden = rt.model(ids, attention_mask=mask, use_cache=False,
                              lora=lora_batch(rt, adapters, idx)).last_hidden_state  # (B, T, C)
            vectors = pool(hidden, mask, c.pooling, c.normalize).cpu()
            for j, i in enumerate(idx):
                results[i]["embedding"] = vectors[j].tolist()
