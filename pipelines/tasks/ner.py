"""The ner task: a token-classification head over windows of a long text, merged into entities
(`spans`)."""

from __future__ import annotations

import pyarrow as pa

import bloom

from .base import Task, run_windows, windows as split_windows
from .spans import merge_windows, ner_entities

ENTITY = pa.struct([("entity_group", pa.string()), ("score", pa.float32()), ("word", pa.string()),
                    ("start", pa.int32()), ("end", pa.int32())])


class Ner(Task):
    name = "ner"
    demo_labels = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC", 5: "B-ORG", 6: "I-ORG"}
    fields = [("entities", pa.list_(ENTITY))]

    def model_class(self, c):
        return bloom.BloomForTokenClassification

    def label(self, rt, texts, results, c, adapters=None):
        id2label = rt.model.config.id2label
        windows = split_windows(rt, texts, results, c)
        probs = run_windows(rt, windows, c, lambda out, j, n: out.logits[j, -n:].float().softmax(-1).cpu().numpy(),
                            adapters)
        for i, ws in windows.items():
            offsets, p = merge_windows([(w[1], q) for w, q in zip(ws, probs[i])], overlap=c.stride)
            results[i]["entities"] = ner_entities(texts[i], offsets, p, id2label, c.aggregation_strategy,
                                                  tuple(c.ignore_labels))
