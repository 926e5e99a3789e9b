"""The classify task: a sequence-classification head, or zero-shot with a causal LM that ranks candidate
labels by the likelihood of their tokens after the prompt."""

from __future__ import annotations

import pyarrow as pa
import torch

import bloom
from bloom import KVCache

from .base import Prompted, batches, encode_capped
from .settings import SettingError

LABEL_SCORE = pa.struct([("label", pa.string()), ("score", pa.float32())])


class Classify(Prompted):
    """A sequence-classification head, or zero-shot with a causal LM when candidate_labels are given."""

    name = "classify"
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

    def label(self, rt, texts, results, c):
        encoded = encode_capped(rt, texts, results, c)
        if c.candidate_labels:
            return self._zero_shot(rt, encoded, results, c)
        cfg = rt.model.config
        multi = cfg.problem_type == "multi_label_classification"
        regression = cfg.problem_type == "regression" or cfg.num_labels == 1
        for idx, ids, mask in batches(rt, encoded, c):
            logits = rt.model(ids, attention_mask=mask).logits.float()  # (B, num_labels)
            probs = logits if regression else (logits.sigmoid() if multi else logits.softmax(-1))
            for j, i in enumerate(idx):
                p = probs[j].tolist()
                best = max(range(len(p)), key=p.__getitem__)
                chosen = [cfg.id2label[k] for k, v in enumerate(p) if v >= c.threshold] if multi else [cfg.id2label[best]]
                results[i].update(label=cfg.id2label[best], score=p[best], labels=chosen,
                                  scores=[{"label": cfg.id2label[k], "score": v} for k, v in enumerate(p)])

    def _zero_shot(self, rt, encoded, results, c):
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
        P = common_prefix(list(encoded.values())) if c.prefix_cache and len(encoded) > 1 else 0
        prefix = None
        if P:
            head = next(iter(encoded.values()))[:P]
            prefix = rt.model(torch.tensor([head], device=rt.input_device), use_cache=True,
                              logits_to_keep=1).past_key_values  # (1, H, P, D) per layer
        own = {i: ids[P:] for i, ids in encoded.items()}
        for idx, ids, mask in batches(rt, own, c, extra=P + L):
            B, T = ids.shape
            # Room for the rows' tokens and the labels' after what is cached: appending copies nothing.
            cache = KVCache(rt.model.config.n_layer, capacity=T + L) if prefix is None else repeat(prefix, B, T + L)
            if prefix is not None:  # the shared tokens are real tokens of every row
                mask = torch.cat([torch.ones((B, P), dtype=mask.dtype, device=mask.device), mask], 1)
            out = rt.model(ids, past_key_values=cache, attention_mask=mask, use_cache=True, logits_to_keep=1)
            first = out.logits[:, -1].float().log_softmax(-1)  # (B, V): log p(first label token | prompt)
            total = first[:, label_ids[:, 0]]  # (B, K)
            if L > 1:
                cache = out.past_key_values.select(torch.arange(B).repeat_interleave(K))
                cont_ids = label_ids[:, :-1].repeat(B, 1)  # (B*K, L-1): feed all but the last label token
                cont_mask = torch.cat([mask.repeat_interleave(K, 0), label_mask[:, :-1].repeat(B, 1)], 1)
                logp = rt.model(cont_ids, past_key_values=cache, attention_mask=cont_mask).logits.float().log_softmax(-1)
                targets = label_ids[:, 1:].repeat(B, 1)  # (B*K, L-1)
                picked = logp.gather(-1, targets[..., None]).squeeze(-1) * label_mask[:, 1:].repeat(B, 1)
                total = total + picked.sum(-1).view(B, K)
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
