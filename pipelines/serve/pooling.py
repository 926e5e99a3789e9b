"""vLLM's pooling API over our tasks: the request models and answer shapes of POST /classify (over the task
that classifies) and POST /score (over the task that embeds: the cosine similarity of two texts'
embeddings, as vLLM scores with an embedding model). The routes are in `app`; their errors are the
endpoint's one shape (`errors`).
"""

from __future__ import annotations

import time
import uuid
from typing import Union

import numpy as np

from .errors import ApiError
from .openai import _OpenAIRequest

CLASSIFY_ID, SCORE_ID = "classify-", "score-"  # vLLM's answer id prefixes


class ClassifyRequest(_OpenAIRequest):
    """vLLM's classification request: a text or a list of texts."""

    input: Union[str, list[str]]
    model: str | None = None
    user: str | None = None


class ScoreRequest(_OpenAIRequest):
    """vLLM's score request: text_1 against text_2, one to one, one to many, or many to as many."""

    text_1: Union[str, list[str]]
    text_2: Union[str, list[str]]
    model: str | None = None
    user: str | None = None


def score_pairs(text_1: str | list[str], text_2: str | list[str]) -> list[tuple[int, int]]:
    """The (text_1 index, text_2 index) of each pair to score, as vLLM pairs them: one text_1 against every
    text_2, else text_1[i] against text_2[i]. 400 naming text_2 when the lengths pair neither way, or a
    side is empty."""
    first = [text_1] if isinstance(text_1, str) else text_1
    second = [text_2] if isinstance(text_2, str) else text_2
    for name, side in (("text_1", first), ("text_2", second)):
        if not side:
            raise ApiError(400, f"{name} is empty", name)
    if len(first) == 1:
        return [(0, j) for j in range(len(second))]
    if len(first) != len(second):
        raise ApiError(400, f"text_1 has {len(first)} texts and text_2 {len(second)}: send one text_1, or as "
                            "many as text_2 (pairs 1:1, 1:N or N:N)", "text_2")
    return [(i, i) for i in range(len(first))]


def cosine(a: list[float], b: list[float]) -> float:
    """The cosine similarity of two vectors, in float64 (0 where one is all zeros)."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y / norms) if norms else 0.0


def classify_item(index: int, result: dict) -> dict:
    """One entry of a /classify answer's data from the classify task's result: its label and every class's
    probability in class order (the task's `scores`: softmax, or sigmoid for a multi-label head)."""
    probs = [s["score"] for s in result["scores"]]
    return {"index": index, "label": result["label"], "probs": probs, "num_classes": len(probs)}


def score_item(index: int, score: float) -> dict:
    return {"index": index, "object": "score", "score": score}


def answer(prefix: str, model: str, data: list[dict], prompt_tokens: int) -> dict:
    """A pooling answer in vLLM's shape: {"id", "object": "list", "created", "model", "data", "usage"};
    prefix: its id's (CLASSIFY_ID, SCORE_ID)."""
    return {"id": f"{prefix}{uuid.uuid4().hex[:24]}", "object": "list", "created": int(time.time()), "model": model,
            "data": data, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                                    "completion_tokens": 0, "prompt_tokens_details": None}}
