"""The real submission path: a Ray head started with `ray start` on 127.0.0.1 and the labeling job sent
to it with `ray job submit --working-dir .`, as users run it on a cluster."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import yaml

import bloom
from bloom.tiny import make_tiny_checkpoint
from tests.pipelines.conftest import corpus_rows, write_corpus

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_head(temp_dir: Path) -> None:
    """Stop only this head's processes (found by its temp dir): `ray stop` would stop every Ray on the
    machine, the test session's own included."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(temp_dir) in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


@contextmanager
def ray_head(temp: Path):
    """A Ray head started with `ray start --head` on 127.0.0.1 (2 CPUs) with its files under `temp`,
    stopped at the end; yields (its dashboard address, the environment its clients need, the ray CLI)."""
    port, dashboard, agent = free_port(), free_port(), free_port()
    # Token authentication is on by default in Ray 2.60: the head and the client must agree, here on "off"
    # (loopback only). The job runs the `python` first on the PATH that `ray start` saw: this venv's.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(Path(sys.executable).parent / "ray")
    started = subprocess.run([ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                              "--num-cpus=2", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                              # Not the default 52365: another Ray on this machine may hold it, and then the
                              # head has no job agent ("No available agent to submit job").
                              f"--dashboard-agent-listen-port={agent}",
                              f"--temp-dir={temp}", "--disable-usage-stats"],
                             env=env, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        yield f"http://127.0.0.1:{dashboard}", env, ray_cli
    finally:
        stop_head(temp)


@pytest.fixture(scope="module")
def head():
    temp = Path("/tmp") / f"rayhead-{os.getpid()}-{time.time_ns() % 10**8}"  # short: Ray's socket paths are limited
    with ray_head(temp) as started:
        yield started


def submit(command: list[str], env: dict) -> subprocess.CompletedProcess:
    deadline = time.time() + 60
    while True:
        submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        # Just after `ray start` the head's job agent may not be up yet; the submission is refused
        # (no job is created), so trying again is safe.
        if "No available agent" not in submitted.stderr or time.time() > deadline:
            return submitted
        time.sleep(2)


def test_ray_job_submit_labels_the_corpus(head, tmp_path):
    address, env, ray_cli = head
    model = make_tiny_checkpoint(tmp_path / "model", bloom.BloomForSequenceClassification,
                                 id2label={0: "neg", 1: "pos"})
    corpus = write_corpus(tmp_path / "corpus", corpus_rows(30))
    out = tmp_path / "out"
    command = [ray_cli, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
               "python", "jobs/label_corpus.py", "--task", "classify", "--model", str(model),
               "--input", str(corpus), "--output", str(out)]
    submitted = submit(command, env)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-2000:]
    assert "succeeded" in submitted.stdout + submitted.stderr
    assert "classify: 30/30 rows" in submitted.stdout
    assert "joined the Ray cluster at " in submitted.stdout  # the submitted job joins, and says so
    table = pads.dataset(str(out), format="parquet").to_table()
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in corpus_rows(30))
    assert table.column("error").null_count == 30


def test_cron_script_submits_the_nightly_job_and_reports_failure(head, tmp_path):
    address, env, _ = head
    model = make_tiny_checkpoint(tmp_path / "model", bloom.BloomForSequenceClassification,
                                 id2label={0: "neg", 1: "pos"})
    for day in (1, 2):
        write_corpus(tmp_path / "corpus" / f"date=2026-11-0{day}", corpus_rows(10))
    config = {"corpus": str(tmp_path / "corpus"), "output": str(tmp_path / "out"),
              "annotators": [{"name": "sentiment", "task": "classify", "model": str(model)}]}
    (tmp_path / "nightly.yaml").write_text(yaml.safe_dump(config))
    script = [str(ROOT / "deploy" / "cron" / "nightly-submit.sh")]
    cron_env = {**env, "RAY_ADDRESS": address, "NIGHTLY_CONFIG": str(tmp_path / "nightly.yaml")}
    done = submit(script, cron_env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "labeled 2 new and 0 changed partition(s)" in done.stdout
    ledger = json.loads((tmp_path / "out" / "_ledger.json").read_text())
    assert sorted(ledger["partitions"]) == ["date=2026-11-01", "date=2026-11-02"]
    assert pads.dataset(str(tmp_path / "out"), format="parquet").count_rows() == 20

    # A job that fails makes the script (and so cron) fail too.
    (tmp_path / "nightly.yaml").write_text(yaml.safe_dump({**config, "corpus": str(tmp_path / "missing")}))
    failed = submit(script, cron_env)
    assert failed.returncode != 0 and "is not a directory" in failed.stdout + failed.stderr
