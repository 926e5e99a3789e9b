"""The task objects: what each task reads, needs, writes and depends on, in one place."""

import pytest
from pydantic import ValidationError

from pipelines.config import LabelConfig
from pipelines.replica import BloomReplica
from pipelines.tasks import TASKS
from tests.pipelines.conftest import corpus_rows


def test_only_the_tasks_own_settings_enter_the_fingerprint():
    m = "model-fingerprint"
    ner = LabelConfig(task="ner").fingerprint(m)
    # generate's and classify's settings do not decide an NER output, nor do resources
    assert LabelConfig(task="ner", max_new_tokens=64, stop=["x"], threshold=0.2, num_actors=3).fingerprint(m) == ner
    assert LabelConfig(task="ner", aggregation_strategy="max").fingerprint(m) != ner
    assert LabelConfig(task="ner", stride=8).fingerprint(m) != ner
    assert LabelConfig(task="ner").fingerprint("other model") != ner
    gen = LabelConfig(task="generate").fingerprint(m)
    assert LabelConfig(task="generate", max_new_tokens=64).fingerprint(m) != gen
    assert LabelConfig(task="generate", aggregation_strategy="max", stride=8).fingerprint(m) == gen
    assert LabelConfig(task="qa", max_answer_len=5).fingerprint(m) != LabelConfig(task="qa").fingerprint(m)
    # numerics change the output, resources do not
    assert LabelConfig(task="ner", dtype="float32").fingerprint(m) != ner
    assert LabelConfig(task="generate", dtype="bfloat16", quantize="int8").fingerprint(m) != \
        LabelConfig(task="generate", dtype="bfloat16").fingerprint(m)
    assert LabelConfig(task="generate", cache_tokens=4096, prefill_chunk=64, rows_per_batch=8).fingerprint(m) == gen
    # greedy decoding reads no sampling setting; sampling does
    assert LabelConfig(task="generate", temperature=0.7, top_k=5, seed=3).fingerprint(m) == gen
    sampled = LabelConfig(task="generate", do_sample=True).fingerprint(m)
    assert sampled != gen and LabelConfig(task="generate", do_sample=True, temperature=0.7).fingerprint(m) != sampled


def test_openais_settings_enter_the_generate_fingerprint_only_when_on():
    """At their off values the penalties, min_tokens and logit_bias leave the fingerprint as it was before
    they existed (runs written then still resume); any other value changes it."""
    m = "model-fingerprint"
    off = LabelConfig(task="generate")
    assert not {"frequency_penalty", "presence_penalty", "min_tokens", "logit_bias"} & set(off.task_params())
    changed = [LabelConfig(task="generate", frequency_penalty=0.5), LabelConfig(task="generate", presence_penalty=0.5),
               LabelConfig(task="generate", min_tokens=2), LabelConfig(task="generate", logit_bias={42: 5})]
    prints = [c.fingerprint(m) for c in [off] + changed]
    assert len(set(prints)) == len(prints)
    with pytest.raises(ValueError, match="min_tokens 40 is over max_new_tokens \\(32\\)"):
        LabelConfig(task="generate", min_tokens=40)


def test_openais_settings_reach_each_rows_sequence(checkpoints):
    """Through the replica (the job's and the REST endpoint's path): a bias that makes eos the first token
    still yields min_tokens tokens first; a penalty changes the text; rows without them are as before."""
    rep = BloomReplica(LabelConfig(task="generate", model=str(checkpoints["generate"]), dtype="float32",
                                   max_new_tokens=12))
    eos = rep.tokenizer.eos_token_id
    row = corpus_rows(1)[0]
    plain, held, at_once, penalised = rep.label_rows([row] * 4, [
        None, {"logit_bias": {eos: 100}, "min_tokens": 3}, {"logit_bias": {eos: 100}},
        {"frequency_penalty": -2.0, "presence_penalty": -2.0}])
    assert at_once["completion_tokens"] == 1 and at_once["finish_reason"] == "eos"
    assert held["completion_tokens"] == 4 and held["finish_reason"] == "eos"
    assert penalised["generated_text"] != plain["generated_text"]
    assert plain == rep.label_rows([row])[0]


