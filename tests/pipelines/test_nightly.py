"""The nightly job: only new or changed partitions are labeled, each published whole, reruns and
concurrent runs are safe, and a killed run leaves complete partitions and a consistent ledger."""

import json
import os
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
import yaml

from pipelines.config import LabelConfig
from pipelines.nightly import LEDGER, MANIFEST, NightlyConfig, publish, read_ledger, recover, run_nightly
from pipelines.replica import BloomReplica
from tests.pipelines.conftest import corpus_rows, write_corpus

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "jobs" / "nightly_annotate.py")


def partition_rows(day: int, n: int) -> list[dict]:
    return [dict(r, id=f"d{day}-{r['id']}") for r in corpus_rows(n)]


def make_corpus(root: Path, sizes: dict[int, int]) -> Path:
    for day, n in sizes.items():
        write_corpus(root / f"date=2026-11-{day:02d}", partition_rows(day, n), files=2, row_group_size=5)
    return root


def settings(corpus, out, *annotators, **extra) -> dict:
    return {"corpus": str(corpus), "output": str(out), "annotators": list(annotators), "keep_columns": ["lang"],
            "resources": {"rows_per_batch": 16}, **extra}


def published(out: Path) -> pa.Table:
    return pads.dataset(str(out), format="parquet", partitioning="hive").to_table()


def assert_consistent(out: Path, corpus: Path, finished: bool = True) -> dict:
    """Ledger == manifests == published partitions; each published partition holds its input's rows
    exactly once; after a run that finished, nothing temporary is left. Returns the ledger's partitions."""
    ledger = read_ledger(out)["partitions"]
    manifests = {p.parent.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.rglob(MANIFEST)
                 if not p.relative_to(out).parts[0].startswith("_")}
    assert ledger == manifests
    for key, entry in ledger.items():
        ids = pq.read_table(out / key, columns=["id"]).column("id").to_pylist()
        inputs = pq.read_table(corpus / key, columns=["id"]).column("id").to_pylist()
        assert sorted(ids) == sorted(inputs) and len(ids) == len(set(ids)) == entry["rows"], key
    if finished:
        assert not (out / "_staging").exists()
        assert not list(out.glob(".*.tmp"))
    return ledger


