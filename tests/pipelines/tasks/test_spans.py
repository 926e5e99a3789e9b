"""pipelines.tasks.spans against the reference (transformers' token classification pipeline and its extractive-QA
span scoring) on tiny random BLOOM checkpoints, plus hand-made cases with known answers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import bloom
from bloom.tiny import SAMPLE_TEXT, make_tiny_checkpoint
from pipelines.tasks.spans import AGGREGATION_STRATEGIES, best_span, merge_windows, ner_entities

ID2LABEL = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
SCORE_ATOL = 1e-4

SENTENCES = {
    "english-names": "My name is John Smith and I live in Paris with Mary O'Neil.",
    "french": "Le renard brun saute à Montréal, puis il repart chez Éloïse.",
    "chinese": "这个模型可以处理多种语言的文本。",
    "punctuation-spaces": "Hello,   world!!  Dr. Ada  Obi (Lagos)... Wait , what ?",
    "mixed-scripts": "Dr. Ada Obi visited 北京 and Mumbai 🙂 in 2024.",
}


def softmax(logits: torch.Tensor) -> np.ndarray:
    return logits.float().softmax(-1).numpy()


@pytest.fixture(scope="module")
def ner(tmp_path_factory):
    """Tiny token-classification checkpoint; ours and the reference's models and tokenizers on it."""
    import transformers

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("ner"), bloom.BloomForTokenClassification, id2label=ID2LABEL)
    # Random weights rarely predict "O" or "B-" labels; shift the classifier bias so that the sentences
    # get a realistic mix (O runs to filter out, B- labels that must open new entities, I- runs to merge).
    model = bloom.BloomForTokenClassification.from_pretrained(path).eval()
    with torch.no_grad():
        model.classifier.bias += torch.tensor([2.0, 1.0, 0.0, 0.0, 0.0])
    model.save_pretrained(path)

    model = bloom.BloomForTokenClassification.from_pretrained(path).eval()
    tokenizer = bloom.BloomTokenizerFast.from_pretrained(path)
    ref_model = transformers.BloomForTokenClassification.from_pretrained(path).eval()
    ref_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path / "tokenizer.json"),
        pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
    )

    def probs(text: str):
        """Our tokenizer's offsets (T, 2) and our model's label probabilities (T, L) for one text."""
        enc = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0]
        return enc["offset_mapping"][0].tolist(), softmax(logits)

    def reference(text: str, strategy: str, ignore_labels: list[str]):
        pipe = transformers.pipeline(
            "token-classification", model=ref_model, tokenizer=ref_tokenizer,
            aggregation_strategy=strategy, ignore_labels=ignore_labels,
        )
        with warnings.catch_warnings():
            # "Tokenizer does not support real words, using fallback heuristic": expected for BLOOM.
            warnings.simplefilter("ignore")
            return pipe(text)

    return dict(path=path, model=model, tokenizer=tokenizer, probs=probs, reference=reference,
                ref_tokenizer=ref_tokenizer)


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    import transformers

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("qa"), bloom.BloomForQuestionAnswering)
    return dict(
        model=bloom.BloomForQuestionAnswering.from_pretrained(path).eval(),
        tokenizer=bloom.BloomTokenizerFast.from_pretrained(path),
        ref_model=transformers.BloomForQuestionAnswering.from_pretrained(path).eval(),
    )


# ---------------------------------------------------------------------- NER vs the reference


@pytest.mark.parametrize("sentence", SENTENCES)
@pytest.mark.parametrize("strategy", AGGREGATION_STRATEGIES)
def test_ner_matches_reference_pipeline(ner, strategy, sentence):
    text = SENTENCES[sentence]
    offsets, probs = ner["probs"](text)
    for ignore in (["O"], []):
        ref = ner["reference"](text, strategy, ignore)
        ours = ner_entities(text, offsets, probs, ID2LABEL, strategy, tuple(ignore))
        assert len(ours) == len(ref), (ours, ref)
        for mine, theirs in zip(ours, ref):
            assert set(mine) == {"entity_group", "score", "word", "start", "end"}
            # "none": the reference names the label "entity" (and adds "index"); we say "entity_group".
            assert mine["entity_group"] == theirs.get("entity_group", theirs.get("entity"))
            assert (mine["start"], mine["end"]) == (theirs["start"], theirs["end"])
            assert isinstance(mine["score"], float)
            assert mine["score"] == pytest.approx(float(theirs["score"]), abs=SCORE_ATOL)
            # Our word is always the text slice, leading space included.
            assert mine["word"] == text[mine["start"] : mine["end"]]
            # The reference decodes tokens instead ("none": shows the raw byte-level token, "ĠJohn").
            # Same string, except where a span starts/ends inside a character split over byte-level
            # tokens: the reference then shows U+FFFD and we show the whole character.
            word = theirs["word"]
            if strategy == "none":
                word = ner["ref_tokenizer"].convert_tokens_to_string([word])
            if "\ufffd" not in word:
                assert mine["word"] == word


