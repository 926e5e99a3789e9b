"""The labeling job's bookkeeping at scale: what the driver holds and how long it takes, per 10x rows.

1. Driver steps alone (no model, no Ray), on synthetic corpora (default 1 M rows in 200 files and
   10 M rows in 2,000 files, row groups of 1,000 rows) whose output is written by the job's own write
   step in parts of 256 rows (the default rows_per_batch):
     plan         list the input, read every footer (threads), cut units, unify column types
     resume scan  list the output of a run killed with 10% of its files unlabeled, compute what is left
     verify       list the complete output, check exactly-once from the part names
   Each size is measured in a fresh Python process: driver peak memory (VmHWM) above the process's
   memory once its modules are imported, and seconds for each step. Goals (issue 14): at 10 M rows in
   2,000 files, growth <= 200 MiB and plan + resume scan + verify <= 20 s; memory < 2x per 10x rows.
2. End to end (--e2e ROWS): the tiniest classifier labels ROWS rows through the job script on local
   Ray; the driver is SIGKILLed half way, a second run resumes; every row must be in the output once.

    python benchmarks/bench_scale.py                       # part 1, ~4 minutes on 2 cores
    python benchmarks/bench_scale.py --sizes 1000000:200 --e2e 1000000
Writes benchmarks/results/bench_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import describe, machine, write_results

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from pipelines import corpus as C  # noqa: E402

ROW_GROUP = 1000
TEXTS = np.array(["short text", "a somewhat longer line of text to label", "ein Satz", "une phrase en français"])


def vm(field: str) -> int:
    """A /proc/self/status memory figure, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def make_corpus(directory: Path, rows: int, files: int) -> None:
    directory.mkdir(parents=True)
    per = rows // files
    for k in range(files):
        ids = pa.array(np.char.add("r", np.arange(k * per, (k + 1) * per).astype(str)))
        pq.write_table(pa.table({"id": ids, "text": pa.array(TEXTS[np.arange(per) % len(TEXTS)])}),
                       directory / f"in-{k:05d}.parquet", row_group_size=ROW_GROUP)


def write_output(corpus: C.CorpusPlan, out: Path, part_rows: int, keep) -> None:
    """Parts as the job's write step writes them, for the units whose file `keep` accepts."""
    out.mkdir(exist_ok=True)
    for u in corpus.units:
        if not keep(u["source"]):
            continue
        for first in range(u["offset"], u["offset"] + u["num_rows"], part_rows):
            n = min(part_rows, u["offset"] + u["num_rows"] - first)
            C.write_part(pa.table({"id": pa.array([None] * n, pa.string()), "_source": [u["source"]] * n,
                                   "_row": pa.array(np.arange(first, first + n)), "label": ["x"] * n,
                                   "error": pa.nulls(n, pa.string()), "input_tokens": pa.array(np.full(n, 7))}),
                         str(out))


def measure(corpus_dir: str, out: str) -> dict:
    """Child process: the driver's steps, timed, with peak memory above the imported baseline."""
    base = vm("VmRSS")
    t = time.perf_counter()
    corpus = C.plan(C.list_input_files([corpus_dir]), ["id", "text"], ["id"])
    t_plan = time.perf_counter() - t
    partial = out + "-partial"
    t = time.perf_counter()
    todo = C.pending(corpus.units, C.scan_output(partial))
    t_resume = time.perf_counter() - t
    t = time.perf_counter()
    problems = C.verify(corpus, state := C.scan_output(out))
    t_verify = time.perf_counter() - t
    return {"rows": corpus.rows, "files": len(corpus.file_rows), "units": len(corpus.units), "parts": state.parts,
            "pending_units_after_kill": len(todo), "problems": problems, "plan_s": round(t_plan, 3),
            "resume_scan_s": round(t_resume, 3), "verify_s": round(t_verify, 3),
            "driver_peak_growth_mib": round((vm("VmHWM") - base) / 2**20, 1), "baseline_rss_mib": round(base / 2**20, 1)}


def bookkeeping(rows: int, files: int, part_rows: int, scratch: Path) -> dict:
    work = scratch / f"{rows}-{files}"
    if work.exists():
        shutil.rmtree(work)
    t = time.perf_counter()
    make_corpus(work / "corpus", rows, files)
    corpus = C.plan(C.list_input_files([str(work / "corpus")]), ["id"])
    unfinished = {s for i, s in enumerate(sorted(corpus.file_rows)) if i % 10 == 0}  # a run killed at 90%
    write_output(corpus, work / "out-partial", part_rows, lambda s: s not in unfinished)
    (work / "out").mkdir()
    for p in (work / "out-partial").iterdir():  # the complete output: the partial one plus the rest
        os.link(p, work / "out" / p.name)
    write_output(corpus, work / "out", part_rows, lambda s: s in unfinished)
    print(f"  {rows:,} rows: corpus and output written in {time.perf_counter() - t:.0f} s", flush=True)
    child = subprocess.run([sys.executable, __file__, "--measure", str(work / "corpus"), str(work / "out")],
                           capture_output=True, text=True, check=True)
    result = json.loads(child.stdout.strip().splitlines()[-1])
    shutil.rmtree(work)
    return result


