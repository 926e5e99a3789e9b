"""Fixtures for the pipeline tests: one local Ray for the session, tiny checkpoints per task, corpora."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import bloom
from bloom.tiny import SAMPLE_TEXT, make_tiny_checkpoint
from pipelines.demo import DEMO_HEADS


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bloomline-test", "AWS_SECRET_ACCESS_KEY": "bloomline-test",
                  "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def moto_server(**env):
    """An S3 server on a free loopback port; yields 'host:port'."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "moto server did not start"
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def store(endpoint, key=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"], secret=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]):
    return pafs.S3FileSystem(access_key=key, secret_key=secret, endpoint_override=endpoint, scheme="http",
                             region="us-east-1", allow_bucket_creation=True)


def uri(endpoint, path):
    return f"s3://{path}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A 2-CPU local Ray shared by all pipeline tests (ray.init costs seconds). Yields its GCS address
    so subprocesses (the job script, a driver killed mid-run) can join the same cluster."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray's workers inherit this environment: the credentials the loopback S3 server (test_s3) takes.
    os.environ.update(S3_CREDENTIALS)
    import ray

    temp = tmp_path_factory.mktemp("ray")
    ctx = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2,
                   _temp_dir=str(temp), configure_logging=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ctx.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """task -> a tiny checkpoint directory with the head and labels the task needs (the demo's heads)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {task: make_tiny_checkpoint(root / task, cls, **config) for task, (cls, config) in DEMO_HEADS.items()}
    # A multi-label classifier too.
    out["multilabel"] = make_tiny_checkpoint(root / "multilabel", bloom.BloomForSequenceClassification,
                                             id2label={0: "sports", 1: "politics", 2: "science"},
                                             problem_type="multi_label_classification")
    return out


def corpus_rows(n: int) -> list[dict]:
    return [{"id": f"r{i:04d}", "text": SAMPLE_TEXT[i % len(SAMPLE_TEXT)] * (1 + i % 4),
             "question": "Who is named?", "context": SAMPLE_TEXT[(i + 3) % len(SAMPLE_TEXT)] * (1 + i % 2),
             "lang": ["en", "fr", "zh"][i % 3]} for i in range(n)]


def write_corpus(directory, rows: list[dict], files: int = 2, row_group_size: int = 10, schema=None):
    """Rows split over `files` Parquet files with small row groups (several read tasks)."""
    directory.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // files)
    for k in range(files):
        chunk = rows[k * per : (k + 1) * per]
        if chunk:
            pq.write_table(pa.Table.from_pylist(chunk, schema=schema), directory / f"in-{k}.parquet",
                           row_group_size=row_group_size)
    return directory


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus", corpus_rows(60))


def replica_actor_pids(parent: int | None = None) -> list[int]:
    """PIDs of live Ray Data actor-pool workers, found by the process title Ray gives them; with
    `parent`, only those started by that raylet (i.e. on that node)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if cmdline.startswith("ray::") and "MapWorker" in cmdline and parent in (None, ppid):
            pids.append(int(proc.name))
    return pids