def test_ner_fixture_gives_a_realistic_label_mix(ner):
    """Guard for the parity test above: it only means something if every mechanism is exercised."""
    labels = np.concatenate([ner["probs"](text)[1].argmax(-1) for text in SENTENCES.values()])
    counts = np.bincount(labels, minlength=len(ID2LABEL))
    assert (counts >= 3).all(), counts  # O runs, B- openers, I- continuations of both tags
    entities = ner_entities(SENTENCES["english-names"], *ner["probs"](SENTENCES["english-names"]), ID2LABEL, "first")
    assert {e["entity_group"] for e in entities} == {"PER", "LOC"}
    # Leading spaces stay inside spans (BLOOM offsets), as in the reference.
    assert any(e["word"].startswith(" ") for e in entities)


# ---------------------------------------------------------------------- NER, hand-made

#   "Hi John Smith, bye" tokenized BLOOM-style: the leading space belongs to the word's first token.
HAND_TEXT = "Hi John Smith, bye"
HAND_OFFSETS = [(0, 2), (2, 5), (5, 7), (7, 13), (13, 14), (14, 18)]  # Hi| Jo|hn| Smith|,| bye
HAND_PROBS = np.array(
    [  #  O     B-PER  I-PER  B-LOC  I-LOC
        [0.90, 0.025, 0.025, 0.025, 0.025],  # "Hi"
        [0.10, 0.600, 0.100, 0.100, 0.100],  # " Jo"
        [0.05, 0.050, 0.100, 0.100, 0.700],  # "hn"     (continues " Jo": "oh" has no space)
        [0.10, 0.050, 0.800, 0.025, 0.025],  # " Smith"
        [0.70, 0.050, 0.150, 0.050, 0.050],  # ","      (continues " Smith": "h,")
        [0.90, 0.025, 0.025, 0.025, 0.025],  # " bye"
    ]
)
HAND_EXPECTED = {
    "none": [("B-PER", 0.6, 2, 5), ("I-LOC", 0.7, 5, 7), ("I-PER", 0.8, 7, 13)],
    "simple": [("PER", 0.6, 2, 5), ("LOC", 0.7, 5, 7), ("PER", 0.8, 7, 13)],
    # Words " John" -> B-PER .6 (first token), " Smith," -> I-PER .8: same tag, I- continues -> one entity.
    "first": [("PER", 0.7, 2, 14)],
    # " John": "hn" is the most confident token (I-LOC .7); " Smith,": " Smith" (.8) beats "," (.7).
    "max": [("LOC", 0.7, 2, 7), ("PER", 0.8, 7, 14)],
    # " John": mean [.075 .325 .1 .1 .4] -> I-LOC .4; " Smith,": mean [.4 .05 .475 .0375 .0375] -> I-PER .475.
    "average": [("LOC", 0.4, 2, 7), ("PER", 0.475, 7, 14)],
}


@pytest.mark.parametrize("strategy", AGGREGATION_STRATEGIES)
def test_ner_hand_made(strategy):
    got = ner_entities(HAND_TEXT, HAND_OFFSETS, HAND_PROBS, ID2LABEL, strategy)
    expected = [
        {"entity_group": g, "score": pytest.approx(s), "word": HAND_TEXT[a:b], "start": a, "end": b}
        for g, s, a, b in HAND_EXPECTED[strategy]
    ]
    assert got == expected