@pytest.mark.parametrize("task, bad, message", [
    ("generate", {"top_k": -1}, "top_k must be greater than or equal to 0"),
    ("generate", {"stop": [""]}, "stop.0"),
    ("classify", {"threshold": 2}, "threshold must be less than or equal to 1"),
    ("ner", {"aggregation_strategy": "sometimes"}, "aggregation_strategy must be one of none, simple"),
    ("qa", {"max_answer_len": 0}, "max_answer_len must be greater than or equal to 1"),
    ("generate", {"frequency_penalty": 2.5}, "frequency_penalty must be less than or equal to 2"),
    ("generate", {"presence_penalty": -3}, "presence_penalty must be greater than or equal to -2"),
    ("generate", {"min_tokens": -1}, "min_tokens must be greater than or equal to 0"),
    ("generate", {"logit_bias": {5: 101}}, "logit_bias.5 must be less than or equal to 100"),
])
def test_settings_and_requests_share_the_tasks_bounds(task, bad, message):
    with pytest.raises(ValueError, match=message):
        LabelConfig(task=task, **bad)
    with pytest.raises(ValidationError):  # the endpoint's request body, from the same Params
        TASKS[task].request_model().model_validate({"inputs": "x" if task != "qa" else
                                                    {"question": "q", "context": "c"}, "parameters": bad})
    LabelConfig(task="generate" if task != "generate" else "ner", **bad)  # another task's settings are its own


def test_each_task_declares_its_columns_and_model():
    assert TASKS["qa"].input_columns(LabelConfig(task="qa")) == ["question", "context"]
    assert TASKS["generate"].input_columns(LabelConfig(prompt_template="{title}: {text}")) == ["title", "text"]
    assert TASKS["classify"].model_class(LabelConfig(task="classify")).__name__ == "BloomForSequenceClassification"
    assert TASKS["classify"].model_class(LabelConfig(task="classify", candidate_labels=["a", "b"])).__name__ == \
        "BloomForCausalLM"
    for name, task in TASKS.items():
        names = [f.name for f in task.output_fields()]
        assert names[-3:] == ["input_tokens", "truncated", "error"] and len(set(names)) == len(names)


def test_truncating_a_templated_prompt_keeps_the_template(checkpoints):
    template = "Text: {text}\nTopic:"
    rep = BloomReplica(LabelConfig(task="generate", model=str(checkpoints["generate"]), dtype="float32",
                                   prompt_template=template, max_input_tokens=24, too_long="truncate",
                                   max_new_tokens=2))
    row = {"text": " ".join(r["text"] for r in corpus_rows(6))}
    (prompt, ids), result = rep.prompt_ids(row, rep.config)
    assert len(rep.tokenizer.encode(str(prompt))) > 24 and len(ids) <= 24 and result["truncated"]
    text = rep.tokenizer.decode(ids)
    assert text.startswith("Text: ") and text.endswith("\nTopic:")
    plain = BloomReplica(LabelConfig(task="generate", model=str(checkpoints["generate"]), dtype="float32",
                                     max_input_tokens=24, too_long="truncate", max_new_tokens=2))
    (_, ids), _ = plain.prompt_ids(row, plain.config)  # a plain text keeps its start
    assert ids == rep.tokenizer.encode(row["text"])[:24]
    out = rep.label_rows([row])[0]
    assert not out.get("error")
    assert out["truncated"] and out["completion_tokens"] == 2


def test_token_texts_are_each_tokens_share_of_the_decoded_text(tokenizer):
    """Pieces decoded a few tokens at a time concatenate to the whole decode, also for slices that start
    or end inside a multi-byte character, and with special tokens (skipped or shown)."""
    import random

    from bloom.tiny import SAMPLE_TEXT
    from pipelines.tasks import TokenTexts, token_text

    ids = tokenizer.encode(" ".join(SAMPLE_TEXT))
    split = [t for t in ids if "\ufffd" in tokenizer.decode([t])]
    assert split  # the sample text has characters spread over several tokens
    rng = random.Random(0)
    for _ in range(200):
        a = rng.randrange(len(ids))
        chunk = ids[a : a + rng.randint(1, 40)] + rng.choice([[], [2], [2, 3]])  # </s>, <pad> at the end
        for skip in (True, False):
            texts = TokenTexts(tokenizer, chunk, skip_special_tokens=skip, start=7)
            assert texts.text == "".join(texts.pieces) == tokenizer.decode(chunk, skip_special_tokens=skip)
            assert texts.offsets == [7 + len("".join(texts.pieces[:k])) for k in range(len(chunk))]
            assert texts.begun(len(texts.text)) == sum(1 for o in texts.offsets if o < 7 + len(texts.text))
    whole = TokenTexts(tokenizer, [split[0]])  # alone, a piece of a character decodes as it is
    assert whole.pieces == [tokenizer.decode([split[0]])]
    # Shown on its own (logprobs), a piece of a character is its bytes, as OpenAI writes them.
    shown = {token_text(tokenizer, t) for t in set(split)}
    assert len(shown) == len(set(split)) and all(t.startswith("bytes:\\x") for t in shown)
    assert token_text(tokenizer, 2) == "</s>" and token_text(tokenizer, ids[0]) == tokenizer.decode([ids[0]])
