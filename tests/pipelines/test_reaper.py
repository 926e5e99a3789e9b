"""A local Ray started by a job script is stopped whole when the script is killed with SIGKILL."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.pipelines.conftest import corpus_rows, write_corpus

ROOT = Path(__file__).resolve().parents[2]


def processes_with(env_entry: str) -> list[int]:
    """PIDs of processes whose environment holds `env_entry` (e.g. this test's RAY_TMPDIR)."""
    tag, pids = env_entry.encode(), []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if tag in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def commands(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:200].decode(errors="replace"))
        except OSError:
            continue
    return out


def test_sigkill_of_a_driver_that_started_local_ray_leaves_no_ray_process(checkpoints, tmp_path):
    corpus = write_corpus(tmp_path / "c", corpus_rows(400), files=2, row_group_size=5)
    out = tmp_path / "out"
    temp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths are limited
    tag = f"RAY_TMPDIR={temp}"  # every process of this Ray inherits it, and nothing else has it
    env = {**os.environ, "RAY_TMPDIR": temp, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "label_corpus.py"), "--task", "generate",
                             "--model", str(checkpoints["generate"]), "--input", str(corpus), "--output", str(out),
                             "--max-new-tokens", "24", "--rows-per-batch", "5", "--ray-num-cpus", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and not list(out.glob("part-*.parquet")):
            time.sleep(0.2)
        assert proc.poll() is None, "the job ended before it could be killed"
        time.sleep(1)
        started = commands(processes_with(tag))  # Ray's agents among them: they outlived a killed driver before
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20  # Ray's agents alone linger for about a minute
        while processes_with(tag) and time.time() < deadline:
            time.sleep(0.5)
        left = commands(processes_with(tag))
        assert not left, f"still running after the driver's death: {left} (running before: {started})"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in processes_with(tag):  # only what this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


HARNESS = r"""
import os, signal, sys, time
import pipelines.reaper as reaper

node_id, node, child_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
scan = reaper.node_processes
calls = []

def node_processes(nid):
    # The scan the kill is planned from; right after it, the node starts a worker (as a raylet may).
    pids = scan(nid)
    if not calls:
        os.kill(node, signal.SIGUSR1)
        while not os.path.exists(child_file):
            time.sleep(0.01)
    calls.append(len(pids))
    return pids

reaper.node_processes = node_processes
reaper.GRACE_S = 0.0  # the first scan is the last before the kill
read, write = os.pipe()
os.close(write)  # the driver has already gone
driver = os.getpid()
reaper.main(node_id, read, driver)
"""

NODE = r"""
import os, signal, sys, time
child_file = sys.argv[1]

def start_worker(*_):
    pid = os.fork()
    if pid == 0:
        time.sleep(120)
        os._exit(0)
    with open(child_file + ".tmp", "w") as f:
        f.write(str(pid))
    os.rename(child_file + ".tmp", child_file)

signal.signal(signal.SIGUSR1, start_worker)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, killed and not yet reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_worker_started_after_the_last_scan_is_killed_too(tmp_path):
    node_id = "feedc0de" * 7
    child_file = tmp_path / "worker.pid"
    env = {**os.environ, "RAY_NODE_ID": node_id, "PYTHONPATH": str(ROOT)}
    node = subprocess.Popen([sys.executable, "-c", NODE, str(child_file)], env=env, stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        assert node.stdout.readline().strip() == "ready"
        harness_env = {k: v for k, v in env.items() if k != "RAY_NODE_ID"}  # the reaper is not the node's
        subprocess.run([sys.executable, "-c", HARNESS, node_id, str(node.pid), str(child_file)], env=harness_env,
                       check=True, timeout=60)
        worker = int(child_file.read_text())
        node.wait(timeout=10)
        assert node.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(worker), "the worker the node started after the reaper's last scan is still running"
    finally:
        for pid in (node.pid, worker):
            if pid and alive(pid):
                os.kill(pid, signal.SIGKILL)