def end_to_end(rows: int, scratch: Path) -> dict:
    """The job script on local Ray with the tiniest classifier, killed half way, then resumed."""
    import ray

    from bloom import BloomForSequenceClassification
    from bloom.tiny import make_tiny_checkpoint

    work = scratch / "e2e"
    shutil.rmtree(work, ignore_errors=True)
    model = make_tiny_checkpoint(work / "model", BloomForSequenceClassification, hidden_size=16, n_layer=1, n_head=2,
                                 id2label={0: "a", 1: "b"})
    files = max(1, rows // 5000)
    make_corpus(work / "corpus", rows, files)
    out = work / "out"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ctx = ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        args = [sys.executable, str(ROOT.parent / "jobs" / "label_corpus.py"), "--task", "classify", "--model",
                str(model), "--input", str(work / "corpus"), "--output", str(out), "--rows-per-batch", "1024"]
        env = {**os.environ, "RAY_ADDRESS": ctx.address_info["gcs_address"]}
        start = time.perf_counter()
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and (not out.exists() or C.scan_output(str(out), clean=False).rows < rows // 2):
            time.sleep(1)
        assert proc.poll() is None, "the first run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first_s = time.perf_counter() - start
        written = C.scan_output(str(out), clean=False).rows
        start = time.perf_counter()
        done = subprocess.run(args, env=env, capture_output=True, text=True)
        resume_s = time.perf_counter() - start
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads((out / "_report.json").read_text())
        keys = pq.read_table(out, columns=["_source", "_row"])
        distinct = len(keys.group_by(["_source", "_row"]).aggregate([]))
    finally:
        ray.shutdown()
    shutil.rmtree(work)
    return {"rows": rows, "files": files, "killed_after_rows": written, "first_run_s": round(first_s, 1),
            "resumed_rows": report["rows_labeled_this_run"], "resume_run_s": round(resume_s, 1),
            "resume_rows_per_s": report["rows_per_second"], "rows_out": report["rows_out"], "distinct_keys": distinct,
            "every_row_once": report["rows_out"] == distinct == rows and written + report["rows_labeled_this_run"] == rows,
            "status": report["status"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000000:200,10000000:2000", help="rows:files, comma-separated")
    p.add_argument("--part-rows", type=int, default=256)
    p.add_argument("--e2e", type=int, default=0, help="rows for the end-to-end kill/resume run (0: skip)")
    p.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "bloomline-bench-scale")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_scale.json")
    p.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    results = {"machine": machine(), "part_rows": args.part_rows, "row_group_rows": ROW_GROUP, "sizes": []}
    print(describe(results["machine"]))
    for spec in filter(None, args.sizes.split(",")):
        rows, files = map(int, spec.split(":"))
        r = bookkeeping(rows, files, args.part_rows, args.scratch)
        results["sizes"].append(r)
        total = r["plan_s"] + r["resume_scan_s"] + r["verify_s"]
        print(f"{r['rows']:>12,} rows {r['files']:>6,} files {r['units']:>7,} units {r['parts']:>8,} parts | plan "
              f"{r['plan_s']:.2f} s, resume scan {r['resume_scan_s']:.2f} s, verify {r['verify_s']:.2f} s "
              f"(total {total:.2f} s) | driver peak +{r['driver_peak_growth_mib']} MiB | problems: {r['problems']}",
              flush=True)
    for a, b in zip(results["sizes"], results["sizes"][1:]):
        growth = {k: round(b[k] / a[k], 2) if a[k] else None
                  for k in ("plan_s", "resume_scan_s", "verify_s", "driver_peak_growth_mib")}
        results.setdefault("growth", []).append({"rows": [a["rows"], b["rows"]], **growth})
        print(f"growth {a['rows']:,} -> {b['rows']:,} rows: {growth}")
    if args.e2e:
        results["e2e"] = end_to_end(args.e2e, args.scratch)
        print(f"end to end: {results['e2e']}")
    write_results(results, args.out)


if __name__ == "__main__":
    main()
