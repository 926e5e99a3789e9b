"""From per-token model outputs to character spans: window merging, NER entities, extractive QA answers.

Three pure functions (numpy + stdlib only, no model and no tokenizer needed), used by the token
classification and question answering pipelines:

* `merge_windows` -- stitch the overlapping token windows of one long text back into one sequence;
* `ner_entities`  -- per-token label probabilities -> entities, like transformers'
  `TokenClassificationPipeline` (aggregation strategies "none", "simple", "first", "average", "max");
* `best_span`     -- start/end logits of one window -> the best answer span, scored like transformers'
  extractive question answering (`select_starts_ends` / `decode_spans`).

Character offsets follow BLOOM's tokenizer: byte-level BPE whose offsets keep a word's leading space
inside the word's first token (" John" covers the space). Every span returned here is a pair of
offsets into the caller's text and is kept exactly as the offsets say, leading space included, so
that `text[start:end]` is always the reported string.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["AGGREGATION_STRATEGIES", "merge_windows", "ner_entities", "best_span"]

AGGREGATION_STRATEGIES = ("none", "simple", "first", "average", "max")


# ---------------------------------------------------------------------- helpers


def _as_offsets(offsets, name: str = "offsets") -> list[tuple[int, int]]:
    """(T, 2) offsets as a list, tuple pairs, numpy array or torch tensor -> list of T (start, end) int pairs."""
    if hasattr(offsets, "tolist"):  # numpy arrays and torch tensors alike, without importing torch
        offsets = offsets.tolist()
    pairs = []
    for pair in offsets:
        if len(pair) != 2:
            raise ValueError(f"{name} must be (start, end) pairs, got {pair!r}")
        pairs.append((int(pair[0]), int(pair[1])))
    return pairs


def _as_probs(probs, rows: int, name: str = "probs") -> np.ndarray:
    """A (T, L) probability array; ValueError unless it is 2-D with exactly `rows` rows."""
    array = np.asarray(probs)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D (tokens, labels), got shape {array.shape}")
    if array.shape[0] != rows:
        raise ValueError(f"{name} has {array.shape[0]} rows but there are {rows} offsets; they must match")
    return array


def _real(offsets: list[tuple[int, int]]) -> list[int]:
    """Indices of the tokens that cover text. Padding and special tokens come with empty offsets
    ((0, 0) from the tokenizer); a real byte-level token always covers at least one character."""
    return [i for i, (start, end) in enumerate(offsets) if end > start]


# ---------------------------------------------------------------------- windows


def merge_windows(
    windows: Sequence[tuple[Sequence[tuple[int, int]], np.ndarray]], *, overlap: int | None = None
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Stitch the overlapping token windows of ONE long text back into one token sequence.

    windows: in text order, each `(offsets, probs)`: the char offsets (T_i, 2) of the window's tokens
        and their per-token label probabilities (T_i, L) -- the rows of a tokenizer call with
        `truncation=True, max_length=M, stride=S, return_overflowing_tokens=True` run through the model,
        so each window starts with the last S tokens of the one before. Tokens with empty offsets
        (padding, special tokens: (0, 0)) are dropped first, so padded rows can be passed as they are.
    overlap: how many tokens consecutive windows share (the tokenizer's `stride`). None (the default)
        infers it for each pair of windows as the longest suffix of the previous window whose offsets
        equal the prefix of the next one. That is exact as long as S >= 4 (fewer than 4 consecutive
        tokens can share the same offsets: that happens only inside one character of up to 4 UTF-8
        bytes); pass `overlap` explicitly for smaller strides, e.g. 0.

    Returns `(offsets, probs)`: the unique tokens in text order, offsets as a list of N (start, end)
    tuples and probs (N, L) in the windows' dtype -- for one-window input, that window minus its
    empty-offset tokens.

    Rule for tokens present in two windows: each token keeps the probabilities from the EARLIEST window
    that contains it, i.e. the window in which it has the most left context. BLOOM is causal: a token's
    output depends only on the tokens to its left within its window (and, with ALiBi, only on their
    relative distances), so the earlier window sees a strict superset of what the later window sees
    for that token; the right edge of a window costs a causal model nothing. Consequences: every token
    of the first window gets exactly the probabilities a whole-text run would give, and every later
    token is predicted with at least min(S, M - S) tokens of left context (S with the usual S <= M/2),
    where the "farthest from either edge" rule of bidirectional encoders would throw away up to S/2 of
    that context for no gain.
    """
    if not windows:
        raise ValueError("merge_windows needs at least one window")
    if overlap is not None and overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")

    merged_offsets: list[tuple[int, int]] = []
    merged_rows: list[np.ndarray] = []
    previous_length = 0
    for number, (window_offsets, window_probs) in enumerate(windows):
        offsets = _as_offsets(window_offsets, f"windows[{number}] offsets")
        probs = _as_probs(window_probs, len(offsets), f"windows[{number}] probs")
        keep = _real(offsets)
        offsets = [offsets[i] for i in keep]
        probs = probs[keep]
        if merged_rows and probs.shape[1] != merged_rows[0].shape[1]:
            raise ValueError(
                f"windows[{number}] has {probs.shape[1]} labels but earlier windows have {merged_rows[0].shape[1]}"
            )

        if number == 0:
            shared = 0
        elif overlap is not None:
            shared = min(overlap, previous_length, len(offsets))
            if offsets[:shared] != merged_offsets[len(merged_offsets) - shared :]:
                raise ValueError(
                    f"windows[{number}] does not start with the last {shared} tokens of windows[{number - 1}]"
                )
        else:
            shared = _shared_tokens(merged_offsets, previous_length, offsets)

        new_offsets = offsets[shared:]
        if new_offsets and merged_offsets and new_offsets[0][0] < merged_offsets[-1][0]:
            # Byte-level offsets never go backwards; if they do, these are not consecutive windows of one text.
            raise ValueError(
                f"windows[{number}] does not continue windows[{number - 1}] "
                f"(token at char {new_offsets[0][0]} after one at char {merged_offsets[-1][0]})"
            )
        # The shared tokens were already taken from the earlier window (most left context): skip them here.
        merged_offsets.extend(new_offsets)
        merged_rows.append(probs[shared:])
        previous_length = len(offsets)

    return merged_offsets, np.concatenate(merged_rows, axis=0)