def test_ner_hand_made_keeps_leading_space_and_o_groups():
    got = ner_entities(HAND_TEXT, HAND_OFFSETS, HAND_PROBS, ID2LABEL, "first", ignore_labels=())
    assert [(e["entity_group"], e["word"]) for e in got] == [("O", "Hi"), ("PER", " John Smith,"), ("O", " bye")]
    def groups(strategy, ignore):
        return [e["entity_group"] for e in ner_entities(HAND_TEXT, HAND_OFFSETS, HAND_PROBS, ID2LABEL, strategy, ignore)]

    # Grouped strategies filter on the group label: "B-PER" is not a group label, "PER" is.
    assert groups("simple", ("O", "B-PER")) == ["PER", "LOC", "PER"]
    assert groups("simple", ("O", "PER")) == ["LOC"]
    # "none" filters on the full label.
    assert groups("none", ("O", "B-PER")) == ["I-LOC", "I-PER"]


def test_ner_b_label_opens_a_new_entity():
    text = "Ada Obi"
    probs = np.array([[0.0, 0.9, 0.1, 0.0, 0.0], [0.0, 0.8, 0.2, 0.0, 0.0]])  # B-PER, B-PER
    got = ner_entities(text, [(0, 3), (3, 7)], probs, ID2LABEL, "simple")
    assert [(e["word"], e["start"], e["end"]) for e in got] == [("Ada", 0, 3), (" Obi", 3, 7)]


def test_ner_subword_heuristic_only_plain_spaces_split_words():
    # "a", "\t", "b", " c", "d": only " c" starts a word ("b c" around its start holds a space).
    text = "a\tb cd"
    offsets = [(0, 1), (1, 2), (2, 3), (3, 5), (5, 6)]
    probs = np.tile([0.0, 0.0, 1.0, 0.0, 0.0], (5, 1))  # all I-PER
    probs[3] = [0.0, 0.0, 0.0, 0.0, 1.0]  # " c" is I-LOC, "d" continues its word
    got = ner_entities(text, offsets, probs, ID2LABEL, "first")
    assert [(e["entity_group"], e["word"]) for e in got] == [("PER", "a\tb"), ("LOC", " cd")]
    # Chinese has no spaces: one run of characters is one word.
    zh = "北京很大"
    got = ner_entities(zh, [(0, 1), (1, 2), (2, 3), (3, 4)], np.eye(5)[[3, 0, 0, 0]], ID2LABEL, "first")
    assert [(e["entity_group"], e["word"]) for e in got] == [("LOC", "北京很大")]


def test_ner_skips_padding_and_special_tokens():
    pad = np.full((1, 5), 0.2)
    pad[0, 1] = 0.9  # would be a confident B-PER if it were kept
    offsets = [(0, 0)] + HAND_OFFSETS + [(0, 0), (0, 0)]
    probs = np.concatenate([pad, HAND_PROBS, pad, pad])
    for strategy in AGGREGATION_STRATEGIES:
        assert ner_entities(HAND_TEXT, offsets, probs, ID2LABEL, strategy) == ner_entities(
            HAND_TEXT, HAND_OFFSETS, HAND_PROBS, ID2LABEL, strategy
        )
    # Offsets may come as the tokenizer's (T, 2) tensor; id2label keys as strings (config.json).
    as_tensor = torch.tensor(offsets)
    str_keys = {str(k): v for k, v in ID2LABEL.items()}
    assert ner_entities(HAND_TEXT, as_tensor, probs, str_keys, "SIMPLE") == ner_entities(
        HAND_TEXT, HAND_OFFSETS, HAND_PROBS, ID2LABEL, "simple"
    )


