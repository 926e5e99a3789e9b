"""Faults on a multi-node Ray cluster (a head and two worker nodes on this machine, Ray's own
cluster utilities): a worker node lost mid-run, a nightly driver killed and restarted while the
cluster grows back. Every row ends up labeled exactly once."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests.pipelines.conftest import corpus_rows, replica_actor_pids, write_corpus
from tests.pipelines.test_nightly import SCRIPT, assert_consistent, kill_mid_run, make_corpus, nightly_yaml

ROOT = Path(__file__).resolve().parents[2]
STORE = 80 * 1024**2


@pytest.fixture(scope="module")
def multinode():
    """A head with 1 CPU (the drivers' and Ray Data's light tasks) and two 2-CPU worker nodes."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from ray.cluster_utils import Cluster

    temp = Path("/tmp") / f"raymn-{os.getpid()}"  # short: Ray's socket paths are limited
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "temp_dir": str(temp), "object_store_memory": STORE})
    workers = [cluster.add_node(num_cpus=2, object_store_memory=STORE) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        yield cluster, workers
    finally:
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def keys(out: Path) -> list[tuple]:
    table = pads.dataset(str(out), format="parquet").to_table(columns=["_source", "_row"])
    return list(zip(table.column("_source").to_pylist(), table.column("_row").to_pylist()))


def test_a_worker_node_lost_mid_run(multinode, checkpoints, tmp_path):
    cluster, workers = multinode
    corpus = write_corpus(tmp_path / "c", corpus_rows(320), files=4, row_group_size=5)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    job = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "label_corpus.py"), "--task", "generate",
                            "--model", str(checkpoints["generate"]), "--input", str(corpus), "--output", str(out),
                            "--max-new-tokens", "24", "--rows-per-batch", "5",
                            # a replica on every node from the start: with several batches in flight per
                            # replica, one replica may take a short job whole, and it may sit on the head
                            "--min-actors", "4"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Remove a worker node that is running a replica, once some parts are written.
    victim, deadline = None, time.time() + 240
    while victim is None and job.poll() is None and time.time() < deadline:
        if len(list(out.glob("part-*.parquet"))) >= 3:
            victim = next((w for w in workers if replica_actor_pids(raylet_pid(w))), None)
        time.sleep(0.1)
    if victim is None:
        ended = job.poll() is not None
        log = job.communicate(timeout=400)[0] if ended else ""
        pytest.fail(f"no replica found on a worker node after 3 parts ({len(list(out.glob('part-*.parquet')))} "
                    f"written; the job {'ended with ' + str(job.returncode) if ended else 'still runs'}): "
                    f"make it slower\n{log[-3000:]}")
    written = len(keys(out))
    cluster.remove_node(victim, allow_graceful=False)
    workers.remove(victim)
    log, _ = job.communicate(timeout=400)
    assert job.returncode == 0, log[-4000:]
    assert 0 < written < 320
    assert "generate: 320/320 rows" in log
    labeled = keys(out)
    assert len(labeled) == len(set(labeled)) == 320


def test_nightly_killed_and_restarted_while_the_cluster_grows_back(multinode, checkpoints, tmp_path):
    cluster, workers = multinode
    corpus = make_corpus(tmp_path / "corpus", {d: 20 for d in range(1, 5)})
    out = tmp_path / "out"
    config = nightly_yaml(tmp_path, corpus, out, {"name": "gen", "task": "generate", "max_new_tokens": 24,
                                                  "rows_per_batch": 5, "model": str(checkpoints["generate"])})
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    kill_mid_run(config, out, env)
    assert assert_consistent(out, corpus, finished=False) == {}  # published after the one labeling run

    workers.append(cluster.add_node(num_cpus=2, object_store_memory=STORE))  # the autoscaler adds a node
    cluster.wait_for_nodes()
    rerun = subprocess.run([sys.executable, SCRIPT, "--config", str(config)], env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    ledger = assert_consistent(out, corpus)
    assert sorted(ledger) == [f"date=2026-11-0{d}" for d in range(1, 5)]
    assert json.loads((out / "_report.json").read_text())["annotator_runs"]["gen"]["rows_labeled"] < 80  # resumed
