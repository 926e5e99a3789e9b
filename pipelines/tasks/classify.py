"""The classify task: a sequence-classification head, or zero-shot with a causal LM that ranks candidate
labels by the likelihood of their tokens after the prompt."""

from __future__ import annotations

import pyarrow as pa
import torch

import bloom

from .base import Prompted, batches, encode_capped, lora_batch
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
        once per row; its KV cache is shared by every label's continuation."""
        labels, label_lists = c.candidate_labels, self.label_ids(rt, c)
        K, L = len(label_lists), max(map(len, label_lists))
        label_ids = torch.full((K, L), rt.pad_id, dtype=torch.long)
        label_mask = torch.zeros((K, L), dtype=torch.long)
        for k, ids in enumerate(label_lists):  # right-padded: padding after a label cannot affect it
            label_ids[k, : len(ids)], label_mask[k, : len(ids)] = torch.tensor(ids), 1
        label_ids, label_mask = label_ids.to(rt.input_device), label_mask.to(rt.input_device)
        for idx, ids, mask in batches(rt, encoded, c, extra=L):
            B = len(idx)
            out = rt.model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1,
                           lora=lora_batch(rt, adapters, idx))
            first = out.logits[:, -1].float().log_softmax(-1)  # (B, V): log p(first label token | prompt)
            total = first[:, label_ids[:, 0]]  # (B, K)
            if L > 1:
                cache = out.past_key_values.select(torch.arange(B).repeat_interleave(K))
                cont_ids = label_ids[:, :-1].repeat(B, 1)  # (B*K, L-1): feed all but the last label token
                cont_mask = torch.cat([mask.repeat_interleave(K, 0), label_mask[:, :-1].repeat(B, 1)], 1)
                lora = lora_batch(rt, adapters, [i for i in idx for _ in range(K)])  # as the cache's rows
                logp = rt.model(cont_ids, past_key_values=cache, attention_mask=cont_mask,
                                lora=lora).logits.float().log_softmax(-1)
                targets = label_ids[:, 1:].repeat(B, 1)  # (B*K, L-1)
                picked = logp.gather(-1, targets[..., None]).squeeze(-1) * label_mask[:, 1:].repeat(B, 1)
                total = total + picked.sum(-1).view(B, K)
            probs = total.softmax(-1)
            for j, i in enumerate(idx):
                p = probs[j].tolist()
                best = max(range(K), key=p.__getitem__)
                results[i].update(label=labels[best], score=p[best], labels=[labels[best]],
                                  scores=[{"label": lab, "score": v} for lab, v in zip(labels, p)])
