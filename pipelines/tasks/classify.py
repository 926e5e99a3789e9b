"""The classify task: a sequence-classification head, or zero-shot with a causal LM that ranks candidate
labels by the likelihood of their tokens after the prompt."""

from __future__ import annotations

import pyarrow as pa
import torch

import bloom
from bloom import KVCache
from bloom.model import alibi_slopes, attention

from .base import Prompted, batches, encode_capped, lora_batch
from .settings import SettingError

LABEL_SCORE = pa.struct([("label", pa.string()), ("score", pa.float32())])


class Classify(Prompted):
    """A sequence-classification head, or zero-shot with a causal LM when candidate_labels are given."""

    name = "classify"
    classifies = True
    demo_labels = {0: "negative", 1: "neutral", 2: "positive"}
    head_hint = " (or give candidate_labels for zero-shot classification with a causal LM)"
    fields = [("label", pa.string()), ("score", pa.float32()), ("labels", pa.list_(pa.string())),
              ("scores", pa.list_(LABEL_SCORE))]

    def model_class(self, c):
        return bloom.BloomForCausalLM if c.candidate_labels else bloom.BloomForSequenceClassification

    def check_settings(self, c):
        if len(c.candidate_labels) == 1:
            raise SettingError("zero-shot classification needs at least two candidate_labels", "candidate_labels")

    def prepare(self, rt, c, cap=None):
        rt.memo["zero_shot"] = bool(c.candidate_labels)
        if c.candidate_labels:
            self.label_ids(rt, c)  # fail now on labels without tokens

    def check_request(self, rt, c):
        if bool(c.candidate_labels) != rt.memo["zero_shot"]:
            raise SettingError("candidate_labels need a causal LM (zero-shot); this classifier has fixed labels"
                               if c.candidate_labels else "this zero-shot classifier needs candidate_labels",
                               "candidate_labels")
        if c.candidate_labels:
            self.label_ids(rt, c)

    @staticmethod
    def label_ids(rt, c) -> list[list[int]]:
        """Each candidate label's token ids (after the label prefix), computed once per set of labels."""
        key = ("candidate_label_ids", c.label_prefix, tuple(c.candidate_labels))
        if key not in rt.memo:
            ids = [rt.tokenizer.encode(c.label_prefix + label) for label in c.candidate_labels]
            if any(not t for t in ids):
                raise SettingError("every candidate label must have at least one token", "candidate_labels")
            rt.memo[key] = ids
        return rt.memo[key]

    def label(self, rt, texts, results, c, adapters=None):
        encoded = encode_capped(rt, texts, results, c)
        if c.candidate_labels:
            return self._zero_shot(rt, encoded, results, c, adapters)
        cfg = rt.model.config
        multi = cfg.problem_type == "multi_label_classification"
        regression = cfg.problem_type == "regression" or cfg.num_labels == 1
        for idx, ids, mask in batches(rt, encoded, c):
            logits = rt.model(ids, attention_mask=mask, lora=lora_batch(rt, adapters, idx)).logits.float()  # (B, labels)
            probs = logits if regression else (logits.sigmoid() if multi else logits.softmax(-1))
            for j, i in enumerate(idx):
                p = probs[j].tolist()
                best = max(range(len(p)), key=p.__getitem__)
                chosen = [cfg.id2label[k] for k, v in enumerate(p) if v >= c.threshold] if multi else [cfg.id2label[best]]
                results[i].update(label=cfg.id2label[best], score=p[best], labels=chosen,
                                  scores=[{"label": cfg.id2label[k], "score": v} for k, v in enumerate(p)])

    def _zero_shot(self, rt, encoded, results, c, adapters=None):
        """Rank candidate labels by the log-likelihood of their tokens after the prompt. The prompt is run
        once per row; its KV cache is shared by every label's continuation. With prefix_cache, the tokens
        every row starts with (a few-shot template) are run once for all of them: each batch starts from
        a copy of their keys and values and runs only its rows' own tokens."""
        labels, label_lists = c.candidate_labels, self.label_ids(rt, c)
        K, L = len(label_lists), max(map(len, label_lists))
        label_ids = torch.full((K, L), rt.pad_id, dtype=torch.long)
        label_mask = torch.zeros((K, L), dtype=torch.long)
        for k, ids in enumerate(label_lists):  # right-padded: padding after a label cannot affect it
            label_ids[k, : len(ids)], label_mask[k, : len(ids)] = torch.tensor(ids), 1
        label_ids, label_mask = label_ids.to(rt.input_device), label_mask.to(rt.input_device)
        # A prefix's keys and values depend on the adapter that ran it: rows share one only when they
        # share their adapter (the base model or one adapter for the call; mixed adapters run whole rows).
        shared = len({(adapters or {}).get(i) for i in encoded}) == 1
        P = common_prefix(list(encoded.values())) if c.prefix_cache and len(encoded) > 1 and shared else 0
        prefix = None
        if P:
            first = next(iter(encoded))
            prefix = rt.model(torch.tensor([encoded[first][:P]], device=rt.input_device), use_cache=True,
                              logits_to_keep=1, lora=lora_batch(rt, adapters, [first])).past_key_values
        own = {i: ids[P:] for i, ids in encoded.items()}
        M = L - 1  # label tokens fed after the prompt (all but each label's last)
        for idx, ids, mask in batches(rt, own, c, extra=P + L):
            B, T = ids.shape
            # Room for the rows' tokens and every label's after what is cached: appending copies nothing.
            room = T + K * M
            cache = KVCache(rt.model.config.n_layer, capacity=room) if prefix is None else repeat(prefix, B, room)
            if prefix is not None:  # the shared tokens are real tokens of every row
                mask = torch.cat([torch.ones((B, P), dtype=mask.dtype, device=mask.device), mask], 1)
            out = rt.model(ids, past_key_values=cache, attention_mask=mask, use_cache=True, logits_to_keep=1,
                           lora=lora_batch(rt, adapters, idx))
            first = out.logits[:, -1].float().log_softmax(-1)  # (B, V): log p(first label token | prompt)
            total = first[:, label_ids[:, 0]]  # (B, K)
            if M:
                # Every row's K labels side by side in one packed forward, each over its row's cache (in
                # place, never copied per label) and its own earlier tokens.
                step = LabelsAttention(cache, mask, label_mask[:, :-1], rt.model.config.n_head,
                                       cache.keys[0].dtype)
                # packed tokens row by row, each row's K labels of M tokens: each its row's adapter
                lora = lora_batch(rt, adapters, [i for i in idx for _ in range(K * M)], per_token=True)
                h = rt.model.transformer(label_ids[:, :-1].reshape(1, -1).repeat(1, B), packed=step,
                                         lora=lora).last_hidden_state
                logp = rt.model.lm_head(h).float().log_softmax(-1).view(B, K, M, -1)
                picked = logp.gather(-1, label_ids[None, :, 1:, None].expand(B, K, M, 1)).squeeze(-1)
                total = total + (picked * label_mask[:, 1:]).sum(-1)  # (B, K)
            probs = total.softmax(-1)
            for j, i in enumerate(idx):
                p = probs[j].tolist()
                best = max(range(K), key=p.__getitem__)
                results[i].update(label=labels[best], score=p[best], labels=[labels[best]],
                                  scores=[{"label": lab, "score": v} for lab, v in zip(labels, p)])


