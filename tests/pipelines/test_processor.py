"""The replica stage fed continuously (several batches on one engine at once), and `pipelines.processor.label`
inside a user's own Ray Data pipeline."""

import asyncio
import dataclasses
import json
import threading

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines.config import LabelConfig
from pipelines.corpus import ENGINE_STEPS
from pipelines.corpus.job import run_label_job
from pipelines.processor import FedReplica
from pipelines.replica import BloomReplica, output_fields
from tests.pipelines.conftest import corpus_rows, write_corpus
from tests.pipelines.corpus.test_label import kill_generate_job, read_output


def generate_config(checkpoints, **kw):
    return LabelConfig(task="generate", model=str(checkpoints["generate"]), max_new_tokens=12, **kw)


def test_two_overlapping_batches_on_one_replica_come_back_complete_and_correct(checkpoints):
    cfg = generate_config(checkpoints)
    rows = corpus_rows(24)
    first, second = pa.Table.from_pylist(rows[:14]), pa.Table.from_pylist(rows[14:])
    fed = FedReplica(cfg)
    try:
        async def both():  # as Ray Data's event loop runs them: the second handed over while the first runs
            return await asyncio.gather(fed(first), fed(second))

        out_first, out_second = asyncio.run(both())
        steps = fed.replica.engine.steps
    finally:
        fed.replica.engine.stop()
    # Each batch comes back whole, in its own row order, and equal to labeling its rows alone (greedy, float32).
    alone = BloomReplica(cfg)
    for batch, out in ((first, out_first), (second, out_second)):
        assert out.column("id").to_pylist() == batch.column("id").to_pylist()
        expected = alone.label_rows(batch.to_pylist())
        assert out.select(["generated_text", "finish_reason", "completion_tokens"]).to_pylist() == [
            {k: r[k] for k in ("generated_text", "finish_reason", "completion_tokens")} for r in expected]
    # Every engine step is told once, though both batches ran during the same steps.
    told = sum(sum(out.column(ENGINE_STEPS).to_pylist()) for out in (out_first, out_second))
    assert told == steps > 0


def test_batches_labeled_on_threads_of_one_started_engine_tell_each_step_once(checkpoints):
    replica = BloomReplica(generate_config(checkpoints))
    replica.start_engine()
    rows = corpus_rows(20)
    outs = [None, None]

    def run(k, batch):
        outs[k] = replica(pa.Table.from_pylist(batch))

    try:
        threads = [threading.Thread(target=run, args=(k, b)) for k, b in enumerate((rows[:10], rows[10:]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        steps = replica.engine.steps
    finally:
        replica.engine.stop()
    assert sum(sum(o.column(ENGINE_STEPS).to_pylist()) for o in outs) == steps
    assert sum(o.num_rows for o in outs) == 20


def test_a_fed_generate_job_killed_mid_run_then_resumed_equals_an_uninterrupted_run(ray_cluster, checkpoints,
                                                                                     tmp_path):
    # Batches of 5 rows, 4 at once on the actor's engine: a kill lands while several batches share it.
    corpus = write_corpus(tmp_path / "c", corpus_rows(80), files=2, row_group_size=5)
    out, whole = tmp_path / "out", tmp_path / "whole"
    written = kill_generate_job(ray_cluster, checkpoints["generate"], corpus, out, 2, "--batches-in-flight", "4")
    assert 0 < written < 80
    cfg = LabelConfig(task="generate", model=str(checkpoints["generate"]), input=[str(corpus)], output=str(out),
                      max_new_tokens=24, rows_per_batch=5, batches_in_flight=4)
    resumed = run_label_job(cfg)
    assert resumed["rows_labeled_this_run"] == 80 - written and resumed["rows_out"] == 80
    uninterrupted = run_label_job(dataclasses.replace(cfg, output=str(whole)))
    # Each step told once: rows per step is at most the engine's slots, and at least one.
    from bloom.engine import DEFAULT_SLOTS

    assert 1 <= uninterrupted["mean_batch_occupancy"] <= DEFAULT_SLOTS

    def by_key(path):
        table = read_output(path)
        keys = list(zip(table.column("_source").to_pylist(), table.column("_row").to_pylist()))
        assert len(keys) == len(set(keys)) == 80  # every row exactly once
        fields = ("id", "generated_text", "finish_reason", "completion_tokens", "error")
        return {k: {f: r[f] for f in fields} for k, r in zip(keys, table.to_pylist())}

    assert by_key(out) == by_key(whole)
    assert not list(out.glob(".*.tmp"))
    # Inside each part, rows keep their input order.
    for part in out.glob("part-*.parquet"):
        rows = pq.read_table(part, columns=["_source", "_row"]).to_pylist()
        assert rows == sorted(rows, key=lambda r: (r["_source"], r["_row"]))


def test_the_s3_example_labels_json_lines_inside_a_users_pipeline_like_the_job(ray_cluster, checkpoints, tmp_path,
                                                                              monkeypatch):
    from examples.label_s3 import label_json_lines
    from tests.pipelines.conftest import S3_CREDENTIALS, moto_server, store, uri

    for k, v in S3_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    rows = corpus_rows(30)
    rows[3]["text"] = ""  # a bad row: labeled with an error, then filtered out by the example
    with moto_server() as endpoint:
        fs = store(endpoint)
        fs.create_dir("notes")
        with fs.open_output_stream("notes/in/part-0.jsonl") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
        cfg = generate_config(checkpoints, keep_columns=["lang"], rows_per_batch=8)
        label_json_lines(uri(endpoint, "notes/in"), uri(endpoint, "notes/labeled"), cfg)
        files = [i.path for i in fs.get_file_info(pafs.FileSelector("notes/labeled")) if i.path.endswith(".parquet")]
        out = pa.concat_tables([pq.read_table(p, filesystem=fs) for p in files])
    # Every good row once, with the job's output schema (no provenance: the rows came from JSON, not the job's reader).
    assert sorted(out.column("id").to_pylist()) == sorted(r["id"] for i, r in enumerate(rows) if i != 3)
    fields = ["id", "lang"] + [f.name for f in output_fields("generate")]
    assert out.schema.names == fields and ENGINE_STEPS not in out.schema.names
    for f in output_fields("generate"):
        assert out.schema.field(f.name).type == f.type
    # Each row as the replica labels it alone.
    alone = BloomReplica(cfg)
    by_id = {r["id"]: r for r in out.to_pylist()}
    for row in rows[::6]:
        if row["id"] in by_id:
            (expected,) = alone.label_rows([row])
            assert by_id[row["id"]]["generated_text"] == expected["generated_text"]


def test_a_dataset_without_the_tasks_input_column_is_refused_naming_it(ray_cluster, checkpoints):
    import ray

    from pipelines.processor import label

    ds = ray.data.from_items([{"id": 1, "body": "x"}])
    with pytest.raises(ValueError, match="no column text"):
        label(ds, generate_config(checkpoints))