def test_runs_label_only_new_and_changed_partitions(ray_cluster, checkpoints, tmp_path):
    corpus = make_corpus(tmp_path / "corpus", {1: 20, 2: 12, 3: 16})
    out = tmp_path / "out"
    cfg = NightlyConfig(**settings(corpus, out, {"name": "topic", "task": "classify", "model": str(checkpoints["classify"])},
                                   {"name": "ents", "task": "ner", "model": str(checkpoints["ner"])}))

    # A reader polling the output during the first run (and once after) never sees part of a partition.
    seen, stop = [], threading.Event()

    def reader():
        while True:
            last = stop.is_set()
            try:
                t = published(out)
            except (OSError, pa.ArrowException, FileNotFoundError):
                continue
            if t.num_rows:
                seen.append(t.group_by("date").aggregate([("id", "count")]).to_pylist())
            if last:
                return
            time.sleep(0.01)

    poll = threading.Thread(target=reader)
    poll.start()
    try:
        first = run_nightly(cfg)
    finally:
        stop.set()
        poll.join()
    assert first["status"] == "succeeded" and sorted(first["new"]) == [f"date=2026-11-0{d}" for d in (1, 2, 3)]
    assert first["rows_labeled"] == 48
    assert seen and all(row["id_count"] == {"2026-11-01": 20, "2026-11-02": 12, "2026-11-03": 16}[str(row["date"])]
                        for snapshot in seen for row in snapshot)
    ledger = assert_consistent(out, corpus)

    # Columns: id, kept column, <annotator>_<field>; values equal the replica's on the same rows.
    table = published(out)
    assert {"id", "lang", "topic_label", "topic_score", "topic_error", "ents_entities", "ents_error"} <= set(table.column_names)
    rows = pq.read_table(corpus / "date=2026-11-02").sort_by("id")
    want = BloomReplica(LabelConfig(task="classify", model=str(checkpoints["classify"]), keep_columns=["lang"]))(rows)
    got = pq.read_table(out / "date=2026-11-02").sort_by("id")
    assert got.column("topic_label").to_pylist() == want.column("label").to_pylist()
    assert got.column("lang").to_pylist() == rows.column("lang").to_pylist()

    # A rerun labels nothing and leaves the published files alone.
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    again = run_nightly(cfg)
    assert again["new"] == again["changed"] == again["published"] == [] and len(again["unchanged"]) == 3
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == stamps
    assert read_ledger(out)["partitions"] == ledger

    # A new partition and a changed one: exactly those two.
    make_corpus(corpus, {4: 8})
    write_corpus(corpus / "date=2026-11-02", partition_rows(2, 18), files=2, row_group_size=5)
    third = run_nightly(cfg)
    assert third["new"] == ["date=2026-11-04"] and third["changed"] == ["date=2026-11-02"]
    assert sorted(p["partition"] for p in third["published"]) == ["date=2026-11-02", "date=2026-11-04"]
    ledger = assert_consistent(out, corpus)
    assert ledger["date=2026-11-02"]["rows"] == 18 and ledger["date=2026-11-01"] == read_ledger(out)["partitions"]["date=2026-11-01"]
    assert published(out).num_rows == 20 + 18 + 16 + 8

    # Dropping an annotator re-publishes every partition without its columns, keeping the other's
    # (same input, same fingerprint) without labeling again; a removed input is reported, kept
    # unless pruned.
    import shutil

    before = pq.read_table(out / "date=2026-11-01", columns=["id", "topic_label", "topic_score"])
    shutil.rmtree(corpus / "date=2026-11-03")
    topic = {"name": "topic", "task": "classify", "model": str(checkpoints["classify"])}
    fourth = run_nightly(NightlyConfig(**settings(corpus, out, topic), prune=True))
    assert sorted(fourth["changed"]) == ["date=2026-11-01", "date=2026-11-02", "date=2026-11-04"]
    assert all(p["reused"] == ["topic"] and p["seconds"] == {} for p in fourth["published"])
    assert fourth["deleted"] == fourth["pruned"] == ["date=2026-11-03"]
    assert "ents_entities" not in published(out).column_names
    assert pq.read_table(out / "date=2026-11-01", columns=["id", "topic_label", "topic_score"]).equals(before)
    assert sorted(assert_consistent(out, corpus)) == ["date=2026-11-01", "date=2026-11-02", "date=2026-11-04"]

    # Changing an annotator's settings relabels it everywhere.
    fifth = run_nightly(NightlyConfig(**settings(corpus, out, dict(topic, threshold=0.9))))
    assert sorted(fifth["changed"]) == ["date=2026-11-01", "date=2026-11-02", "date=2026-11-04"]
    assert all(p["reused"] == [] and list(p["seconds"]) == ["topic"] for p in fifth["published"])
    assert_consistent(out, corpus)
    assert json.loads((out / "_report.json").read_text())["run_id"] == fifth["run_id"]
    assert len(list((out / "_reports").glob("*.json"))) == 5


def nightly_yaml(tmp_path, corpus, out, annotator, **extra) -> Path:
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(settings(corpus, out, annotator, **extra)))
    return path


