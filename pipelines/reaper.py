"""Stop a local Ray's processes when the driver that started it dies, however it dies.

`ray.init()` without an address starts a local Ray whose head processes die with the driver, but the
raylet's agents (ray::DashboardAgent, ray::RuntimeEnvAgent) outlive a driver killed by SIGKILL or the
OOM killer, whose clean-up never runs. `watch(node_id)` starts this module as a small process of its
own session that waits on a pipe only the driver holds open; when the pipe closes (the driver exited
or was killed), it stops every process of that Ray node: those whose environment holds the node's
RAY_NODE_ID (the workers), and every process it saw descend from the driver while the driver lived
(the agents carry no RAY_NODE_ID; once the driver is gone they are reparented and can no longer be
told from the process tree, so the tree is recorded every second while it lives).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

KILL_ROUNDS = 25  # sweeps of the node's processes after the kill, 0.2 s apart (see main)
GRACE_S = 3.0  # after a clean exit Ray stops its own processes; give them this long before SIGKILL
_held: list[int] = []  # the pipe's write end: open for the driver's lifetime, closed by the kernel at its end


def watch(node_id: str) -> None:
    """Start the reaper for the local Ray node `node_id` (hex), tied to this process's lifetime."""
    read, write = os.pipe()  # not inherited by the processes this driver starts later (PEP 446)
    subprocess.Popen([sys.executable, "-m", "pipelines.reaper", node_id, str(read), str(os.getpid())], pass_fds=(read,),
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)  # holds no pipe of a caller capturing the driver's output
    os.close(read)
    _held.append(write)


def node_processes(node_id: str) -> list[int]:
    """PIDs of this user's processes started for the Ray node `node_id` (this one excluded)."""
    tag = f"RAY_NODE_ID={node_id}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        if tag in environ.split(b"\0"):
            pids.append(int(proc.name))
    return pids


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a process, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[19]


def descendants(*roots: int) -> dict[int, str]:
    """pid -> start time of every process below the `roots` in the process tree (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    started = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and (info := _stat(int(proc.name))):
            children.setdefault(info[0], []).append(int(proc.name))
            started[int(proc.name)] = info[1]
    out, todo = {}, [pid for root in roots for pid in children.get(root, [])]
    while todo:
        pid = todo.pop()
        out[pid] = started[pid]
        todo += children.get(pid, [])
    return out


def main(node_id: str, fd: int, driver: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # outlive a Ctrl-C that stops the driver
    os.set_blocking(fd, False)
    seen: dict[int, str] = {}
    while True:  # until the pipe closes: record the driver's process tree every second
        try:
            if not os.read(fd, 4096):
                break
        except BlockingIOError:
            pass
        seen.update(descendants(driver))
        time.sleep(1.0)
    seen.pop(os.getpid(), None)
    deadline = time.monotonic() + GRACE_S
    while (pids := node_processes(node_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    # A recorded pid is only killed if it is still the same process (same start time), never a reused pid.
    targets = set(pids) | {pid for pid, start in seen.items() if (info := _stat(pid)) and info[1] == start}
    # Kill until none of the node's is left, with their children: a raylet killed as it starts a worker
    # left that worker, forked after the last record, running (about once in four runs of test_reaper's
    # SIGKILL test).
    for _ in range(KILL_ROUNDS):
        targets |= set(descendants(*targets))  # with what they started since the last record, before they go
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
        targets = set(node_processes(node_id))
        if not targets:
            break


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