def _shared_tokens(merged: list[tuple[int, int]], previous_length: int, offsets: list[tuple[int, int]]) -> int:
    """Longest k <= min(previous_length, len(offsets)) with merged[-k:] == offsets[:k] (0 if none)."""
    for k in range(min(previous_length, len(offsets)), 0, -1):
        if merged[len(merged) - k :] == offsets[:k]:
            return k
    return 0


# ---------------------------------------------------------------------- NER


def ner_entities(
    text: str,
    offsets: Sequence[tuple[int, int]],
    probs: np.ndarray,
    id2label: Mapping[int, str],
    aggregation_strategy: str = "simple",
    ignore_labels: Sequence[str] = ("O",),
) -> list[dict]:
    """Entities of `text` from per-token label probabilities, as transformers' TokenClassificationPipeline.

    text: the text that was tokenized. offsets: (T, 2) char offsets of its tokens into `text`; tokens
    with empty offsets ((0, 0): padding, special tokens) are skipped. probs: (T, L) label probabilities
    (softmaxed logits). id2label: label id -> name, e.g. {0: "O", 1: "B-PER", 2: "I-PER"} (str keys
    as in a config.json are accepted too). aggregation_strategy (case-insensitive):

    * "none":    one item per token, labelled with its argmax label (full name, "B-PER");
    * "simple":  argmax label per token, then adjacent tokens with the same tag merged (a "B-" label
                 always opens a new entity); the group's label is the tag without "B-"/"I-" and its
                 score the mean of the tokens' scores;
    * "first" / "average" / "max": tokens are first merged into words, each word labelled by its first
                 token / by the average of its tokens' probabilities / by its most confident token,
                 then words grouped as in "simple".

    ignore_labels: items whose label ("none") or group label (other strategies: "PER", not "B-PER")
    is listed are dropped; () keeps everything.

    Returns a list, in text order, of {"entity_group": str, "score": float, "word": str, "start": int,
    "end": int} with word == text[start:end].

    Differences from the reference pipeline, on purpose:
    * the label key is "entity_group" for every strategy (the reference says "entity" and adds "index"
      for "none");
    * `word` is the text slice, leading space included (" John" for BLOOM's " John" token), where the
      reference decodes the tokens: that is the same string except when a group starts or ends inside
      a multi-byte character split across byte-level tokens (the reference then shows U+FFFD), and for
      "none", where the reference shows the raw byte-level token ("ĠJohn"). start/end are the
      reference's exactly.

    Word grouping ("first"/"average"/"max"): BLOOM's BPE has no continuing-subword prefix, so, like the
    reference's fallback, a token continues the previous word when it does not start the text and the
    two characters around its start, text[start-1:start+1], contain no plain space " ". With BLOOM's
    offsets a word-initial token starts on its leading space, so " John" opens a word and "ohn" or ","
    continue one; text without spaces (Chinese) is one word per space-free run; only " " counts, not
    tabs or newlines.
    """
    strategy = aggregation_strategy.lower() if isinstance(aggregation_strategy, str) else aggregation_strategy
    if strategy not in AGGREGATION_STRATEGIES:
        raise ValueError(
            f"unknown aggregation_strategy {aggregation_strategy!r}; allowed: {', '.join(AGGREGATION_STRATEGIES)}"
        )
    offsets = _as_offsets(offsets)
    probs = _as_probs(probs, len(offsets))
    labels = _label_names(id2label, probs.shape[1])
    for start, end in offsets:
        if end > len(text) or start < 0:
            raise ValueError(f"offset ({start}, {end}) is outside the text (length {len(text)})")

    # One record per real token: (start, end, probabilities, continues-the-previous-word).
    tokens = []
    for i in _real(offsets):
        start, end = offsets[i]
        tokens.append((start, end, probs[i], start > 0 and " " not in text[start - 1 : start + 1]))

    if strategy in ("none", "simple"):
        # Each token is its own unit, labelled by its argmax.
        units = []
        for start, end, scores, _ in tokens:
            best = int(np.argmax(scores))
            units.append((labels[best], float(scores[best]), start, end))
    else:
        units = [_word_unit(group, strategy, labels) for group in _words(tokens)]

    if strategy == "none":
        items = [
            {"entity_group": label, "score": score, "word": text[start:end], "start": start, "end": end}
            for label, score, start, end in units
        ]
    else:
        items = [_entity(group, text) for group in _group(units)]
    return [item for item in items if item["entity_group"] not in ignore_labels]


