"""BloomReplica: each task's output for a batch equals the model called directly on each row alone."""

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pytest
import torch

import bloom
from pipelines.config import LabelConfig
from pipelines.corpus import ENGINE_COUNTS
from pipelines.replica import BloomReplica, output_fields
from pipelines.tasks.base import token_budget_batches
from pipelines.tasks.spans import best_span, ner_entities
from tests.pipelines.conftest import corpus_rows


@pytest.fixture(autouse=True)
def inference():
    with torch.inference_mode():
        yield


def replica(checkpoints, task, key=None, **kw):
    """float32 unless asked: these tests compare against the model's own outputs at 1e-5."""
    return BloomReplica(LabelConfig(task=task, model=str(checkpoints[key or task]), **{"dtype": "float32", **kw}))


def table(rows):
    return pa.Table.from_pylist(rows)


def test_token_budget_batches_cover_every_row_within_budget():
    lengths = [5, 100, 7, 30, 30, 2, 64, 8, 300]
    batches = token_budget_batches(lengths, budget=128, extra=4)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        padded = len(b) * (max(lengths[i] for i in b) + 4)
        assert padded <= 128 or len(b) == 1
    order = [lengths[i] for b in batches for i in b]
    assert order == sorted(order)  # length bucketing
    for b in batches:  # rows of a batch have similar lengths
        assert max(lengths[i] for i in b) + 4 <= 1.15 * (min(lengths[i] for i in b) + 4) + 1


def test_generate_equals_model_generate_row_by_row(checkpoints):
    rep = replica(checkpoints, "generate", max_new_tokens=6, batch_token_budget=64)
    rows = corpus_rows(7)
    out = rep(table(rows)).to_pylist()
    model, tok = rep.model, rep.tokenizer
    for row, res in zip(rows, out):
        ids = tok(row["text"], return_tensors="pt").input_ids
        alone = model.generate(ids, max_new_tokens=6, return_dict_in_generate=True)
        new = alone.sequences[0, ids.shape[1]:ids.shape[1] + alone.num_new_tokens[0]]
        assert res["generated_text"] == tok.decode(new, skip_special_tokens=True)
        assert res["finish_reason"] == alone.finish_reason[0]
        assert res["prompt_tokens"] == ids.shape[1] == res["input_tokens"]
        assert res["completion_tokens"] == alone.num_new_tokens[0]
        assert res["id"] == row["id"] and res["error"] is None


def test_the_generation_cache_holds_sixty_four_sequences_by_default(checkpoints):
    # Before, the default was the batch token budget: 8192 // (1024 + 6) = 7 sequences at a time.
    rep = replica(checkpoints, "generate", max_new_tokens=6)
    assert rep.engine.cache.num_slots == 64 and rep.engine.cache.max_seq_len == 1024 + 6
    assert replica(checkpoints, "generate", max_new_tokens=6, cache_tokens=3000).engine.cache.num_slots == 2


def test_cpu_replica_packs_its_weights_and_labels_as_the_plain_model(checkpoints):
    rep = replica(checkpoints, "generate", max_new_tokens=6)
    assert isinstance(rep.model.lm_head, bloom.packing.PackedLinear)
    plain = bloom.BloomForCausalLM.from_pretrained(checkpoints["generate"])
    for row, res in zip(corpus_rows(4), rep(table(corpus_rows(4))).to_pylist()):
        ids = rep.tokenizer(row["text"], return_tensors="pt").input_ids
        new = plain.generate(ids, max_new_tokens=6)[0, ids.shape[1]:]
        assert res["generated_text"] == rep.tokenizer.decode(new, skip_special_tokens=True)


def test_int8_replica_labels_rows_and_refuses_other_dtypes(checkpoints):
    rep = replica(checkpoints, "generate", dtype="bfloat16", quantize="int8", max_new_tokens=6)
    assert isinstance(rep.model.lm_head, bloom.quant.Int8Linear)
    assert isinstance(rep.model.transformer.h[0].self_attention.query_key_value, bloom.quant.Int8Linear)
    out = rep(table(corpus_rows(4))).to_pylist()
    assert all(r["error"] is None and r["completion_tokens"] == 6 and r["generated_text"] for r in out)
    with pytest.raises(ValueError, match="quantize='int8' needs dtype bfloat16, got float16"):
        LabelConfig(task="generate", model="m", dtype="float16", quantize="int8")
    with pytest.raises(ValueError, match="quantize must be one of"):
        LabelConfig(task="generate", model="m", quantize="int4")


