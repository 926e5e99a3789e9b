"""The labeling job end to end on local Ray: outputs equal the replica's, every row exactly once through
kills and actor deaths, bad rows and bad inputs handled."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import bloom
from bloom.tiny import make_tiny_checkpoint
from pipelines.config import LabelConfig
from pipelines.corpus.job import JobFailed, run_label_job
from pipelines.processor import pool_resources
from pipelines.replica import BloomReplica, output_fields
from pipelines.tasks import TASKS
from tests.pipelines.conftest import corpus_rows, replica_actor_pids, write_corpus

ROOT = Path(__file__).resolve().parents[3]
TASK_SETTINGS = {
    "generate": {"max_new_tokens": 5},
    "classify": {},
    "ner": {"aggregation_strategy": "first"},
    "qa": {"max_answer_len": 8},
}


def read_output(path) -> pa.Table:
    return pads.dataset(str(path), format="parquet").to_table()


def config(checkpoints, task, corpus, output, key=None, **kw):
    return LabelConfig(task=task, model=str(checkpoints[key or task]), input=[str(corpus)], output=str(output),
                       rows_per_batch=16, **{**TASK_SETTINGS[task], **kw})


@pytest.mark.parametrize("task", ["generate", "classify", "ner", "qa"])
def test_pipeline_output_equals_the_replica_row_by_row(ray_cluster, checkpoints, corpus, tmp_path, task):
    cfg = config(checkpoints, task, corpus, tmp_path / "out", keep_columns=["lang"])
    report = run_label_job(cfg)
    out = read_output(tmp_path / "out")
    assert report["status"] == "succeeded" and report["rows_in"] == report["rows_out"] == out.num_rows == 60
    assert sorted(out.column("id").to_pylist()) == sorted(r["id"] for r in corpus_rows(60))  # each id once
    expected_schema = ["id", "lang", "_source", "_row"] + [f.name for f in output_fields(task)]
    assert sorted(out.schema.names) == sorted(expected_schema)
    for f in output_fields(task):
        assert out.schema.field(f.name).type == f.type
    # Every row equals the replica (loaded here, in-process) labeling that row alone.
    replica = BloomReplica(cfg)
    by_id = {r["id"]: r for r in out.to_pylist()}
    for row in corpus_rows(60)[::7]:
        alone = replica.label_rows([row])[0]
        got = by_id[row["id"]]
        assert got["lang"] == row["lang"]
        for f in output_fields(task):
            want = alone.get(f.name)
            if f.name in ("score",):
                assert got[f.name] == pytest.approx(want, abs=1e-4)
            elif f.name == "scores":
                assert [s["score"] for s in got[f.name]] == pytest.approx([s["score"] for s in want], abs=1e-4)
            elif f.name == "entities":
                assert [(e["entity_group"], e["start"], e["end"]) for e in got[f.name]] == \
                       [(e["entity_group"], e["start"], e["end"]) for e in want]
            else:
                assert got[f.name] == want, f.name
    report_file = json.loads((tmp_path / "out" / "_report.json").read_text())
    assert report_file["rows_out"] == 60 and report_file["fingerprint"] == report["fingerprint"]
    assert report_file["input_tokens"] > 60 and report_file["pool"]["max_size"] == 1
    if task == "generate":  # the engine ran several rows per step (up to its slots), and the count is not written
        from bloom.engine import DEFAULT_SLOTS

        assert report["generated_tokens_this_run"] == sum(out.column("completion_tokens").to_pylist())
        assert 1 < report["mean_batch_occupancy"] <= DEFAULT_SLOTS


def test_the_report_gives_the_prefix_cache_hit_rate_of_rows_sharing_a_template(ray_cluster, checkpoints, corpus,
                                                                              tmp_path):
    """Rows under one few-shot template reuse its cached blocks (the engine's prefix cache, on by default);
    with prefix_cache off nothing is reused, and the outputs are the same (float32)."""
    template = "Answer in a few words. Examples: " + " ".join(r["text"] for r in corpus_rows(4)) + "\nText: {text}\nAnswer:"
    on = run_label_job(config(checkpoints, "generate", corpus, tmp_path / "on", prompt_template=template,
                              dtype="float32"))
    off = run_label_job(config(checkpoints, "generate", corpus, tmp_path / "off", prompt_template=template,
                               dtype="float32", prefix_cache=False))
    assert 0.5 < on["prefix_hit_rate"] < 1 and on["prefix_tokens_reused_this_run"] > 0
    assert off["prefix_hit_rate"] == 0 and off["prefix_tokens_reused_this_run"] == 0
    texts = {p: dict(zip(*read_output(tmp_path / p).select(["id", "generated_text"]).to_pydict().values()))
             for p in ("on", "off")}
    assert texts["on"] == texts["off"]


def test_rerun_labels_nothing_and_other_settings_are_refused(ray_cluster, checkpoints, corpus, tmp_path):
    cfg = config(checkpoints, "classify", corpus, tmp_path / "out")
    run_label_job(cfg)
    parts = sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet"))
    again = run_label_job(cfg)
    assert again["rows_labeled_this_run"] == 0 and again["rows_out"] == 60
    # the run that did the work keeps its figures in the report, under earlier_runs
    kept = json.loads((tmp_path / "out" / "_report.json").read_text())
    assert kept["rows_labeled_this_run"] == 0
    assert [r["rows_labeled_this_run"] for r in kept["earlier_runs"]] == [60]
    assert "earlier_runs" not in kept["earlier_runs"][0]
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet")) == parts
    other = config(checkpoints, "classify", corpus, tmp_path / "out", threshold=0.9)
    with pytest.raises(ValueError, match="another model, task or parameters .*threshold: 0.5 there, 0.9 now"):
        run_label_job(other)
    # the numerics count too: rows of two precisions would mix in one output
    with pytest.raises(ValueError, match="dtype: 'fast' there, 'float32' now"):
        run_label_job(config(checkpoints, "classify", corpus, tmp_path / "out", dtype="float32"))
    other.overwrite = True
    assert run_label_job(other)["rows_labeled_this_run"] == 60


def test_int8_with_the_checkpoints_own_float32_dtype_is_refused_before_ray(checkpoints, corpus, tmp_path):
    from pipelines.corpus.job import check_job

    with pytest.raises(ValueError, match="quantize='int8' needs dtype bfloat16, got float32"):
        check_job(config(checkpoints, "generate", corpus, tmp_path / "out", dtype="auto", quantize="int8"))
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_without_the_tasks_head_fails_before_writing_anything(ray_cluster, checkpoints, corpus,
                                                                           tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="has no score head weights"):
        run_label_job(config(checkpoints, "classify", corpus, out, key="generate"))
    assert not out.exists()
    # A run that wrote no part (it failed before labeling) never locks its output to its settings.
    out.mkdir()
    (out / "_run.json").write_text(json.dumps({"fingerprint": "another run", "task": "ner", "model": "gone"}))
    assert run_label_job(config(checkpoints, "classify", corpus, out))["rows_out"] == 60
    cli = subprocess.run([sys.executable, str(ROOT / "jobs" / "label_corpus.py"), "--task", "ner", "--model",
                          str(checkpoints["generate"]), "--input", str(corpus), "--output", str(tmp_path / "cli")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ray_cluster})
    assert cli.returncode == 2 and "no classifier head weights" in cli.stderr and len(cli.stderr.splitlines()) == 1
    assert not (tmp_path / "cli").exists()


def test_new_input_rows_are_labeled_on_rerun(ray_cluster, checkpoints, tmp_path):
    rows = corpus_rows(40)
    corpus = write_corpus(tmp_path / "c", rows[:30], files=1)
    cfg = config(checkpoints, "classify", corpus, tmp_path / "out")
    run_label_job(cfg)
    write_corpus(tmp_path / "c2", rows[30:], files=1)
    (tmp_path / "c2" / "in-0.parquet").rename(corpus / "in-new.parquet")
    report = run_label_job(cfg)
    assert report["rows_labeled_this_run"] == 10 and report["rows_out"] == 40


def kill_generate_job(ray_cluster: str, model, corpus: Path, out: Path, parts: int, *flags: str) -> int:
    """Run jobs/label_corpus.py (generate, 24 new tokens, batches of 5 rows, then `flags`) on `corpus`
    into `out`, SIGKILL it once `parts` parts are written; returns the rows written by then."""
    args = [sys.executable, str(ROOT / "jobs" / "label_corpus.py"), "--task", "generate", "--model", str(model),
            "--input", str(corpus), "--output", str(out), "--max-new-tokens", "24", "--rows-per-batch", "5", *flags]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < parts and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the job finished before it could be killed; make it slower"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return read_output(out).num_rows


def test_driver_killed_mid_run_then_rerun_gives_every_row_once(ray_cluster, checkpoints, tmp_path):
    corpus = write_corpus(tmp_path / "c", corpus_rows(120), files=3, row_group_size=5)
    out = tmp_path / "out"
    written = kill_generate_job(ray_cluster, checkpoints["generate"], corpus, out, 3)
    assert 0 < written < 120
    cfg = LabelConfig(task="generate", model=str(checkpoints["generate"]), input=[str(corpus)], output=str(out),
                      max_new_tokens=24, rows_per_batch=5)
    report = run_label_job(cfg)
    assert report["rows_labeled_this_run"] == 120 - written
    table = read_output(out)
    keys = list(zip(table.column("_source").to_pylist(), table.column("_row").to_pylist()))
    assert len(keys) == len(set(keys)) == 120
    assert not list(out.glob(".*.tmp"))


def test_actor_killed_mid_run_is_replaced_and_the_job_completes(ray_cluster, checkpoints, tmp_path):
    corpus = write_corpus(tmp_path / "c", corpus_rows(100), files=2, row_group_size=5)
    out = tmp_path / "out"
    cfg = LabelConfig(task="generate", model=str(checkpoints["generate"]), input=[str(corpus)], output=str(out),
                      max_new_tokens=24, rows_per_batch=5)
    result = {}
    job = threading.Thread(target=lambda: result.update(report=run_label_job(cfg)))
    job.start()
    killed = None
    deadline = time.time() + 120
    while time.time() < deadline and killed is None and job.is_alive():
        pids = replica_actor_pids()
        if pids and list(out.glob("part-*.parquet")):
            os.kill(pids[0], signal.SIGKILL)
            killed = pids[0]
        time.sleep(0.2)
    job.join(timeout=300)
    assert killed is not None, "no replica actor was found alive to kill"
    assert result["report"]["rows_out"] == 100
    table = read_output(out)
    keys = list(zip(table.column("_source").to_pylist(), table.column("_row").to_pylist()))
    assert len(keys) == len(set(keys)) == 100


def test_bad_rows_are_reported_per_row_and_nothing_is_lost(ray_cluster, checkpoints, tmp_path):
    corpus = tmp_path / "bad"
    good = corpus_rows(5)
    write_corpus(corpus, [{"id": r["id"], "text": r["text"]} for r in good], files=1)
    pq.write_table(pa.table({"id": ["null", "empty", "big"], "text": [None, "", "y" * 1_000_000]}),
                   corpus / "strings.parquet")
    pq.write_table(pa.table({"id": ["n1", "n2"], "text": [7, 8]}), corpus / "numbers.parquet")
    pq.write_table(pa.table({"id": ["surrogate"], "text": pa.array([b"bad \xed\xa0\x80 bytes"], pa.binary())}),
                   corpus / "bytes.parquet")
    cfg = LabelConfig(task="classify", model=str(checkpoints["classify"]), input=[str(corpus)],
                      output=str(tmp_path / "out"), max_errored_fraction=None)
    report = run_label_job(cfg)
    out = {r["id"]: r for r in read_output(tmp_path / "out").to_pylist()}
    assert len(out) == 11 and report["errored_rows"] == 6
    assert out["null"]["error"] == "text is null" and out["empty"]["error"] == "text is empty"
    assert "characters, over the limit" in out["big"]["error"]
    assert out["n1"]["error"] == "text is not a string (got int64)"
    assert "not valid UTF-8" in out["surrogate"]["error"]
    assert all(out[r["id"]]["error"] is None and out[r["id"]]["label"] for r in good)
    reasons = report["errors_this_run"]  # errored rows by reason, with sample ids
    assert reasons["text is not a string (got int64)"] == {"rows": 2, "sample_ids": ["n1", "n2"]}
    assert reasons["text has N characters, over the limit of N"] == {"rows": 1, "sample_ids": ["big"]}
    assert sum(r["rows"] for r in reasons.values()) == 6
    assert any("is not valid UTF-8 (" in reason for reason in reasons)  # a name's digits are not a number


def test_progress_line_counts_rows_rate_and_time_left(capsys):
    from pipelines.corpus.job import Progress

    progress = Progress(total=1000, every=0.0)
    progress.start -= 10  # ten seconds in
    progress.show(250)
    line = capsys.readouterr().err
    assert line.startswith("labeled 250 of 1,000 rows (25%), 25.0 rows/s, 30 s left"), line
    progress.show(1000, last=True)
    assert "labeled 1,000 of 1,000 rows (100%)" in capsys.readouterr().err
    # Before the first part is written (a model loading, a long first batch) it still speaks.
    with Progress(total=500, every=0.05):
        time.sleep(0.5)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 3 and all(line.startswith("labeled 0 of 500 rows (0%)") for line in lines), lines


def test_too_many_errors_fail_the_job_loudly_but_keep_the_rows(ray_cluster, checkpoints, tmp_path):
    rows = [{"id": f"e{i}", "text": None if i % 2 else "fine text"} for i in range(20)]
    corpus = write_corpus(tmp_path / "c", rows, files=1, schema=pa.schema([("id", pa.string()), ("text", pa.string())]))
    cfg = LabelConfig(task="classify", model=str(checkpoints["classify"]), input=[str(corpus)],
                      output=str(tmp_path / "out"), max_errored_fraction=0.25)
    with pytest.raises(JobFailed, match="10 of 20 rows errored"):
        run_label_job(cfg)
    assert read_output(tmp_path / "out").num_rows == 20
    assert json.loads((tmp_path / "out" / "_report.json").read_text())["status"] == "failed"


def test_bad_inputs_fail_before_any_work(ray_cluster, checkpoints, corpus, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="has no column 'body'"):
        run_label_job(config(checkpoints, "classify", corpus, out, text_column="body"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="cannot read Parquet file .*x.parquet"):
        run_label_job(config(checkpoints, "classify", broken, out))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_label_job(LabelConfig(task="classify", model=str(tmp_path / "no-model"), input=[str(corpus)], output=str(out)))
    with pytest.raises(FileNotFoundError, match="matches no Parquet file"):
        run_label_job(config(checkpoints, "classify", tmp_path / "nothing-*.parquet", out))
    assert not out.exists() or not list(out.glob("part-*"))


def test_glob_inputs(ray_cluster, checkpoints, corpus, tmp_path):
    report = run_label_job(config(checkpoints, "classify", str(corpus / "in-1*.parquet"), tmp_path / "out"))
    assert report["rows_in"] == 30 and report["input_files"] == 1


def test_pool_sizing_never_takes_every_cpu():
    cfg = LabelConfig(task="classify", model="m")
    two = pool_resources(cfg, {"CPU": 2.0}, node_cpus=[2.0])
    assert two["max_size"] == 1 and two["num_cpus"] == 1.0 and two["num_gpus"] == 0 and two["threads"] == 2
    big = pool_resources(cfg, {"CPU": 64.0}, node_cpus=[64.0])
    assert big["max_size"] * big["num_cpus"] <= 63
    gpus = pool_resources(cfg, {"CPU": 16.0, "GPU": 4.0}, node_cpus=[16.0])
    assert gpus["max_size"] == 4 and gpus["num_gpus"] == 1
    halves = pool_resources(LabelConfig(task="classify", model="m", num_actors=2), {"CPU": 2.0}, node_cpus=[2.0])
    assert halves["max_size"] == 2 and halves["num_cpus"] == 0.5  # fractional CPUs, one CPU still free
    with pytest.raises(ValueError, match="leaving none for reading and writing"):
        pool_resources(LabelConfig(task="classify", model="m", num_actors=2, num_cpus_per_actor=1),
                       {"CPU": 2.0}, node_cpus=[2.0])


def test_pool_sizing_fits_actors_on_nodes():
    """On several nodes every actor fits on one node, and one CPU of the cluster stays free."""
    cfg = LabelConfig(task="classify", model="m")
    for nodes in ([2.0, 2.0], [1.0, 2.0, 2.0], [16.0, 4.0], [8.0] * 5, [3.0]):
        pool = pool_resources(cfg, {"CPU": sum(nodes)}, node_cpus=nodes)
        caps = sorted(nodes, reverse=True)
        caps[0] -= 1
        placed = sum(int(c // pool["num_cpus"] + 1e-9) for c in caps)
        assert pool["num_cpus"] <= 8 and placed >= pool["max_size"] >= 1, (nodes, pool)
        assert pool["max_size"] * pool["num_cpus"] <= sum(nodes) - 1 + 1e-9, (nodes, pool)
    assert pool_resources(cfg, {"CPU": 4.0}, node_cpus=[2.0, 2.0])["max_size"] == 3  # 1 + 2 CPUs, 1 each
    two = pool_resources(LabelConfig(task="classify", model="m", num_actors=2), {"CPU": 7.0}, node_cpus=[1.0, 3.0, 3.0])
    assert two["max_size"] == 2 and two["num_cpus"] == 2.0
    with pytest.raises(ValueError, match="more than any node has"):
        pool_resources(LabelConfig(task="classify", model="m", num_cpus_per_actor=4), {"CPU": 6.0},
                       node_cpus=[2.0, 2.0, 2.0])


def test_job_script_help_and_config_file(ray_cluster, checkpoints, corpus, tmp_path):
    help_text = subprocess.run([sys.executable, str(ROOT / "jobs" / "label_corpus.py"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    for flag in ("--input", "--output", "--task", "--model", "--text-column", "--id-column", "--num-actors",
                 "--gpus-per-actor", "--batch-token-budget", "--dtype", "--config", "--ignore-label",
                 "--repetition-penalty", "--max-text-chars", "--label-prefix", "--overwrite"):
        assert flag in help_text
    (tmp_path / "job.yaml").write_text(f"task: ner\nmodel: {checkpoints['ner']}\ninput: [{corpus}]\n"
                                       f"aggregation_strategy: max\noutput: {tmp_path / 'ignored'}\n")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "label_corpus.py"), "--config", str(tmp_path / "job.yaml"),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ner: 60/60 rows" in done.stdout
    assert json.loads((tmp_path / "out" / "_run.json").read_text())["params"]["aggregation_strategy"] == "max"
    other = subprocess.run([sys.executable, str(ROOT / "jobs" / "label_corpus.py"), "--config", str(tmp_path / "job.yaml"),
                            "--output", str(tmp_path / "out"), "--aggregation-strategy", "first"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert other.returncode == 2 and "another model, task or parameters" in other.stderr
    assert "rerun with --overwrite" in other.stderr  # names the flag that fixes it
    bad = subprocess.run([sys.executable, str(ROOT / "jobs" / "label_corpus.py"), "--task", "ner", "--config",
                          str(tmp_path / "job.yaml"), "--aggregation-strategy", "sometimes"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "aggregation_strategy must be one of" in bad.stderr


def test_hub_id_without_a_reachable_hub_is_a_clear_error(monkeypatch):
    from pipelines.corpus.job import resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # this machine has no hub; offline mode fails at once
    with pytest.raises(FileNotFoundError, match="bigscience/bloom-560m.*could not be fetched from the hub"):
        resolve_model("bigscience/bloom-560m")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("./no/such/dir")


def test_mixed_pass_through_types_give_one_table_for_every_reader(ray_cluster, checkpoints, tmp_path):
    """Issue 12 item 3: int64 ids in one file and string ids in another gave parts of two schemas."""
    import duckdb
    import ray

    corpus = tmp_path / "c"
    corpus.mkdir()
    pq.write_table(pa.table({"id": pa.array(range(20), pa.int64()), "text": ["some text"] * 20,
                             "lang": pa.nulls(20, pa.null())}), corpus / "a.parquet", row_group_size=5)
    pq.write_table(pa.table({"id": [f"l{i}" for i in range(290, 300)], "text": ["other text"] * 10,
                             "lang": ["fr"] * 10}), corpus / "b.parquet", row_group_size=5)
    out = tmp_path / "out"
    report = run_label_job(config(checkpoints, "classify", corpus, out, keep_columns=["lang"]))
    assert report["rows_out"] == 30
    want = {str(i) for i in range(20)} | {f"l{i}" for i in range(290, 300)}
    table = read_output(out)
    assert table.schema.field("id").type == pa.string() and set(table.column("id").to_pylist()) == want
    assert table.schema.field("lang").type == pa.string()
    assert set(ray.data.read_parquet(str(out)).to_pandas()["id"]) == want
    assert duckdb.sql(f"select count(distinct id) from read_parquet('{out}/part-*.parquet')").fetchall() == [(30,)]
    # Each part holds consecutive rows of one file in input order, and its name says which.
    for part in out.glob("part-*.parquet"):
        t = pq.read_table(part)
        rows = t.column("_row").to_pylist()
        first, n = map(int, part.name.split("-")[2:4])
        assert rows == list(range(first, first + n)) and len(set(t.column("_source").to_pylist())) == 1

    # New input that would give the column another type is refused, naming what changed.
    pq.write_table(pa.table({"id": pa.array([1.5]), "text": ["x"], "lang": ["en"]}), corpus / "c.parquet")
    with pytest.raises(ValueError, match=r"column 'id' is .*double in .*c.parquet"):
        run_label_job(config(checkpoints, "classify", corpus, out, keep_columns=["lang"]))
    (corpus / "c.parquet").unlink()
    # Input that gives the column another type than the parts already written have is refused too.
    pq.write_table(pa.table({"id": pa.array(["z"], pa.large_string()), "text": ["x"], "lang": ["en"]}),
                   corpus / "c.parquet")
    with pytest.raises(ValueError, match=r"id: string there, large_string now"):
        run_label_job(config(checkpoints, "classify", corpus, out, keep_columns=["lang"]))


def test_a_checkpoint_of_the_same_shape_with_other_weights_is_refused(ray_cluster, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    head = {"id2label": {0: "neg", 1: "pos"}}
    a = make_tiny_checkpoint(tmp_path / "a", bloom.BloomForSequenceClassification, seed=0, **head)
    b = make_tiny_checkpoint(tmp_path / "b", bloom.BloomForSequenceClassification, seed=1, **head)
    first = LabelConfig(task="classify", model=str(a), input=[str(corpus)], output=str(tmp_path / "out"),
                        rows_per_batch=16)
    run_label_job(first)
    with pytest.raises(ValueError, match="another model"):
        run_label_job(dataclasses.replace(first, model=str(b)))
    assert json.loads((tmp_path / "out" / "_run.json").read_text())["model"] == str(a)
    shutil.copyfile(b / "model.safetensors", a / "model.safetensors")  # retrained weights, same size
    with pytest.raises(ValueError, match="another model"):
        run_label_job(first)
    assert run_label_job(dataclasses.replace(first, overwrite=True))["rows_labeled_this_run"] == 60


def test_a_missing_path_is_not_taken_for_a_hub_id_and_the_missing_part_is_named(tmp_path, monkeypatch):
    from pipelines.corpus.job import resolve_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    # As under `ray job submit --working-dir .`: the gitignored demo/ was not uploaded.
    with pytest.raises(FileNotFoundError, match="absolute paths") as missing_dir:
        resolve_model("demo/tiny-bloom-ner")
    assert f"{tmp_path / 'demo'} does not exist" in str(missing_dir.value)
    (tmp_path / "demo").mkdir()  # its first part exists here: a path, never a hub id
    with pytest.raises(FileNotFoundError) as missing_child:
        resolve_model("demo/tiny-bloom-ner")
    assert f"{tmp_path / 'demo' / 'tiny-bloom-ner'} does not exist" in str(missing_child.value)
    assert "hub" not in str(missing_child.value)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist") as absolute:
        resolve_model(str(tmp_path / "nope" / "model"))
    assert "hub" not in str(absolute.value)
    (tmp_path / "demo" / "weights.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file: give the checkpoint's directory"):
        resolve_model("demo/weights.safetensors")


def test_every_setting_has_a_flag():
    import dataclasses
    import importlib.util

    spec = importlib.util.spec_from_file_location("label_corpus", ROOT / "jobs" / "label_corpus.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    config, _ = script.parse_args(["--task", "ner", "--ignore-label", "O", "--ignore-label", "B-MISC",
                                   "--repetition-penalty", "1.3", "--max-text-chars", "500", "--label-prefix", ": "])
    assert config.ignore_labels == ["O", "B-MISC"] and config.repetition_penalty == 1.3
    assert config.max_text_chars == 500 and config.label_prefix == ": "
    config, _ = script.parse_args(["--frequency-penalty", "0.5", "--presence-penalty", "-1", "--min-tokens", "3",
                                   "--logit-bias", '{"42": 5, "7": -100}'])
    assert (config.frequency_penalty, config.presence_penalty, config.min_tokens) == (0.5, -1.0, 3)
    assert TASKS["generate"].generation_params(config, "x").logit_bias == {42: 5.0, 7: -100.0}
    with pytest.raises(SystemExit):
        script.parse_args(["--logit-bias", "[42]"])
    flagged = {action.dest for action in script.parser()._actions}
    assert {f.name for f in dataclasses.fields(LabelConfig)} - flagged == set()


def test_a_report_keeps_the_earlier_runs_newest_first_and_at_most_thirty(tmp_path):
    from pipelines.corpus.job import EARLIER_RUNS, _earlier_runs

    path = str(tmp_path / "_report.json")
    assert _earlier_runs(path) == []  # the first run
    history = [{"run": i} for i in range(1, 41)]
    (tmp_path / "_report.json").write_text(json.dumps({"run": 0, "earlier_runs": history}))
    kept = _earlier_runs(path)
    assert len(kept) == EARLIER_RUNS == 30
    assert [r["run"] for r in kept] == list(range(30))
    (tmp_path / "_report.json").write_text('{"run": ')  # cut short: a file another tool left half-written
    assert _earlier_runs(path) == []


def test_a_cache_slot_larger_than_any_node_is_refused_before_anything_is_written(ray_cluster, checkpoints, corpus,
                                                                                   tmp_path):
    import ray

    cfg = bloom.BloomConfig.from_pretrained(checkpoints["generate"])
    largest = max(n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive"))
    too_many = int(largest // (4 * cfg.n_layer * cfg.hidden_size)) + 1  # bf16 keys and values, every layer
    with pytest.raises(ValueError, match=r"one sequence's KV cache would take .* GB .* lower max_new_tokens"):
        run_label_job(config(checkpoints, "generate", corpus, tmp_path / "out", max_new_tokens=too_many))
    assert not (tmp_path / "out").exists()
