"""The nightly job's Delta output over a year: commit time and log size per run as the table grows.

    python benchmarks/bench_delta.py [--runs 365] [--rows 200] [--upkeep-every 7]

No model: each run goes through the job's own commit path (pipelines/delta.py: claim, ledger read,
one predicate-overwrite commit of the staged partitions, ledger commit, upkeep every N runs, release)
with synthetic annotation files of --rows rows. Run d adds partition date=d and rewrites 0-2 earlier
ones (1-3 partitions a run, seeded). Prints, per 30-run window, the median seconds of a run's
bookkeeping and commit, the bytes of the run's data commit, and the log a reader must read to load
the table (newest checkpoint + the commits after it), naming the machine.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from common import bench_main, describe, machine

from pipelines import delta

OUT = Path(__file__).parent / "results" / "bench_delta.json"


def staged_partition(directory: Path, day: str, rows: int, run: int) -> None:
    """A partition as `assemble` leaves it: id, a kept column and one annotator's columns, two files."""
    directory.mkdir(parents=True)
    for k in range(2):
        n = rows // 2
        pq.write_table(pa.table({"id": [f"{day}-{k}-{i}" for i in range(n)], "lang": ["en"] * n,
                                 "topic_label": [f"label-{(i + run) % 5}" for i in range(n)],
                                 "topic_score": [0.5] * n, "topic_error": pa.nulls(n, pa.string())}),
                       directory / f"in-{k}.parquet")


def log_read_bytes(log: Path) -> tuple[int, int]:
    """What a reader loads to open the table: (bytes of the newest checkpoint, which hold the table's
    state: one add action per live file; bytes of the commits after it, which upkeep bounds)."""
    checkpoints = sorted(log.glob("*.checkpoint.parquet"))
    since = int(checkpoints[-1].name.split(".")[0]) if checkpoints else -1
    commits = [p for p in log.glob("*.json") if int(p.stem) > since]
    return (checkpoints[-1].stat().st_size if checkpoints else 0), sum(p.stat().st_size for p in commits)


def run(args) -> dict:
    rng = random.Random(0)
    work = Path(tempfile.mkdtemp(prefix="bench-delta-"))
    out, start = str(work / "table"), date(2026, 1, 1)
    per_run = []
    for r in range(args.runs):
        days = [start + timedelta(days=r)] + [start + timedelta(days=rng.randrange(r)) for _ in range(rng.randrange(3) if r else 0)]
        keys = sorted({f"date={d.isoformat()}" for d in days})
        staged = {}
        for key in keys:
            staged[key] = str(work / "staging" / str(r) / key)
            staged_partition(Path(staged[key]), key, args.rows, r)
        steps, began = {}, time.perf_counter()
        mark = lambda name, t=[began]: (steps.__setitem__(name, round(time.perf_counter() - t[0], 4)),  # noqa: E731
                                        t.__setitem__(0, time.perf_counter()))
        state = delta.claim(out, f"run-{r}", wait=0, claim_hours=24)
        mark("claim")
        ledger, _ = delta.read_ledger(out, state)
        mark("read_ledger")
        entries = {k: {"rows": args.rows, "input_fingerprint": f"{r:064x}", "annotators": {"topic": "f" * 64}} for k in keys}
        state["data_version"] = delta.commit_partitions(out, staged, [], entries, f"run-{r}", args.retention_hours)
        mark("commit")
        ledger["partitions"].update(entries)
        delta.save_ledger(out, ledger, keys, state)
        mark("save_ledger")
        state["runs"] = state.get("runs", 0) + 1
        if args.upkeep_every and state["runs"] % args.upkeep_every == 0:
            delta.upkeep(out, args.retention_hours, state)
            state["data_version"] = delta.open_table(out).version()
        delta.release(out, state)
        mark("upkeep_release")
        seconds = time.perf_counter() - began
        log = Path(out) / "_delta_log"
        commit = log / f"{state['data_version']:020d}.json"
        checkpoint_bytes, pending_bytes = log_read_bytes(log)
        per_run.append({"run": r, "partitions": len(keys), "seconds": round(seconds, 4), "steps": steps,
                        "commit_bytes": commit.stat().st_size if commit.exists() else None,
                        "checkpoint_bytes": checkpoint_bytes, "commits_after_checkpoint_bytes": pending_bytes,
                        "log_files": len(list(log.iterdir()))})
    windows = []
    for w in range(0, args.runs, 30):
        chunk = per_run[w:w + 30]
        windows.append({"runs": f"{w + 1}-{w + len(chunk)}",
                        "median_seconds": round(statistics.median(c["seconds"] for c in chunk), 4),
                        "median_step_seconds": {k: round(statistics.median(c["steps"][k] for c in chunk), 4) for k in chunk[0]["steps"]},
                        "median_commit_bytes": statistics.median(c["commit_bytes"] or 0 for c in chunk),
                        "max_checkpoint_bytes": max(c["checkpoint_bytes"] for c in chunk),
                        "max_commits_after_checkpoint_bytes": max(c["commits_after_checkpoint_bytes"] for c in chunk),
                        "log_files_at_end": chunk[-1]["log_files"]})
    table = delta.open_table(out)
    return {"machine": machine(), "runs": args.runs, "rows_per_partition": args.rows, "upkeep_every": args.upkeep_every,
            "retention_hours": args.retention_hours, "partitions": len(delta.read_ledger(out, {"data_version": table.version()})[0]["partitions"]),
            "table_version": table.version(), "windows": windows}


def add_arguments(p) -> None:
    p.add_argument("--runs", type=int, default=365)
    p.add_argument("--rows", type=int, default=200, help="rows per partition")
    p.add_argument("--upkeep-every", type=int, default=7)
    p.add_argument("--retention-hours", type=float, default=168.0)


def show(results: dict) -> None:
    print(f"{describe(results['machine'])}: {results['runs']} runs, {results['partitions']} partitions, "
          f"table version {results['table_version']}, upkeep every {results['upkeep_every']} runs")
    print(f"{'runs':>9} {'median s/run':>13} {'commit bytes':>13} {'checkpoint bytes':>17} {'commits after it':>17} "
          f"{'log files':>10}")
    for w in results["windows"]:
        print(f"{w['runs']:>9} {w['median_seconds']:>13} {w['median_commit_bytes']:>13} {w['max_checkpoint_bytes']:>17} "
              f"{w['max_commits_after_checkpoint_bytes']:>17} {w['log_files_at_end']:>10}  {w['median_step_seconds']}")


if __name__ == "__main__":
    sys.exit(bench_main(sys.argv[1:], __doc__, OUT, add_arguments, run, show))