def common_prefix(rows: list[list[int]]) -> int:
    """How many tokens every row starts with, leaving each row at least its last token (whose logits
    the labels need)."""
    n, first = min(map(len, rows)) - 1, rows[0]
    for row in rows[1:]:
        if row[:n] != first[:n]:
            n = next(k for k in range(n) if row[k] != first[k])
    return max(n, 0)


class LabelsAttention:
    """The `packed=` attention (see `BloomModel.forward`) of K candidate labels' continuations of M tokens
    after each of B prompts, packed as one row of B*K*M tokens (row, label, token). Each continuation
    attends as if it were its own sequence after its prompt: over the prompt's real tokens, kept in the
    prompt's cache, and its own label's earlier real tokens (not the other labels'), with ALiBi positions
    continuing the prompt's (n real tokens: the label's token j at n + j). The labels' keys and values are
    written into the cache's room after the prompt, so nothing is copied per label.

    cache: the prompts' KVCache (B rows, S tokens, room for K*M more); mask (B, S) of the prompts;
    label_mask (K, M): 1 where a label has its token j."""

    def __init__(self, cache: KVCache, mask: torch.Tensor, label_mask: torch.Tensor, n_head: int, dtype):
        (B, S), (K, M) = mask.shape, label_mask.shape
        self.cache, self.S, self.B, self.KM = cache, S, B, K * M
        real = mask.to(torch.int64)
        j = torch.arange(M, device=mask.device).repeat(K)  # (KM,): each packed token's place in its label
        label = torch.arange(K, device=mask.device).repeat_interleave(M)
        positions = torch.cat([(real.cumsum(-1) - 1) * real, real.sum(-1, keepdim=True) + j], 1).float()  # (B, S+KM)
        alibi = (alibi_slopes(n_head).to(mask.device)[None, :, None] * positions[:, None]).to(dtype)
        # (KM queries, KM keys): the same label, an earlier or the same token, a real one
        own = (label[:, None] == label[None]) & (j[None] <= j[:, None]) & label_mask.reshape(-1).bool()[None]
        visible = torch.cat([real.bool()[:, None, :].expand(B, K * M, S), own.expand(B, K * M, K * M)], -1)
        self.bias = alibi[:, :, None].expand(B, n_head, K * M, S + K * M).clone()
        self.bias.masked_fill_(~visible[:, None], torch.finfo(dtype).min)  # (B, H, KM, S + KM)

    def attend(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        """q, k, v (1, H, B*K*M, D) → (1, H, B*K*M, D)."""
        H, D, end = q.shape[1], q.shape[3], self.S + self.KM
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        for buf, new in ((keys, k), (values, v)):
            buf[:, :, self.S : end] = new[0].reshape(H, self.B, self.KM, D).transpose(0, 1)
        q = q[0].reshape(H, self.B, self.KM, D).transpose(0, 1)  # (B, H, KM, D)
        y, _ = attention(q, keys[:, :, :end], values[:, :, :end], self.bias.to(keys.device), scale)
        return y.transpose(0, 1).reshape(1, H, self.B * self.KM, D)


def repeat(prefix: KVCache, rows: int, room: int) -> KVCache:
    """A cache of `rows` copies of a one-row cache, with `room` free positions after its tokens."""
    out = KVCache(len(prefix.keys), capacity=prefix.length + room)
    out.length = prefix.length
    for layer, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
        for buffers, t in ((out.keys, k), (out.values, v)):
            buf = t.new_empty(rows, t.shape[1], prefix.length + room, t.shape[3])
            buf[:, :, : prefix.length].copy_(t[:, :, : prefix.length])  # broadcast over the rows
            buffers[layer] = buf
    return out
