"""Zero-shot classify with a shared prompt prefix: the tokens every row of a call starts with are run once
and their keys and values reused by every row and candidate label, with the same probabilities as
running each row whole (float32, 1e-5)."""

import pytest

from bloom.tiny import SAMPLE_TEXT
from pipelines.config import LabelConfig
from pipelines.replica import BloomReplica
from pipelines.tasks.classify import common_prefix

LABELS = ["sports news", "politics", "science and technology", "business"]  # of 1 to several tokens
TEMPLATE = ("Classify the topic of the text. Examples: " + " ".join(SAMPLE_TEXT[:6]) + "\nText: {text}\nTopic:")


@pytest.fixture(scope="module")
def replicas(checkpoints):
    def make(prefix_cache, **kw):
        return BloomReplica(LabelConfig(task="classify", model=str(checkpoints["generate"]), dtype="float32",
                                        candidate_labels=LABELS, prefix_cache=prefix_cache, **kw))
    return make


def assert_same_probabilities(with_reuse, without):
    assert len(with_reuse) == len(without)
    for a, b in zip(with_reuse, without):
        assert not a.get("error") and not b.get("error")
        assert [s["label"] for s in a["scores"]] == LABELS
        assert [s["score"] for s in a["scores"]] == pytest.approx([s["score"] for s in b["scores"]], abs=1e-5)
        assert a["label"] == b["label"]


def encoded(rep, rows):
    inputs, _ = rep.prepare(rows, rep.config)
    return [rep.tokenizer.encode(str(inputs[i])) for i in range(len(rows))]


@pytest.mark.parametrize("budget", [8192, 400])  # one batch, and several batches from one prefix
def test_a_few_shot_template_is_computed_once_with_the_same_probabilities(replicas, budget):
    on = replicas(True, prompt_template=TEMPLATE, batch_token_budget=budget)
    off = replicas(False, prompt_template=TEMPLATE, batch_token_budget=budget)
    rows = [{"text": SAMPLE_TEXT[i % len(SAMPLE_TEXT)] * (1 + i % 3)} for i in range(10)]
    ids = encoded(on, rows)
    template = len(on.tokenizer.encode(TEMPLATE.split("{text}")[0]))
    assert common_prefix(ids) >= template - 1 > 20  # the template's tokens (its last may merge with a row's)
    assert_same_probabilities(on.label_rows(rows), off.label_rows(rows))


def test_a_prefix_ending_inside_a_run_of_tokens_and_a_row_that_is_anothers_beginning(replicas):
    """Rows that share more than the template, up to the middle of a word (where their tokenizations part),
    and a row that is the beginning of another (the prefix then stops one token short of it)."""
    on, off = replicas(True, prompt_template="Text: {text}"), replicas(False, prompt_template="Text: {text}")
    rows = [{"text": "Multilingual modelling"}, {"text": "Multilingual models label"}, {"text": "Multilingual mo"},
            {"text": "Multilingual modelling of the corpus at night"}]
    ids = encoded(on, rows)
    P = common_prefix(ids)
    assert P == min(map(len, ids)) - 1 or any(r[P] != ids[0][P] for r in ids)
    assert P > len(on.tokenizer.encode("Text:"))  # past the template, inside the shared word
    assert_same_probabilities(on.label_rows(rows), off.label_rows(rows))
    rows = [{"text": "Le renard"}, {"text": "Le renard brun saute"}]  # the first is a beginning of the second
    ids = encoded(on, rows)
    assert common_prefix(ids) == len(ids[0]) - 1
    assert_same_probabilities(on.label_rows(rows), off.label_rows(rows))


def test_rows_with_no_common_prefix_are_labeled_as_before(replicas):
    on, off = replicas(True), replicas(False)
    rows = [{"text": t} for t in SAMPLE_TEXT[:5]]
    assert common_prefix(encoded(on, rows)) == 0
    assert_same_probabilities(on.label_rows(rows), off.label_rows(rows))
    alone = [off.label_rows([r])[0] for r in rows[:2]]  # and as each row alone
    assert_same_probabilities(on.label_rows(rows)[:2], alone)


def test_common_prefix_leaves_every_row_its_last_token():
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix([[1, 2], [1]]) == 0
    assert common_prefix([[7, 1], [8, 1]]) == 0