def kill_mid_run(config: Path, out: Path, env: dict) -> None:
    """Run the nightly script and SIGKILL it once annotator "gen" has labeled some rows (its one run
    over every partition is under way)."""
    proc = subprocess.Popen([sys.executable, SCRIPT, "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list(out.glob("_work/gen-*/part-*.parquet"))) >= 3:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before it could be killed; make it slower"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killed_run_publishes_complete_partitions_only_and_a_rerun_finishes(ray_cluster, checkpoints, tmp_path):
    corpus = make_corpus(tmp_path / "corpus", {d: 20 for d in range(1, 5)})
    out = tmp_path / "out"
    config = nightly_yaml(tmp_path, corpus, out, {"name": "gen", "task": "generate", "max_new_tokens": 24,
                                                  "rows_per_batch": 5, "model": str(checkpoints["generate"])})
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_USAGE_STATS_ENABLED": "0"}
    kill_mid_run(config, out, env)
    done = assert_consistent(out, corpus, finished=False)
    assert done == {} and published(out).num_rows == 0  # partitions are published after the labeling run
    written = pads.dataset(str(next(out.glob("_work/gen-*"))), format="parquet").count_rows()
    assert 0 < written < 80

    rerun = subprocess.run([sys.executable, SCRIPT, "--config", str(config)], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert report["status"] == "succeeded" and report["published"] == 4
    # One run for the annotator over the four partitions, resuming the killed run's rows.
    runs = json.loads((out / "_report.json").read_text())["annotator_runs"]
    assert runs == {"gen": {"partitions": 4, "rows": 80, "rows_labeled": 80 - written, "seconds": runs["gen"]["seconds"]}}
    ledger = assert_consistent(out, corpus)
    assert sorted(ledger) == [f"date=2026-11-0{d}" for d in range(1, 5)]
    assert not (out / "_work").exists() or not any((out / "_work").iterdir())


def test_concurrent_runs_do_not_corrupt_the_ledger(ray_cluster, checkpoints, tmp_path):
    corpus = make_corpus(tmp_path / "corpus", {1: 10, 2: 10})
    out = tmp_path / "out"
    config = nightly_yaml(tmp_path, corpus, out, {"name": "topic", "task": "classify", "model": str(checkpoints["classify"])})
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_USAGE_STATS_ENABLED": "0"}
    run = lambda *flags: subprocess.Popen([sys.executable, SCRIPT, "--config", str(config), *flags], env=env,  # noqa: E731
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = run()
    while not (out / "_lock").exists() or not (out / "_lock").read_text().strip():
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    waiting, refused = run("--wait", "600"), run()
    outputs = {name: (p.wait(timeout=600), *p.communicate()) for name, p in
               (("first", first), ("waiting", waiting), ("refused", refused))}
    assert outputs["first"][0] == 0, outputs["first"][2][-3000:]
    assert outputs["refused"][0] == 75 and "another nightly run holds" in outputs["refused"][2]
    assert str(first.pid) in outputs["refused"][2]  # names the holder
    assert outputs["waiting"][0] == 0, outputs["waiting"][2][-3000:]
    assert json.loads(outputs["first"][1].strip().splitlines()[-1])["published"] == 2
    assert json.loads(outputs["waiting"][1].strip().splitlines()[-1])["published"] == 0
    assert sorted(assert_consistent(out, corpus)) == ["date=2026-11-01", "date=2026-11-02"]


def test_a_failing_partition_is_left_unpublished_and_the_others_go_on(ray_cluster, checkpoints, tmp_path):
    corpus = make_corpus(tmp_path / "corpus", {1: 10})
    bad = [dict(r, text=None) for r in partition_rows(2, 10)]
    write_corpus(corpus / "date=2026-11-02", bad, files=1)
    out = tmp_path / "out"
    config = nightly_yaml(tmp_path, corpus, out, {"name": "topic", "task": "classify", "model": str(checkpoints["classify"])})
    done = subprocess.run([sys.executable, SCRIPT, "--config", str(config)], capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 1
    assert "FAILED date=2026-11-02" in done.stderr and "10 of 10 rows errored" in done.stderr
    assert sorted(assert_consistent(out, corpus)) == ["date=2026-11-01"]
    report = json.loads((out / "_report.json").read_text())
    assert report["status"] == "failed" and list(report["failed"]) == ["date=2026-11-02"]


def test_partition_discovery_marker_nesting_and_dry_run(ray_cluster, tmp_path, checkpoints):
    corpus = tmp_path / "corpus"
    for key in ("year=2026/month=10", "year=2026/month=11", "year=2025/month=12"):
        write_corpus(corpus / key, partition_rows(1, 4), files=1)
    (corpus / "year=2026" / "month=10" / "_SUCCESS").touch()
    (corpus / "year=2025" / "month=12" / "_SUCCESS").touch()
    (corpus / "_tmp").mkdir()
    out = tmp_path / "out"
    annotator = {"name": "topic", "task": "classify", "model": str(checkpoints["classify"])}
    cfg = NightlyConfig(**settings(corpus, out, annotator, partitions="year=*/month=*", ready_marker="_SUCCESS"))
    report = run_nightly(cfg, dry_run=True)
    assert report["new"] == ["year=2025/month=12", "year=2026/month=10"]  # month=11 is not ready
    assert not (out / LEDGER).exists() and not list(out.rglob("*.parquet"))

    (corpus / "year=2026" / "month=11" / "_SUCCESS").touch()  # now ready too
    report = run_nightly(cfg)
    assert sorted(p["partition"] for p in report["published"]) == ["year=2025/month=12", "year=2026/month=10",
                                                                    "year=2026/month=11"]
    assert sorted(assert_consistent(out, corpus)) == ["year=2025/month=12", "year=2026/month=10", "year=2026/month=11"]
    table = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 12 and set(table.column("month").to_pylist()) == {10, 11, 12}


def test_bad_configs_are_named_before_any_work(tmp_path, checkpoints):
    corpus = make_corpus(tmp_path / "corpus", {1: 4})
    good = {"name": "topic", "task": "classify", "model": str(checkpoints["classify"])}
    cases = [
        ({"annotators": []}, "no annotators"),
        ({"annotators": [good, good]}, "unique"),
        ({"annotators": [dict(good, name="bad name")]}, "identifier"),
        ({"annotators": [dict(good, output="/x")]}, "settings of the whole job"),
        ({"annotators": [dict(good, threshold=2)]}, "annotator 'topic': threshold"),
        ({"annotators": [dict(good, colour="red")]}, "annotator 'topic': unknown setting"),
        ({"output": "s3://bucket/out"}, "not an object store"),
        ({"resources": {"task": "ner"}}, "not a resource setting"),
        ({"input_fingerprint": "mtime"}, "input_fingerprint"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            NightlyConfig(**{**settings(corpus, tmp_path / "out", good), **change})
    with pytest.raises(FileNotFoundError, match="not a directory"):
        run_nightly(NightlyConfig(**settings(tmp_path / "nope", tmp_path / "out", good)))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**settings(corpus, tmp_path / "out", good), "annotator": []}))
    done = subprocess.run([sys.executable, SCRIPT, "--config", str(path)], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown setting(s): annotator" in done.stderr


def test_an_annotator_whose_model_cannot_do_its_task_is_named_before_any_work(ray_cluster, tmp_path, checkpoints):
    corpus = make_corpus(tmp_path / "corpus", {1: 4, 2: 4})
    good = {"name": "topic", "task": "classify", "model": str(checkpoints["classify"])}
    headless = {"name": "entities", "task": "ner", "model": str(checkpoints["generate"])}
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="annotator 'entities': .* no classifier head"):
        run_nightly(NightlyConfig(**settings(corpus, out, good, headless)))
    with pytest.raises(FileNotFoundError, match="annotator 'entities': model directory"):
        run_nightly(NightlyConfig(**settings(corpus, out, good, dict(headless, model=str(tmp_path / "gone")))))
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(settings(corpus, out, good, headless)))
    done = subprocess.run([sys.executable, SCRIPT, "--config", str(path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "RAY_ADDRESS": ray_cluster})
    assert done.returncode == 2 and "annotator 'entities'" in done.stderr and "Traceback" not in done.stderr
    assert not (out / "_report.json").exists() and not list(out.glob("date=*"))


def test_dry_run_lists_the_partitions(tmp_path, checkpoints):
    corpus = make_corpus(tmp_path / "corpus", {1: 4, 2: 4})
    path = tmp_path / "nightly.yaml"
    path.write_text(yaml.safe_dump(settings(corpus, tmp_path / "out", {"name": "topic", "task": "classify",
                                                                       "model": str(checkpoints["classify"])})))
    done = subprocess.run([sys.executable, SCRIPT, "--config", str(path), "--dry-run"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = [line.split() for line in done.stdout.splitlines() if line.startswith("  ")]
    assert listed == [["new", "date=2026-11-01"], ["new", "date=2026-11-02"]]


def test_publish_replaces_whole_and_recover_repairs_a_killed_publish(tmp_path, monkeypatch):
    root = tmp_path / "out"
    final = root / "date=1"

    def staged(name, content):
        d = root / "_staging" / "run" / name
        d.mkdir(parents=True)
        (d / "a.parquet").write_text(content)
        return d

    publish(staged("date=1", "v1"), final)
    publish(staged("date=1", "v2"), final)  # atomic exchange
    assert (final / "a.parquet").read_text() == "v2" and not (root / "_staging" / "run" / "date=1").exists()
    monkeypatch.setattr("pipelines.nightly._exchange", lambda a, b: False)  # e.g. NFS
    publish(staged("date=1", "v3"), final)
    assert (final / "a.parquet").read_text() == "v3" and not list((root / "_staging" / "run").iterdir())

    # Killed between moving the old copy aside and renaming the new one in: recover puts it back.
    os.rename(final, root / "_staging" / "run" / "date=1.old")
    (root / "_staging" / "run" / "date=2").mkdir()  # a half-assembled partition
    entry = {"partition": "date=1", "rows": 3}
    (root / "_staging" / "run" / "date=1.old" / MANIFEST).write_text(json.dumps(entry))
    ledger = {"version": 1, "partitions": {"date=9": {"rows": 1}}}
    notes = recover(root, ledger)
    assert (final / "a.parquet").read_text() == "v3" and not (root / "_staging").exists()
    # The ledger follows the published manifests: date=1 (published, not in the ledger) added,
    # date=9 (in the ledger, not published) dropped.
    assert ledger["partitions"] == {"date=1": entry} and len(notes) == 3


def test_weights_copied_over_an_annotators_checkpoint_relabel_its_partitions(ray_cluster, tmp_path, monkeypatch):
    import shutil

    import bloom
    from bloom.tiny import make_tiny_checkpoint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    head = {"id2label": {0: "neg", 1: "pos"}}
    model = make_tiny_checkpoint(tmp_path / "model", bloom.BloomForSequenceClassification, seed=0, **head)
    retrained = make_tiny_checkpoint(tmp_path / "retrained", bloom.BloomForSequenceClassification, seed=1, **head)
    corpus = make_corpus(tmp_path / "corpus", {1: 6, 2: 6})
    out = tmp_path / "out"
    cfg = NightlyConfig(**settings(corpus, out, {"name": "topic", "task": "classify", "model": str(model)}))
    assert len(run_nightly(cfg)["published"]) == 2
    shutil.copyfile(retrained / "model.safetensors", model / "model.safetensors")
    again = run_nightly(cfg)
    assert sorted(again["changed"]) == ["date=2026-11-01", "date=2026-11-02"] and len(again["published"]) == 2
    rows = pq.read_table(corpus / "date=2026-11-01").sort_by("id")
    want = BloomReplica(LabelConfig(task="classify", model=str(retrained)))(rows)
    got = pq.read_table(out / "date=2026-11-01").sort_by("id")
    assert got.column("topic_score").to_pylist() == pytest.approx(want.column("score").to_pylist(), abs=1e-4)


def test_a_run_that_finds_the_lock_held_starts_no_ray(tmp_path, checkpoints):
    import fcntl

    corpus = make_corpus(tmp_path / "corpus", {1: 4})
    out = tmp_path / "out"
    config = nightly_yaml(tmp_path, corpus, out, {"name": "topic", "task": "classify", "model": str(checkpoints["classify"])})
    out.mkdir()
    temp = tmp_path / "ray-temp"
    env = {**os.environ, "RAY_TMPDIR": str(temp), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # a local Ray would be started
    with open(out / "_lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = subprocess.run([sys.executable, SCRIPT, "--config", str(config)], capture_output=True, text=True,
                              env=env, timeout=120)
    assert done.returncode == 75 and "another nightly run holds" in done.stderr
    assert not list(temp.glob("**/session_*"))  # no Ray was started


def test_partitions_with_int_and_string_ids_read_as_one_table(ray_cluster, checkpoints, tmp_path):
    import duckdb

    corpus, out = tmp_path / "corpus", tmp_path / "out"
    rows = corpus_rows(8)
    write_corpus(corpus / "date=2026-11-01", [dict(r, id=i) for i, r in enumerate(rows[:4])], files=1)  # int64 ids
    cfg = NightlyConfig(**settings(corpus, out, {"name": "topic", "task": "classify", "model": str(checkpoints["classify"])}))
    assert run_nightly(cfg)["status"] == "succeeded"
    # Later partitions bring string ids: the first is republished with string ids, labels kept.
    write_corpus(corpus / "date=2026-11-02", [dict(r, id=f"l{600 + i}") for i, r in enumerate(rows[4:6])], files=1)
    write_corpus(corpus / "date=2026-11-03", [dict(r, id=10 + i) for i, r in enumerate(rows[6:])], files=1)
    labels_before = pq.read_table(out / "date=2026-11-01").column("topic_label").to_pylist()
    report = run_nightly(cfg)
    want = ["0", "1", "2", "3", "l600", "l601", "10", "11"]
    table = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    assert table.schema.field("id").type == pa.string() and sorted(table.column("id").to_pylist()) == sorted(want)
    assert table.num_rows == 8 and table.column("topic_label").null_count == 0
    duck = duckdb.sql(f"select id, topic_label from read_parquet('{out}/**/*.parquet', hive_partitioning=true)").fetchall()
    assert sorted(i for i, _ in duck) == sorted(want)
    assert report["status"] == "succeeded" and report["recast"] == ["date=2026-11-01"]
    assert report["rows_labeled"] == 4  # only the new partitions were labeled
    assert pq.read_table(out / "date=2026-11-01").column("topic_label").to_pylist() == labels_before
    ledger = read_ledger(out)["partitions"]
    assert ledger == {p.parent.name: json.loads(p.read_text()) for p in out.glob("date=*/" + MANIFEST)}
    assert not (out / "_staging").exists()

    # Types that cannot be unified (a kept column of strings, then of floats) are refused before any work.
    write_corpus(corpus / "date=2026-11-04", [dict(r, lang=1.5) for r in rows[:2]], files=1)
    with pytest.raises(ValueError, match=r"column 'lang' is string in date=2026-11-01.*double in date=2026-11-04"):
        run_nightly(cfg)
    assert not (out / "date=2026-11-04").exists() and sorted(read_ledger(out)["partitions"]) == sorted(ledger)


@pytest.mark.parametrize("output_format", ["parquet", "delta"])
def test_an_embed_annotator_publishes_the_vectors_the_embed_task_gives(ray_cluster, checkpoints, tmp_path,
                                                                       output_format):
    """The embedding column is list<float32> in the published files and in the Delta table alike, and
    holds what the embed task computes for each row."""
    corpus = make_corpus(tmp_path / "corpus", {1: 6, 2: 4})
    out = tmp_path / "out"
    vec = {"name": "vec", "task": "embed", "model": str(checkpoints["embed"]), "dtype": "float32"}
    topic = {"name": "topic", "task": "classify", "model": str(checkpoints["classify"])}
    first = run_nightly(NightlyConfig(**settings(corpus, out, vec), output_format=output_format))
    assert first["status"] == "succeeded", first["failed"]
    # A second annotator reuses the published vectors (read back from the output, written again).
    second = run_nightly(NightlyConfig(**settings(corpus, out, vec, topic), output_format=output_format))
    assert second["status"] == "succeeded", second["failed"]
    assert [p["reused"] for p in second["published"]] == [["vec"], ["vec"]]
    files = [p for p in out.rglob("*.parquet") if not p.relative_to(out).parts[0].startswith("_")]
    assert files and {str(pq.read_schema(p).field("vec_embedding").type) for p in files} == {"list<element: float>"}
    if output_format == "delta":
        from tests.pipelines.test_nightly_delta import read_all_ways

        tables = read_all_ways(str(out), second["table_version"])  # deltalake, Polars, Ray Data
    else:
        tables = [published(out)]
    rows = partition_rows(1, 6) + partition_rows(2, 4)
    want = BloomReplica(LabelConfig(task="embed", model=str(checkpoints["embed"]), dtype="float32")).label_rows(rows)
    for table in tables:
        got = dict(zip(table.column("id").to_pylist(), table.column("vec_embedding").to_pylist()))
        assert sorted(got) == sorted(r["id"] for r in rows)
        for row, w in zip(rows, want):
            assert len(got[row["id"]]) == len(w["embedding"])
            assert max(abs(a - b) for a, b in zip(got[row["id"]], w["embedding"])) < 1e-5, row["id"]


def test_the_annotators_configs_are_built_per_run_not_per_file(ray_cluster, checkpoints, tmp_path, monkeypatch):
    """Assembling a partition reuses the run's annotator columns: the LabelConfigs the driver builds do
    not grow with the files (at 20k files x 3 annotators, one per file cost ~16 s a run)."""
    built = []
    label_config = NightlyConfig.label_config
    monkeypatch.setattr(NightlyConfig, "label_config", lambda self, *args: built.append(1) or label_config(self, *args))
    topic = {"name": "topic", "task": "classify", "model": str(checkpoints["classify"])}
    counts = []
    for files in (1, 4):
        corpus, out = tmp_path / f"corpus{files}", tmp_path / f"out{files}"
        write_corpus(corpus / "date=2026-11-01", partition_rows(1, 8), files=files, row_group_size=5)
        built.clear()
        report = run_nightly(NightlyConfig(**settings(corpus, out, topic)))
        assert report["status"] == "succeeded" and published(out).num_rows == 8
        assert len(list((out / "date=2026-11-01").glob("*.parquet"))) == files
        counts.append(len(built))
    assert counts[0] == counts[1], counts