def _label_names(id2label: Mapping, count: int) -> list[str]:
    """Label names for columns 0..count-1 of the probabilities; ValueError if one has no name."""
    names = []
    for i in range(count):
        if i in id2label:
            names.append(id2label[i])
        elif str(i) in id2label:  # id2label read from JSON keeps string keys
            names.append(id2label[str(i)])
        else:
            raise ValueError(f"probs has {count} label columns but id2label has no name for id {i}")
    return names


def _words(tokens: list[tuple]) -> list[list[tuple]]:
    """Tokens -> runs of tokens forming one word each (a run opens at every non-continuing token)."""
    words: list[list[tuple]] = []
    for token in tokens:
        if words and token[3]:
            words[-1].append(token)
        else:
            words.append([token])
    return words


def _word_unit(word: list[tuple], strategy: str, labels: list[str]) -> tuple[str, float, int, int]:
    """One word (its tokens) -> (label, score, start, end) under "first", "average" or "max"."""
    if strategy == "first":
        scores = word[0][2]
    elif strategy == "max":
        # The most confident token decides; on a tie the earlier token wins (as Python's max does).
        scores = max(word, key=lambda token: token[2].max())[2]
    else:  # average
        scores = np.nanmean(np.stack([token[2] for token in word]), axis=0)
    best = int(np.argmax(scores))
    return labels[best], float(scores[best]), word[0][0], word[-1][1]


def _tag(label: str) -> tuple[str, str]:
    """"B-PER" -> ("B", "PER"), "I-PER" -> ("I", "PER"); a label without those prefixes ("O", "PER")
    counts as a continuation of itself: ("I", label)."""
    if label.startswith("B-"):
        return "B", label[2:]
    if label.startswith("I-"):
        return "I", label[2:]
    return "I", label


def _group(units: list[tuple[str, float, int, int]]) -> list[list[tuple]]:
    """Adjacent units with the same tag, where every unit after the first is not a "B-", form a group."""
    groups: list[list[tuple]] = []
    for unit in units:
        bi, tag = _tag(unit[0])
        if groups and bi != "B" and tag == _tag(groups[-1][-1][0])[1]:
            groups[-1].append(unit)
        else:
            groups.append([unit])
    return groups


