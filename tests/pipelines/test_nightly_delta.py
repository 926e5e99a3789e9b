"""The nightly job's Delta Lake output: one commit per run with a predicate overwrite, the ledger in a
Delta table beside it, claims through the table's own commits (local and on the moto S3 server),
schema evolution, prune, upkeep, and readers at the current version and the one before."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import yaml

from pipelines import delta, storage
from pipelines.nightly import NightlyConfig, run_nightly
from tests.pipelines.conftest import S3_CREDENTIALS, moto_server, store, uri, write_corpus
from tests.pipelines.test_nightly import SCRIPT, make_corpus, partition_rows, settings

deltalake = pytest.importorskip("deltalake")


@pytest.fixture(scope="module")
def s3():
    os.environ.update(S3_CREDENTIALS)  # as the session's Ray does: its workers and delta-rs read them
    with moto_server() as endpoint:
        store(endpoint).create_dir("nightly")
        yield endpoint


def ids_by_partition(table: pa.Table) -> dict[str, list[str]]:
    out = {}
    for row in table.select(["date", "id"]).to_pylist():
        out.setdefault(f"date={row['date']}", []).append(row["id"])
    return {k: sorted(v) for k, v in out.items()}


def input_ids(days: dict[int, int]) -> dict[str, list[str]]:
    return {f"date=2026-11-{d:02d}": sorted(r["id"] for r in partition_rows(d, n)) for d, n in days.items()}


def read_all_ways(location: str, version: int) -> list[pa.Table]:
    """The table at `version` through deltalake, Polars and Ray Data."""
    import polars as pl
    import ray.data

    path, options = delta.table_location(location)
    tables = [deltalake.DeltaTable(path, version=version, storage_options=options).to_pyarrow_table(),
              pl.read_delta(path, version=version, storage_options=options or None).to_arrow()]
    tables.append(pa.Table.from_pylist(ray.data.read_delta(path, version=version, storage_options=options or None).take_all()))
    return tables


def ledger_of(location: str) -> dict:
    table = delta.open_table(storage.join(location, delta.LEDGER_TABLE))
    if table is None:
        return {}
    return {r["partition"]: json.loads(r["entry"]) for r in table.to_pyarrow_table().to_pylist()}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_commit_from_a_stale_version_fails_so_one_of_two_claims_wins(where, s3, tmp_path):
    location = str(tmp_path / "out") if where == "local" else uri(s3, f"nightly/claims-{time.time_ns()}")
    state = delta.claim(location, "first", wait=0, claim_hours=24)
    with pytest.raises(delta.ClaimHeld, match=r"another nightly run holds .*run first, pid"):
        delta.claim(location, "second", wait=0, claim_hours=24)
    delta.release(location, state)
    # Two runs that read the same version: the store creates the next log file for one of them only.
    ledger = delta.table_location(storage.join(location, delta.LEDGER_TABLE))
    a, b = (deltalake.DeltaTable(ledger[0], storage_options=ledger[1]) for _ in range(2))
    delta._commit_ledger(location, a, delta.LEDGER_SCHEMA.empty_table(), [], {**state, "claim": None})
    with pytest.raises(deltalake.exceptions.CommitFailedError):
        delta._commit_ledger(location, b, delta.LEDGER_SCHEMA.empty_table(), [], {**state, "claim": None})
    # A claim whose process is gone (killed) is taken over at once.
    code = (f"import sys; sys.path.insert(0, {os.getcwd()!r}); from pipelines import delta; "
            f"delta.claim({location!r}, 'killed', 0, 24)")
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ)
    assert delta.claim(location, "third", wait=0, claim_hours=24)["claim"]["run_id"] == "third"


def test_an_output_written_in_one_format_is_refused_in_the_other(tmp_path, checkpoints):
    topic = {"name": "topic", "task": "classify", "model": str(checkpoints["classify"])}
    (tmp_path / "parquet").mkdir()
    (tmp_path / "parquet" / "_ledger.json").write_text('{"version": 1, "partitions": {}}')
    (tmp_path / "delta" / "_delta_log").mkdir(parents=True)
    for out, fmt in (("parquet", "delta"), ("delta", "parquet")):
        config = NightlyConfig(**settings(tmp_path, tmp_path / out, topic), output_format=fmt)
        with pytest.raises(ValueError, match=f"holds the other format's .*written with output_format: {out}"):
            run_nightly(config)


def test_partition_changed_time_travel_readers_schema_evolution_and_prune(ray_cluster, checkpoints, tmp_path):
    corpus = make_corpus(tmp_path / "corpus", {1: 10, 2: 6})
    out = tmp_path / "out"
    topic = {"name": "topic", "task": "classify", "model": str(checkpoints["classify"])}
    ents = {"name": "ents", "task": "ner", "model": str(checkpoints["ner"])}
    first = run_nightly(NightlyConfig(**settings(corpus, out, topic), output_format="delta"))
    assert first["status"] == "succeeded" and first["new"] == ["date=2026-11-01", "date=2026-11-02"]
    v1 = first["table_version"]
    assert ids_by_partition(delta.open_table(str(out)).to_pyarrow_table()) == input_ids({1: 10, 2: 6})
    assert sorted(ledger_of(str(out))) == ["date=2026-11-01", "date=2026-11-02"]

    # A partition changed between runs: only it is replaced, in one commit; N-1 still reads the old one.
    write_corpus(corpus / "date=2026-11-02", partition_rows(2, 9), files=1)
    (corpus / "date=2026-11-02" / "in-1.parquet").unlink()
    second = run_nightly(NightlyConfig(**settings(corpus, out, topic), output_format="delta"))
    assert second["changed"] == ["date=2026-11-02"] and second["unchanged"] == ["date=2026-11-01"]
    assert second["table_version"] == v1 + 1
    for table in read_all_ways(str(out), v1 + 1):
        assert ids_by_partition(table) == input_ids({1: 10, 2: 9})
    for table in read_all_ways(str(out), v1):
        assert ids_by_partition(table) == input_ids({1: 10, 2: 6})
    assert ledger_of(str(out))["date=2026-11-02"]["rows"] == 9

    # An annotator added: its columns join the schema; the other's labels are reused, not relabeled.
    before = delta.open_table(str(out)).to_pyarrow_table().sort_by("id")
    third = run_nightly(NightlyConfig(**settings(corpus, out, topic, ents), output_format="delta"))
    assert [p["reused"] for p in third["published"]] == [["topic"], ["topic"]]
    after = delta.open_table(str(out)).to_pyarrow_table().sort_by("id")
    assert "ents_entities" in after.column_names and after.column("ents_error").null_count == after.num_rows
    assert after.column("topic_label").equals(before.column("topic_label"))

    # An annotator dropped: its columns stay unless pruned; upkeep compacts, vacuums and checkpoints.
    fourth = run_nightly(NightlyConfig(**settings(corpus, out, ents), output_format="delta"))
    assert "topic_label" in delta.open_table(str(out)).to_pyarrow_table().column_names
    assert "dropped_columns" not in fourth
    fifth = run_nightly(NightlyConfig(**settings(corpus, out, ents), output_format="delta", prune=True,
                                      upkeep_every=1, retention_hours=0))
    assert "topic_label" in fifth["dropped_columns"] and "upkeep" in fifth
    table = delta.open_table(str(out))
    assert not any(c.startswith("topic_") for c in table.to_pyarrow_table().column_names)
    assert ids_by_partition(table.to_pyarrow_table()) == input_ids({1: 10, 2: 9})
    assert any(p.name.endswith(".checkpoint.parquet") for p in (out / "_delta_log").iterdir())
    assert not (out / "_staging").exists() and not (out / "_work").exists()


def s3_files(endpoint: str, prefix: str) -> list[str]:
    infos = store(endpoint).get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return [i.path for i in infos if i.type == pafs.FileType.File]


def test_on_s3_a_killed_run_resumes_and_concurrent_runs_wait_or_exit_75(ray_cluster, checkpoints, s3, tmp_path):
    corpus = make_corpus(tmp_path / "corpus", {d: 20 for d in range(1, 5)})
    out = uri(s3, "nightly/annotated")
    gen = {"name": "gen", "task": "generate", "max_new_tokens": 24, "rows_per_batch": 5, "model": str(checkpoints["generate"])}
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump({**settings(corpus, out, gen), "output_format": "delta"}))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_USAGE_STATS_ENABLED": "0"}
    job = lambda *flags: subprocess.Popen([sys.executable, SCRIPT, "--config", str(config), *flags], env=env,  # noqa: E731
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # SIGKILL once some rows are labeled: nothing is committed, and the claim dies with the process.
    proc = job()
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if sum("/part-" in p for p in s3_files(s3, "nightly/annotated/_work")) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed; make it slower"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert delta.open_table(out) is None and ledger_of(out) == {}

    rerun = job()
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1])["published"] == 4
    report = json.loads(store(s3).open_input_stream("nightly/annotated/_report.json").read())
    assert 0 < report["annotator_runs"]["gen"]["rows_labeled"] < 80  # the killed run's rows were kept
    assert ids_by_partition(delta.open_table(out).to_pyarrow_table()) == input_ids({d: 20 for d in range(1, 5)})
    assert sorted(ledger_of(out)) == [f"date=2026-11-0{d}" for d in range(1, 5)]
    assert not s3_files(s3, "nightly/annotated/_work") and not s3_files(s3, "nightly/annotated/_staging")
    version = delta.open_table(out).version()

    # A partition changed, then three runs at once: one commits, one exits 75 naming it, one waits.
    write_corpus(corpus / "date=2026-11-03", partition_rows(3, 12), files=1)
    (corpus / "date=2026-11-03" / "in-1.parquet").unlink()
    first = job()
    while (ledger := delta.open_table(storage.join(out, delta.LEDGER_TABLE))) is None or \
            delta._state(ledger)["claim"]["run_id"] == report["run_id"]:
        assert first.poll() is None, first.communicate()
        time.sleep(0.05)
    refused, waiting = job(), job("--wait", "600")
    results = {name: (p.wait(timeout=600), *p.communicate()) for name, p in
               (("first", first), ("refused", refused), ("waiting", waiting))}
    assert results["first"][0] == 0, results["first"][2][-3000:]
    assert results["refused"][0] == 75 and "another nightly run holds" in results["refused"][2]
    assert f"pid {first.pid}" in results["refused"][2]
    assert results["waiting"][0] == 0, results["waiting"][2][-3000:]
    assert json.loads(results["waiting"][1].strip().splitlines()[-1])["published"] == 0
    table = delta.open_table(out)
    assert table.version() == version + 1  # the one run's one commit
    assert ids_by_partition(table.to_pyarrow_table()) == input_ids({1: 20, 2: 20, 3: 12, 4: 20})
    assert ledger_of(out)["date=2026-11-03"]["rows"] == 12