def test_generate_with_template_and_stop(checkpoints):
    rows = corpus_rows(4)
    free = replica(checkpoints, "generate", max_new_tokens=12, prompt_template="{lang}: {text} =>")(table(rows))
    text = free.column("generated_text")[0].as_py()
    stop = text[3:5]
    stopped = replica(checkpoints, "generate", max_new_tokens=12, prompt_template="{lang}: {text} =>",
                      stop=[stop])(table(rows)).to_pylist()[0]
    assert stopped["finish_reason"] == "stop" and stopped["generated_text"] == text[: text.find(stop)]
    prompt_tokens = len(bloom.BloomTokenizerFast.from_pretrained(checkpoints["generate"]).encode(
        f"{rows[0]['lang']}: {rows[0]['text']} =>"))
    assert free.column("prompt_tokens")[0].as_py() == prompt_tokens


def test_classify_head_scores_are_the_models_softmax(checkpoints):
    rep = replica(checkpoints, "classify")
    rows = corpus_rows(6)
    out = rep(table(rows)).to_pylist()
    for row, res in zip(rows, out):
        ids = rep.tokenizer(row["text"], return_tensors="pt").input_ids
        probs = rep.model(ids).logits[0].softmax(-1)
        best = int(probs.argmax())
        assert res["label"] == rep.model.config.id2label[best] and res["labels"] == [res["label"]]
        assert res["score"] == pytest.approx(float(probs[best]), abs=1e-5)
        assert [s["label"] for s in res["scores"]] == ["negative", "neutral", "positive"]
        assert sum(s["score"] for s in res["scores"]) == pytest.approx(1.0, abs=1e-5)


def test_multilabel_uses_sigmoid_and_threshold(checkpoints):
    rep = replica(checkpoints, "classify", key="multilabel", threshold=0.5)
    rows = corpus_rows(5)
    for row, res in zip(rows, rep(table(rows)).to_pylist()):
        ids = rep.tokenizer(row["text"], return_tensors="pt").input_ids
        probs = rep.model(ids).logits[0].sigmoid().tolist()
        assert res["labels"] == [lab for lab, p in zip(["sports", "politics", "science"], probs) if p >= 0.5]
        assert [s["score"] for s in res["scores"]] == pytest.approx(probs, abs=1e-5)


def test_zero_shot_equals_brute_force_log_likelihood(checkpoints):
    labels = ["sport", "politique", "science et technologie"]
    rep = replica(checkpoints, "classify", key="generate", candidate_labels=labels,
                  prompt_template="Topic of: {text}\nTopic:", batch_token_budget=200)
    rows = corpus_rows(5)
    out = rep(table(rows)).to_pylist()
    tok, model = rep.tokenizer, rep.model
    for row, res in zip(rows, out):
        prompt = tok.encode(f"Topic of: {row['text']}\nTopic:")
        totals = []
        for label in labels:  # the whole prompt + label at once, no cache sharing
            lab = tok.encode(" " + label)
            logp = model(torch.tensor([prompt + lab])).logits[0].log_softmax(-1)
            totals.append(sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(lab)))
        expected = torch.tensor(totals).softmax(-1)
        assert [s["score"] for s in res["scores"]] == pytest.approx(expected.tolist(), abs=1e-4)
        assert res["label"] == labels[int(expected.argmax())]


def test_ner_equals_entities_of_the_row_alone(checkpoints):
    rep = replica(checkpoints, "ner", aggregation_strategy="simple")
    rows = corpus_rows(6)
    out = rep(table(rows)).to_pylist()
    for row, res in zip(rows, out):
        enc = rep.tokenizer(row["text"], return_offsets_mapping=True, return_tensors="pt")
        probs = rep.model(enc.input_ids).logits[0].softmax(-1).numpy()
        expected = ner_entities(row["text"], enc.offset_mapping[0].tolist(), probs, rep.model.config.id2label, "simple")
        assert [(e["entity_group"], e["start"], e["end"], e["word"]) for e in res["entities"]] == \
               [(e["entity_group"], e["start"], e["end"], e["word"]) for e in expected]
        for got, want in zip(res["entities"], expected):
            assert got["score"] == pytest.approx(want["score"], abs=1e-5)
            assert row["text"][got["start"]:got["end"]] == got["word"]