def _entity(group: list[tuple[str, float, int, int]], text: str) -> dict:
    """A group of units -> its entity dict: label of its first unit without the B-/I- prefix, mean score,
    span from the first unit's start to the last unit's end."""
    start, end = group[0][2], group[-1][3]
    return {
        # Only a single "B-"/"I-"-style prefix is cut, the way the reference splits on the first "-".
        "entity_group": group[0][0].split("-", 1)[-1],
        "score": float(np.nanmean([unit[1] for unit in group])),
        "word": text[start:end],
        "start": start,
        "end": end,
    }


# ---------------------------------------------------------------------- QA


def best_span(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    offsets: Sequence[tuple[int, int]],
    context_mask: np.ndarray,
    max_answer_len: int = 30,
) -> tuple[int, int, float]:
    """The best answer span of one extractive-QA window, scored like transformers' question answering.

    start_logits, end_logits: (T,) model logits for "the answer starts/ends at this token".
    offsets: (T, 2) char offsets of the tokens; for context tokens, offsets into the context string
        (what a fast tokenizer returns for the second sequence of a pair).
    context_mask: (T,) bool, True for the tokens that may be part of the answer (the context).
    max_answer_len: longest answer, in tokens (>= 1).

    Returns (start_char, end_char, score): context[start_char:end_char] is the answer and
    score = p_start * p_end, where p_start and p_end are softmaxes of the start and end logits over the
    context tokens only; among spans with both ends in the context, end >= start and at most
    `max_answer_len` tokens, the highest score wins (ties: smallest start, then smallest end).

    Same spans and scores as the reference (`select_starts_ends` + `decode_spans`, which back
    transformers' question answering pipelines) with `align_to_words=False`: the span is exactly its
    tokens' offsets, leading space of a word-initial token included. Two deliberate differences: the
    reference zeroes the probabilities of token 0 after the softmax (BERT's [CLS], its "no answer"
    slot) -- BLOOM has no such token, so token 0 stays a candidate when it is context (nothing changes
    when the question comes first); and `align_to_words=True` (widening the span to whole words)
    would need the tokenizer's word ids, which these arguments do not carry.
    """
    start_logits = np.asarray(start_logits, dtype=np.float64)
    end_logits = np.asarray(end_logits, dtype=np.float64)
    context_mask = np.asarray(context_mask, dtype=bool)
    offsets = _as_offsets(offsets)
    if start_logits.ndim != 1 or end_logits.ndim != 1 or context_mask.ndim != 1:
        raise ValueError("start_logits, end_logits and context_mask must be 1-D (tokens,)")
    T = len(offsets)
    if not (start_logits.shape[0] == end_logits.shape[0] == context_mask.shape[0] == T):
        raise ValueError(
            f"lengths differ: start_logits {start_logits.shape[0]}, end_logits {end_logits.shape[0]}, "
            f"offsets {T}, context_mask {context_mask.shape[0]}"
        )
    if max_answer_len < 1:
        raise ValueError(f"max_answer_len must be >= 1, got {max_answer_len}")
    if not context_mask.any():
        raise ValueError("context_mask selects no token: there is no context to answer from")

    p_start = _masked_softmax(start_logits, context_mask)
    p_end = _masked_softmax(end_logits, context_mask)

    # Only the band end - start in [0, max_answer_len) can win, so score that band, (T, W), instead of
    # the reference's full (T, T) outer product: same numbers, memory linear in T.
    W = min(max_answer_len, T)
    ends = np.arange(T)[:, None] + np.arange(W)[None, :]  # (T, W): end index of the span (start, start + d)
    clipped = np.minimum(ends, T - 1)
    valid = (ends < T) & context_mask[:, None] & context_mask[clipped]
    # Invalid spans score -1, not 0, so that a valid span wins even if every product underflows to 0.
    scores = np.where(valid, p_start[:, None] * p_end[clipped], -1.0)
    # Row-major argmax = smallest start, then smallest end among ties, the reference's order too.
    s, d = np.unravel_index(int(np.argmax(scores)), scores.shape)
    e = s + d
    return offsets[s][0], offsets[e][1], float(scores[s, d])


def _masked_softmax(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Softmax over the positions where `mask` is True; exactly 0 elsewhere. (T,) -> (T,).

    The reference writes -10000 into masked logits before a plain softmax, which gives the same
    probabilities (exp(-10000 - max) is 0 in float32 and float64)."""
    probs = np.zeros_like(logits)
    kept = logits[mask]
    exp = np.exp(kept - kept.max())
    probs[mask] = exp / exp.sum()
    return probs