def test_ner_errors():
    with pytest.raises(ValueError, match="none, simple, first, average, max"):
        ner_entities(HAND_TEXT, HAND_OFFSETS, HAND_PROBS, ID2LABEL, "longest")
    with pytest.raises(ValueError, match="rows"):
        ner_entities(HAND_TEXT, HAND_OFFSETS[:-1], HAND_PROBS, ID2LABEL)
    with pytest.raises(ValueError, match="2-D"):
        ner_entities(HAND_TEXT, HAND_OFFSETS, HAND_PROBS[:, 0], ID2LABEL)
    with pytest.raises(ValueError, match="no name for id 4"):
        ner_entities(HAND_TEXT, HAND_OFFSETS, HAND_PROBS, {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC"})
    with pytest.raises(ValueError, match="outside the text"):
        ner_entities("Hi", HAND_OFFSETS, HAND_PROBS, ID2LABEL)


# ---------------------------------------------------------------------- merge_windows


def test_merge_windows_real_text(ner):
    """~250 tokens in windows of 64 sharing 16: offsets rebuild the whole text's tokens; each token keeps
    its earliest window's prediction (most left context for a causal model)."""
    tokenizer, model = ner["tokenizer"], ner["model"]
    text = " ".join(SAMPLE_TEXT)
    M, S = 64, 16
    whole = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
    enc = tokenizer(text, truncation=True, max_length=M, stride=S, return_overflowing_tokens=True,
                    return_offsets_mapping=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        whole_probs = softmax(model(input_ids=whole["input_ids"]).logits[0])
        # One padded batch, as a pipeline runs it: the last window is left-padded with (0, 0) offsets.
        window_probs = softmax(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits)
    T, W = whole_probs.shape[0], len(window_probs)
    assert T > 200 and W >= 4 and enc["attention_mask"][-1].sum() < M  # several windows, last one padded

    offsets, probs = merge_windows([(enc["offset_mapping"][i], window_probs[i]) for i in range(W)])

    assert offsets == [tuple(pair) for pair in whole["offset_mapping"][0].tolist()]
    assert probs.shape == whole_probs.shape and probs.dtype == window_probs.dtype

    # Token g lies in windows k with k*(M-S) <= g < k*(M-S) + M; the rule takes the smallest such k.
    step = M - S
    real = [np.flatnonzero(enc["attention_mask"][k].numpy()) for k in range(W)]  # unpadded positions
    first_window = [max(0, (g - M + step) // step) for g in range(T)]  # ceil((g - M + 1) / step)
    earliest = np.array([window_probs[k][real[k][g - k * step]] for g, k in enumerate(first_window)])
    np.testing.assert_array_equal(probs, earliest)

    # Tokens of the first window are computed exactly as in the whole-text run (causal attention, same
    # left context), so they agree up to float32 rounding of different matmul shapes.
    np.testing.assert_allclose(probs[:M], whole_probs[:M], atol=1e-5, rtol=0)
    # Past the first window, windows miss distant left context and this random model (std 0.3 weights,
    # an ALiBi head with slope 1/256 that barely decays over 250 tokens) depends on it strongly, so no
    # tolerance would be honest there. What the rule guarantees is the better choice: on tokens present
    # in two windows, the earlier window (>= M - S tokens of context) is closer to the whole-text run
    # than the later one (0..S-1 tokens of context).
    shared = [(k, g) for k in range(1, W) for g in range(k * step, min(k * step + S, T))]
    later = np.array([window_probs[k][real[k][g - k * step]] for k, g in shared])
    rows = [g for _, g in shared]
    ours_error = np.abs(probs[rows] - whole_probs[rows]).mean()
    later_error = np.abs(later - whole_probs[rows]).mean()
    assert ours_error < later_error


def _window(offsets, base):
    """Hand-made window: offsets and probabilities whose first column encodes (window, position)."""
    probs = np.zeros((len(offsets), 2))
    probs[:, 0] = base + np.arange(len(offsets))
    return offsets, probs


def test_merge_windows_hand_made():
    # 8 tokens, windows of 4 sharing 2; tokens 3 and 4 are two byte pieces of one character (same offsets).
    tokens = [(0, 2), (2, 3), (3, 5), (5, 6), (5, 6), (6, 8), (8, 9), (9, 12)]
    windows = [_window(tokens[0:4], 0), _window(tokens[2:6], 10), _window(tokens[4:8], 20)]
    offsets, probs = merge_windows(windows)
    assert offsets == tokens
    # Shared tokens come from the earlier window: 0 1 2 3 | (10 11 =dup) 12 13 | (20 21 =dup) 22 23.
    assert probs[:, 0].tolist() == [0, 1, 2, 3, 12, 13, 22, 23]
    given_offsets, given_probs = merge_windows(windows, overlap=2)  # the tokenizer's stride, if known
    assert given_offsets == offsets and np.array_equal(given_probs, probs)

    # One window: itself, minus padding; left padding and right padding both dropped.
    pad = [(0, 0), (0, 0)]
    single_offsets, single_probs = merge_windows([_window(pad + tokens[:3] + pad, 0)])
    assert single_offsets == tokens[:3] and single_probs[:, 0].tolist() == [2, 3, 4]
    padded = [_window(tokens[0:4], 0), _window(tokens[2:6], 10), _window(pad + tokens[4:8], 20)]
    offsets, probs = merge_windows(padded)
    assert offsets == tokens and probs[:, 0].tolist() == [0, 1, 2, 3, 12, 13, 24, 25]

    # Stride 0 with a character split across the window boundary: the windows share no token, but
    # (5, 6) ends one and starts the next. Inference would take them for one shared token; overlap=0
    # says how the windows were made.
    windows = [_window(tokens[0:4], 0), _window(tokens[4:8], 10)]
    offsets, probs = merge_windows(windows, overlap=0)
    assert offsets == tokens and probs[:, 0].tolist() == [0, 1, 2, 3, 10, 11, 12, 13]
    assert merge_windows(windows)[0] == tokens[:4] + tokens[5:]  # the documented ambiguity


def test_merge_windows_errors():
    tokens = [(0, 2), (2, 3), (3, 5), (5, 6), (6, 8)]
    with pytest.raises(ValueError, match="at least one window"):
        merge_windows([])
    with pytest.raises(ValueError, match="rows"):
        merge_windows([(tokens, np.zeros((4, 2)))])
    with pytest.raises(ValueError, match="labels"):
        merge_windows([(tokens[:3], np.zeros((3, 2))), (tokens[2:], np.zeros((3, 3)))])
    with pytest.raises(ValueError, match="does not continue"):  # second window from earlier in the text
        merge_windows([_window(tokens[2:], 0), _window(tokens[:2], 10)])
    with pytest.raises(ValueError, match="does not start with the last 2 tokens"):
        merge_windows([_window(tokens[:3], 0), _window(tokens[2:], 10)], overlap=2)
    with pytest.raises(ValueError, match="overlap"):
        merge_windows([_window(tokens, 0)], overlap=-1)


# ---------------------------------------------------------------------- best_span


QA_PAIRS = [
    ("Who wrote the article?", "Paris, Lagos, Mumbai and Lima were mentioned in the article by Dr. Ada Obi."),
    ("Où saute le renard ?", "Le renard brun saute par-dessus le chien paresseux, puis il repart."),
    ("什么语言?", "这个模型可以处理多种语言的文本。"),
    ("When?", "Der Bericht wurde am Montag um 09:30 Uhr veröffentlicht."),
]


@pytest.mark.parametrize("max_answer_len", [1, 4, 30])
@pytest.mark.parametrize("pair", range(len(QA_PAIRS)))
def test_best_span_matches_reference(qa, pair, max_answer_len):
    # The "question-answering" pipeline is gone from transformers 5; its span scoring lives on as
    # select_starts_ends/decode_spans (shared with document QA), fed here exactly as that pipeline did:
    # p_mask 1 on non-context tokens, logits (1, T). Question first, so token 0 is never context.
    from transformers.pipelines.document_question_answering import select_starts_ends

    question, context = QA_PAIRS[pair]
    enc = qa["tokenizer"](question, text_pair=context, truncation="only_second", max_length=512,
                          return_offsets_mapping=True, return_tensors="pt")
    context_mask = np.array([s == 1 for s in enc.sequence_ids(0)])
    offsets = enc["offset_mapping"][0].tolist()
    with torch.no_grad():
        ours = qa["model"](input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        ref = qa["ref_model"](input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])

    start, end, score = best_span(ours.start_logits[0].numpy(), ours.end_logits[0].numpy(), offsets,
                                  context_mask, max_answer_len=max_answer_len)
    starts, ends, scores, _ = select_starts_ends(
        ref.start_logits.numpy(), ref.end_logits.numpy(), p_mask=(~context_mask)[None].astype(int),
        attention_mask=enc["attention_mask"].numpy(), max_answer_len=max_answer_len,
    )
    assert (start, end) == (offsets[starts[0]][0], offsets[ends[0]][1])  # align_to_words=False
    assert score == pytest.approx(float(scores[0]), abs=SCORE_ATOL)
    assert 0 <= start < end <= len(context)
    assert context[start:end]  # the answer text is the context slice


def brute_force(start_logits, end_logits, context_mask, max_answer_len):
    """Independent (slow) statement of the rule: best (p_start * p_end) over valid (s, e), first on ties."""
    def softmax(x):
        e = np.exp(x[context_mask] - x[context_mask].max())
        p = np.zeros(len(x))
        p[context_mask] = e / e.sum()
        return p

    ps, pe = softmax(start_logits), softmax(end_logits)
    best = None
    for s in np.flatnonzero(context_mask):
        for e in np.flatnonzero(context_mask):
            if s <= e < s + max_answer_len and (best is None or ps[s] * pe[e] > best[2]):
                best = (s, e, ps[s] * pe[e])
    return best


def test_best_span_hand_made():
    # Tokens 0-2 are the question, 3-7 the context "The big red fox ran" (offsets into the context).
    offsets = [(0, 4), (4, 8), (8, 9), (0, 3), (3, 7), (7, 11), (11, 15), (15, 19)]
    context_mask = np.array([False, False, False, True, True, True, True, True])
    start = np.array([9.0, 9.0, 0.0, 1.0, 0.0, 3.0, -1.0, -1.0])  # question tokens look best but are masked
    end = np.array([0.0, 9.0, 9.0, 0.0, 0.0, 0.5, 1.0, 4.0])
    # Unlimited length: " red fox ran" (start 5, end 7) is best.
    s, e, score = best_span(start, end, offsets, context_mask, max_answer_len=30)
    assert (s, e) == (7, 19)
    bs, be, bscore = brute_force(start, end, context_mask, 30)
    assert (bs, be) == (5, 7) and score == pytest.approx(bscore)
    # Span logit sums: (5, 7) 7 is best but 3 tokens long; within 2 tokens (5, 6) 4 beats (5, 5) 3.5 and
    # (6, 7) 3; within 1 token (5, 5) 3.5 beats (7, 7) 3.
    for limit in (1, 2, 3):
        s, e, score = best_span(start, end, offsets, context_mask, max_answer_len=limit)
        bs, be, bscore = brute_force(start, end, context_mask, limit)
        assert (s, e) == (offsets[bs][0], offsets[be][1]) and score == pytest.approx(bscore)
    assert best_span(start, end, offsets, context_mask, max_answer_len=2)[:2] == (7, 15)
    assert best_span(start, end, offsets, context_mask, max_answer_len=1)[:2] == (7, 11)

    # Context first (token 0 is context): token 0 stays a candidate (the reference would zero it, [CLS]).
    start0 = np.array([5.0, 0.0, 0.0, 0.0])
    end0 = np.array([0.0, 5.0, 0.0, 0.0])
    s, e, score = best_span(start0, end0, [(0, 3), (3, 7), (0, 2), (2, 5)], np.array([True, True, False, False]))
    assert (s, e) == (0, 7) and score == pytest.approx((np.exp(5) / (np.exp(5) + 1)) ** 2)

    # Ties go to the smallest start, then the smallest end (row-major argmax, as the reference).
    flat = np.zeros(4)
    assert best_span(flat, flat, [(0, 1), (1, 2), (2, 3), (3, 4)], np.ones(4, bool), max_answer_len=4)[:2] == (0, 1)

    # Extreme logits: every valid product underflows to 0, yet a valid span comes back.
    start_x = np.array([0.0, -2000.0, 0.0])
    end_x = np.array([0.0, 0.0, -2000.0])
    s, e, score = best_span(start_x, end_x, [(0, 1), (1, 2), (2, 3)], np.array([False, True, True]))
    assert (s, e) == (1, 2) and 0.0 <= score <= 1.0


def test_best_span_errors():
    offsets = [(0, 1), (1, 2), (2, 3)]
    logits = np.zeros(3)
    mask = np.ones(3, bool)
    with pytest.raises(ValueError, match="lengths differ"):
        best_span(logits, np.zeros(2), offsets, mask)
    with pytest.raises(ValueError, match="lengths differ"):
        best_span(logits, logits, offsets[:2], mask)
    with pytest.raises(ValueError, match="no token"):
        best_span(logits, logits, offsets, np.zeros(3, bool))
    with pytest.raises(ValueError, match="max_answer_len"):
        best_span(logits, logits, offsets, mask, max_answer_len=0)
    with pytest.raises(ValueError, match="1-D"):
        best_span(logits[None], logits[None], offsets, mask)
