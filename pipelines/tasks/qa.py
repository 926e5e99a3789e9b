"""The qa task: extractive question answering over windows of the context, the best span of all windows."""

from __future__ import annotations

import math

import pyarrow as pa

import bloom

from .base import Task, run_windows, windows as split_windows
from .settings import Strict
from .spans import best_span


class QaItem(Strict):
    question: str
    context: str


class Qa(Task):
    name = "qa"
    Item = QaItem
    fields = [("answer", pa.string()), ("score", pa.float32()), ("start", pa.int32()), ("end", pa.int32())]

    def model_class(self, c):
        return bloom.BloomForQuestionAnswering

    def input_columns(self, c):
        return [c.question_column, c.context_column]

    def row_input(self, row, c, text):
        return text(row, c.question_column), text(row, c.context_column)

    def item_row(self, item, c):
        return {c.question_column: item.question, c.context_column: item.context}

    def label(self, rt, pairs, results, c, adapters=None):
        windows = split_windows(rt, pairs, results, c, pair=True)
        logits = run_windows(rt, windows, c, lambda out, j, n: (out.start_logits[j, -n:].float().cpu().numpy(),
                                                                     out.end_logits[j, -n:].float().cpu().numpy()),
                             adapters)
        for i, ws in windows.items():
            best = (0, 0, -math.inf)
            for (ids, offsets, seq), (start, end) in zip(ws, logits[i]):
                context = [s == 1 for s in seq]
                if any(context):
                    span = best_span(start, end, offsets, context, c.max_answer_len)
                    best = max(best, span, key=lambda s: s[2])
            if best[2] == -math.inf:
                results[i]["error"] = "no context token fits in the window after the question"
                continue
            s, e, score = best
            results[i].update(answer=pairs[i][1][s:e], score=score, start=s, end=e)
