"""The generation cache's size against offline throughput: how many sequences the engine runs at once.

The labeling replica (task generate, the job's defaults: max_input_tokens 1024, max_new_tokens 32, so
slots of 1056 tokens, dtype "fast") labels the same 256 rows of skewed lengths (what the job hands an
actor at a time) with caches of 1, 4, 7, 16 and 32 slots. 7 was the default before (the batch token
budget, 8192 tokens); 16 is the default now (`bloom.engine.fit_cache_tokens`). Runs are interleaved and
the medians reported: generated tokens/s, and the ratio to 7 slots. A random model (wide weights).

    python benchmarks/bench_cache.py                        # hidden 1024 x 8 layers, ~7 min on 2 cores
    python benchmarks/bench_cache.py --hidden 256 --layers 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench_model import timed
from bench_pipeline import skewed_corpus
from common import bench_main, describe, machine

import torch

from bloom.tiny import make_tiny_checkpoint
from pipelines.config import LabelConfig
from pipelines.replica import BloomReplica

ROOT = Path(__file__).resolve().parent
SLOT = 1024 + 32  # max_input_tokens + max_new_tokens, the job's defaults


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    model = make_tiny_checkpoint(work / "model", hidden_size=args.hidden, n_layer=args.layers, n_head=16,
                                 vocab_size=4096, std=0.05 if args.hidden >= 512 else 0.3)
    rows = skewed_corpus(args.rows)
    replicas = {slots: BloomReplica(LabelConfig(task="generate", model=str(model), max_errored_fraction=None,
                                                cache_tokens=slots * SLOT), num_threads=torch.get_num_threads())
                for slots in args.slots}
    generated = {}

    def label(slots):
        def go():
            generated[slots] = sum(r["completion_tokens"] or 0 for r in replicas[slots].label_rows(rows))
        return go

    times = timed({slots: label(slots) for slots in args.slots}, args.repeats)
    base = generated[7] / times[7] if 7 in times else None
    return {"machine": machine(), "model": {"hidden": args.hidden, "layers": args.layers, "vocab": 4096},
            "dtype": str(replicas[args.slots[0]].model.dtype), "rows": args.rows, "repeats": args.repeats,
            "runs": [{"slots": s, "generated_tokens": generated[s], "seconds": times[s],
                      "generated_tok_s": generated[s] / times[s],
                      "vs_7_slots": generated[s] / times[s] / base if base else None} for s in args.slots]}


def print_results(results: dict) -> None:
    m = results["model"]
    print(f"{describe(results['machine'])}; {results['machine'].get('threads')} threads; hidden {m['hidden']} x "
          f"{m['layers']} layers, {results['dtype']}; {results['rows']} rows, medians of {results['repeats']}")
    for r in results["runs"]:
        ratio = f" (x{r['vs_7_slots']:.2f} of 7 slots)" if r["vs_7_slots"] else ""
        print(f"  {r['slots']:>3} slots: {r['generated_tok_s']:7.1f} generated tok/s{ratio}")


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--slots", type=int, nargs="+", default=[1, 4, 7, 16, 32])
    p.add_argument("--repeats", type=int, default=3)


def main(argv=None) -> int:
    return bench_main(argv, __doc__, ROOT / "results" / "bench_cache.json", arguments, run, print_results)


if __name__ == "__main__":
    sys.exit(main())