def test_ner_labels_a_long_document_whole(checkpoints):
    text = " ".join(f"Ada Obi visited Lima and Paris on day {i}." for i in range(120))
    rep = replica(checkpoints, "ner", max_input_tokens=64, stride=16, aggregation_strategy="none", ignore_labels=[])
    res = rep(table([{"id": "long", "text": text}])).to_pylist()[0]
    n_tokens = len(rep.tokenizer.encode(text))
    assert n_tokens > 5 * 64 and res["input_tokens"] == n_tokens and res["error"] is None
    # With nothing ignored and no grouping, every token of the document is one entity, in order.
    assert len(res["entities"]) == n_tokens
    assert res["entities"][-1]["end"] == len(text.rstrip())
    starts = [e["start"] for e in res["entities"]]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)


def test_qa_answer_is_the_best_span_of_the_row_alone(checkpoints):
    rep = replica(checkpoints, "qa", max_answer_len=10)
    rows = corpus_rows(5)
    for row, res in zip(rows, rep(table(rows)).to_pylist()):
        enc = rep.tokenizer(row["question"], row["context"], return_offsets_mapping=True, return_tensors="pt")
        out = rep.model(enc.input_ids)
        context = [s == 1 for s in enc.sequence_ids(0)]
        s, e, score = best_span(out.start_logits[0].numpy(), out.end_logits[0].numpy(),
                                enc.offset_mapping[0].tolist(), context, 10)
        assert (res["start"], res["end"]) == (s, e) and res["answer"] == row["context"][s:e]
        assert res["score"] == pytest.approx(score, abs=1e-5)


def test_bad_rows_get_errors_and_the_rest_is_labeled(checkpoints):
    rep = replica(checkpoints, "classify", max_text_chars=100_000)
    good = corpus_rows(2)
    rows = [good[0], {"id": "null", "text": None}, {"id": "empty", "text": "  \n"},
            {"id": "big", "text": "x" * 1_000_000}, {"id": "surrogate", "text": "bad \ud800 text"}, good[1]]
    out = rep.label_rows(rows)
    errors = [r.get("error") for r in out]
    assert errors[0] is None and errors[5] is None and out[0]["label"] and out[5]["label"]
    assert errors[1] == "text is null" and errors[2] == "text is empty"
    assert "1000000 characters" in errors[3] and "invalid character" in errors[4]
    numbers = rep.label_rows([{"id": "n", "text": 42}, {"id": "b", "text": b"\xff\xfe"}])
    assert numbers[0]["error"] == "text is not a string (got int)" and "not valid UTF-8" in numbers[1]["error"]


def test_too_long_rows_error_or_truncate(checkpoints):
    rows = [{"id": "long", "text": "word " * 200}, {"id": "short", "text": "hello there"}]
    errored = replica(checkpoints, "classify", max_input_tokens=50).label_rows(rows)
    assert errored[0]["error"].startswith("input has") and "limit of 50" in errored[0]["error"]
    assert errored[1].get("error") is None and errored[1]["label"]
    truncated = replica(checkpoints, "classify", max_input_tokens=50, too_long="truncate").label_rows(rows)
    assert truncated[0]["truncated"] is True and truncated[0]["label"] and truncated[0].get("error") is None


@pytest.mark.parametrize("task", ["generate", "classify", "ner", "qa", "embed"])
def test_schema_is_fixed_even_when_every_row_errors(checkpoints, task):
    rep = replica(checkpoints, task, max_new_tokens=2)
    bad = rep(pa.table({"id": ["a", "b"], "text": pa.array([None, None], pa.string()),
                        "question": pa.array([None, None], pa.string()), "context": ["x", "y"]}))
    good = rep(table(corpus_rows(2)))
    assert bad.schema == good.schema
    # generate also hands the write step its engine's counts (summed there for the report, never written)
    steps = [column for column, _, _ in ENGINE_COUNTS] if task == "generate" else []
    assert bad.schema.names == ["id", *[f.name for f in output_fields(task)], *steps]
    assert bad.column("error").null_count == 0


