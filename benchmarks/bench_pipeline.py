"""The labeling pipeline against a bare in-process loop, and token-budget against fixed-size batching.

On one machine, same replica class, same checkpoint, same corpus of skewed lengths (most rows short,
a few long), task classify (a forward pass per batch):
  - bare loop: one fresh BloomReplica in this process labels the corpus once, 256 rows at a time;
  - pipeline: run_label_job on local Ray (read tasks → actor pool → atomic Parquet parts), its wall
    time from the call to the verified output (Ray itself already started); its fixed start-up cost,
    timed on a 10-row corpus, and the rate without it; and its rate once running, from the first part
    written to the last (the parts' modification times: the rows of every part but the first over that
    span: each actor batch's parts are written together, so this is timed from the first batch's
    output to the last; the corpus is written as one file per 100 rows);
  - batching: fixed batches of N rows in input order (each padded to its longest row) against
    token-budget batches with length bucketing: padding waste (padded tokens / real tokens - 1) and rows/s
    (fixed batches timed on the first 1200 rows, --fixed-timed-rows).

    python benchmarks/bench_pipeline.py            # ~4 minutes on 2 cores; overhead-heavy (hidden 384 x 4)
    python benchmarks/bench_pipeline.py --hidden 1024 --layers 12 --rows 1200 --fixed-timed-rows 400  # heavier rows
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

import bloom  # noqa: E402
from bloom.tiny import SAMPLE_TEXT, make_tiny_checkpoint  # noqa: E402
from pipelines.config import LabelConfig  # noqa: E402
from pipelines.corpus import PART_GLOB, PART_NAME  # noqa: E402
from pipelines.replica import BloomReplica  # noqa: E402
from pipelines.tasks.base import token_budget_batches  # noqa: E402
from common import describe, machine, write_results  # noqa: E402


def skewed_corpus(n: int, seed: int = 0) -> list[dict]:
    """Row lengths drawn log-normally: median ~20 words, a long tail to a few hundred."""
    rng = random.Random(seed)
    words = " ".join(SAMPLE_TEXT).split()
    rows = []
    for i in range(n):
        k = min(400, max(3, int(rng.lognormvariate(3.0, 0.9))))
        rows.append({"id": f"r{i:06d}", "text": " ".join(rng.choice(words) for _ in range(k))})
    return rows


def padding_waste(lengths: list[int], batches: list[list[int]]) -> float:
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return padded / sum(lengths) - 1


def steady_rate(output: Path) -> float | None:
    """Rows/s of a finished local output once running. Each actor batch's parts are written together,
    so parts are grouped by write time (within 0.2 s); the rate is the rows of every group but the
    first over the time from the first group to the last; None with fewer than three groups."""
    groups: list[list] = []  # [modification time, rows]
    for mtime, m in sorted((p.stat().st_mtime, PART_NAME.fullmatch(p.name)) for p in output.glob(PART_GLOB)):
        if groups and mtime - groups[-1][0] < 0.2:
            groups[-1][1] += int(m.group(3))
        else:
            groups.append([mtime, int(m.group(3))])
    if len(groups) < 3:  # too few batches (a few hundred rows) to time
        return None
    return sum(rows for _, rows in groups[1:]) / (groups[-1][0] - groups[0][0])


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2400)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--budget", type=int, default=8192, help="token budget per forward")
    p.add_argument("--fixed-rows", type=int, default=32, help="rows per fixed-size batch")
    p.add_argument("--fixed-timed-rows", type=int, default=1200, help="rows the fixed batches are timed on")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_pipeline.json")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    model = make_tiny_checkpoint(work / "model", bloom.BloomForSequenceClassification, hidden_size=args.hidden,
                                 n_layer=args.layers, n_head=8, id2label={0: "a", 1: "b", 2: "c"})
    rows = skewed_corpus(args.rows)
    corpus = work / "corpus"
    corpus.mkdir()
    files = max(4, args.rows // 100)  # parts are written per file: enough of them to time the steady rate
    for k in range(files):
        pq.write_table(pa.Table.from_pylist(rows[k::files]), corpus / f"part-{k}.parquet", row_group_size=250)
    cfg = LabelConfig(task="classify", model=str(model), input=[str(corpus)], output=str(work / "out"),
                      batch_token_budget=args.budget, max_input_tokens=2048, max_errored_fraction=None)

    replica = BloomReplica(cfg)
    lengths = [len(replica.tokenizer.encode(r["text"])) for r in rows]
    results = {"machine": machine(),
               "rows": args.rows, "tokens": sum(lengths), "model": {"hidden": args.hidden, "layers": args.layers}}

    # Batching: fixed-size batches in input order vs token budget with length bucketing (same replica).
    fixed = [list(range(i, min(i + args.fixed_rows, len(rows)))) for i in range(0, len(rows), args.fixed_rows)]
    chunks = [list(range(i, min(i + 256, len(rows)))) for i in range(0, len(rows), 256)]
    budgeted = [[c[j] for j in b] for c in chunks for b in token_budget_batches([lengths[i] for i in c], args.budget)]
    results["padding_waste_fixed"] = padding_waste(lengths, fixed)
    results["padding_waste_token_budget"] = padding_waste(lengths, budgeted)
    # The bare loop first, on a fresh replica, as the pipeline's actor runs: one cold pass.
    t_bare = timed(lambda: [replica.label_rows(rows[i : i + 256]) for i in range(0, len(rows), 256)])
    # One forward per fixed batch, padded to its longest row: no budget, no length grouping.
    replica.config.batch_token_budget, replica.runtime.length_spread = 10**9, float("inf")
    # Timed on the first --fixed-timed-rows rows only (they are slow). The corpus is drawn row by row
    # from one seed, so the first N rows are the same whatever --rows is.
    timed_fixed = [b for b in fixed if b[-1] < args.fixed_timed_rows]
    t_fixed = timed(lambda: [replica.label_rows([rows[i] for i in b]) for b in timed_fixed])
    replica.config.batch_token_budget, replica.runtime.length_spread = args.budget, 1.15
    results["fixed_rows_per_s"] = sum(map(len, timed_fixed)) / t_fixed
    results["bare_loop_rows_per_s"] = len(rows) / t_bare

    # The pipeline on local Ray, same replica class and settings.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data

    from pipelines.corpus.job import run_label_job

    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    report = {}
    t_pipe = timed(lambda: report.update(run_label_job(cfg)))
    # The fixed cost of a run (actor process, torch import, model load, Ray Data start): a 10-row corpus.
    small = work / "small"
    small.mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:10]), small / "part.parquet")
    t_small = timed(lambda: run_label_job(dataclasses.replace(cfg, input=[str(small)], output=str(work / "out-small"))))
    ray.shutdown()
    results["pipeline_rows_per_s"] = report["rows_out"] / t_pipe
    results["pipeline_share_of_bare_loop"] = results["pipeline_rows_per_s"] / results["bare_loop_rows_per_s"]
    results["pipeline_startup_s"] = t_small
    results["pipeline_after_startup_rows_per_s"] = (report["rows_out"] - 10) / (t_pipe - t_small)
    results["pipeline_steady_rows_per_s"] = steady_rate(work / "out")
    steady = results["pipeline_steady_rows_per_s"]
    results["pipeline_steady_share_of_bare_loop"] = steady and steady / results["bare_loop_rows_per_s"]
    results["pipeline_pool"] = report["pool"]

    print(f"machine: {describe(results['machine'])}, {results['machine']['threads']} threads")
    print(f"corpus: {args.rows} rows, {sum(lengths)} tokens (median {sorted(lengths)[len(lengths) // 2]}, "
          f"max {max(lengths)}); model hidden {args.hidden} × {args.layers} layers; {os.cpu_count()} CPUs")
    print(f"padding waste: fixed {args.fixed_rows}-row batches {results['padding_waste_fixed']:.0%} | "
          f"token budget {args.budget} with bucketing {results['padding_waste_token_budget']:.1%}")
    print(f"rows/s: fixed batches {results['fixed_rows_per_s']:.1f} | token budget (bare loop) "
          f"{results['bare_loop_rows_per_s']:.1f} | pipeline on Ray {results['pipeline_rows_per_s']:.1f} "
          f"({results['pipeline_share_of_bare_loop']:.0%} of the bare loop, start-up included)")
    print(f"pipeline start-up (a 10-row run) {t_small:.1f} s; without it {results['pipeline_after_startup_rows_per_s']:.1f} "
          f"rows/s ({results['pipeline_after_startup_rows_per_s'] / results['bare_loop_rows_per_s']:.0%}); once running "
          f"(first part written to last) " + (f"{steady:.1f} rows/s ({steady / results['bare_loop_rows_per_s']:.0%} of the "
                                             "bare loop)" if steady else "not timed: too few batches"))
    write_results(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