def test_classify_without_a_head_is_refused(checkpoints):
    with pytest.raises(ValueError, match="no score head.*candidate_labels"):
        replica(checkpoints, "classify", key="generate")


def test_per_row_parameters_equal_separate_calls(checkpoints):
    rep = replica(checkpoints, "generate", max_new_tokens=4)
    rows = corpus_rows(4)
    params = [None, {"max_new_tokens": 7}, {"max_new_tokens": 7, "do_sample": True, "seed": 3}, {"top_k": -1}]
    mixed = rep.label_rows(rows, params)
    assert mixed[0] == rep.label_rows([rows[0]])[0]
    longer = replica(checkpoints, "generate", max_new_tokens=7)
    assert mixed[1] == longer.label_rows([rows[1]])[0] and mixed[1]["completion_tokens"] == 7
    assert mixed[2] == replica(checkpoints, "generate", max_new_tokens=7, do_sample=True, seed=3).label_rows([rows[2]])[0]
    assert "top_k must be" in mixed[3]["error"]
    with pytest.raises(ValueError, match="takes no parameter aggregation_strategy"):
        rep.with_params({"aggregation_strategy": "max"})
    assert rep.config.max_new_tokens == 4  # overrides never stick


@pytest.mark.parametrize("stop", [[], ["e"]])
def test_stream_generate_yields_the_batch_result(checkpoints, stop):
    rep = replica(checkpoints, "generate", max_new_tokens=12, stop=stop)
    row = corpus_rows(1)[0]
    pieces = list(rep.stream_generate(row))
    final = pieces[-1][1]
    assert final == rep.label_rows([row])[0]
    assert "".join(text for text, _ in pieces) == final["generated_text"]
    assert all(result is None for _, result in pieces[:-1]) and len(pieces) > 2


def test_long_qa_context_counts_every_input_token_once(checkpoints):
    rep = replica(checkpoints, "qa", max_input_tokens=64, stride=16)
    question, context = "Who is named?", " ".join(corpus_rows(13)[i]["text"] for i in range(13)) * 2
    res = rep.label_rows([{"question": question, "context": context}])[0]
    assert res.get("error") is None and res["input_tokens"] == len(rep.tokenizer.encode(question, context)) > 5 * 64
    assert context[res["start"]:res["end"]] == res["answer"]


def test_concurrent_requests_each_get_what_they_get_alone(checkpoints):
    """The endpoint labels batches and runs streams on several threads over one replica. Each request's
    parameters must travel with it: whatever runs beside it, it gets exactly its answer alone."""
    gen = replica(checkpoints, "generate", max_new_tokens=3)
    cls = replica(checkpoints, "classify", key="multilabel")
    rows = corpus_rows(6)
    requests = [
        ("label", gen, rows[0], None),
        ("label", gen, rows[1], {"max_new_tokens": 16, "repetition_penalty": 1.5}),
        ("label", gen, rows[2], {"max_new_tokens": 12, "stop": ["e"]}),
        ("label", gen, rows[3], {"max_new_tokens": 9, "do_sample": True, "seed": 5, "top_k": 20}),
        ("stream", gen, rows[4], None),
        ("stream", gen, rows[5], {"max_new_tokens": 10, "stop": ["a"]}),
        ("stream", gen, rows[0], {"max_new_tokens": 14, "do_sample": True, "temperature": 0.7}),
        ("label", cls, rows[0], {"threshold": 0.05}),
        ("label", cls, rows[1], None),
        ("label", cls, rows[2], {"threshold": 0.95}),
    ]

    def run(kind, rep, row, params):
        if kind == "stream":
            return list(rep.stream_generate(row, params))[-1][1]
        return rep.label_rows([row], [params])[0]

    alone = [run(*r) for r in requests]
    assert len({a.get("completion_tokens") for a in alone}) > 3  # the parameters make a difference
    assert len({tuple(a.get("labels") or ()) for a in alone[-3:]}) == 3
    rng = random.Random(0)
    with ThreadPoolExecutor(len(requests)) as pool:
        for _ in range(6):
            order = [rng.randrange(len(requests)) for _ in range(3 * len(requests))]
            answers = [pool.submit(run, *requests[i]) for i in order]
            for i, answer in zip(order, answers):
                got, want = answer.result(), alone[i]
                assert got.keys() == want.keys()
                for key in want:
                    if key == "scores":
                        assert [s["label"] for s in got[key]] == [s["label"] for s in want[key]]
                        assert [s["score"] for s in got[key]] == pytest.approx([s["score"] for s in want[key]], abs=1e-6)
                    elif isinstance(want[key], float):
                        assert got[key] == pytest.approx(want[key], abs=1e-6), (requests[i][3], key)
                    else:
                        assert got[key] == want[key], (requests[i][3], key)


def test_closing_a_stream_aborts_its_sequence_and_frees_its_slot(checkpoints, monkeypatch):
    """What the endpoint does when a client goes away mid-stream. The engine is stepped by hand here, so
    the stream is surely in the middle of its generation when it is closed."""
    rep = replica(checkpoints, "generate", max_new_tokens=40)
    monkeypatch.setattr(rep, "start_engine", lambda: None)
    stream = rep.stream_generate(corpus_rows(1)[0], {"stop": ["zzzz"]})
    first = []  # the sequence is submitted at the stream's first next(), which waits for a text
    reader = threading.Thread(target=lambda: first.append(next(stream)))
    reader.start()
    while not rep.engine.has_work:
        time.sleep(0.01)
    for _ in range(8):  # a prefill and seven decode steps: eight tokens of forty
        rep.engine.step()
    reader.join(10)
    assert first and first[0][1] is None  # text came, the sequence still runs
    assert rep.engine.stats()["slots_used"] == 1
    stream.close()
    rep.engine.step()
    stats = rep.engine.stats()
    assert stats["ended"] == {"abort": 1} and stats["slots_used"] == 0 and not rep.engine.has_work


def test_a_stream_read_after_its_sequence_ended_still_comes_token_by_token(checkpoints, monkeypatch):
    """A reader slower than the engine (the whole sequence done before its first read) still gets the
    text piece by piece, and the stop string never shows."""
    rep = replica(checkpoints, "generate", max_new_tokens=12)
    monkeypatch.setattr(rep, "start_engine", lambda: None)  # stepped by hand below
    row = corpus_rows(1)[0]
    alone = rep.label_rows([row])[0]
    stop = alone["generated_text"][6:8]
    assert stop
    want = rep.label_rows([row], [{"stop": [stop]}])[0]
    seq, texts = rep.open_stream(row, {"stop": [stop]})
    rep.engine.run()  # done before anything is read
    pieces = list(texts)
    assert pieces[-1][1]["generated_text"] == want["generated_text"] == "".join(t for t, _ in pieces)
    assert sum(1 for t, _ in pieces if t) > 1 and stop not in "".join(t for t, _ in pieces)


def test_loading_leaves_no_openmp_team_behind(checkpoints):
    """The model loads on a thread that ends (`on_a_thread_that_ends`): a live second OpenMP team beside
    the engine's thread makes libgomp sleep between kernels. In a fresh process (no team yet), building
    a generate replica of 2 threads leaves no new thread, where parallel work on the calling thread leaves
    its OpenMP worker."""
    import subprocess
    import sys

    code = f"""
import os, threading, torch
from pipelines.config import LabelConfig
from pipelines.replica import BloomReplica
def threads():
    return {{t for t in os.listdir("/proc/self/task")}}
config = LabelConfig(task="generate", model={str(checkpoints['generate'])!r}, dtype="float32")
# torch.set_num_threads starts a process-wide pthreadpool (for XNNPACK) once, on whichever thread: not a team.
warm = threading.Thread(target=torch.set_num_threads, args=(2,))
warm.start()
warm.join()
before = threads()
BloomReplica(config, num_threads=2)
threading.Event().wait(0.2)  # let the ended thread's workers go
after_replica = threads()
torch.set_num_threads(2)
a = torch.randn(256, 256)
for _ in range(3):  # parallel work on this thread, which lives on
    a @ a
print(len(after_replica - before), len(threads() - after_replica))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    left_by_replica, left_by_calling_thread = map(int, out.stdout.split())
    assert left_by_replica == 0
    assert left_by_calling_thread == 1  # the check sees a team where one is left
