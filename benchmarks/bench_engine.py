"""Offline generation: the continuous-batching engine against today's static batched `generate`, in one run.

The corpus: prompts of 8-48 tokens whose completion lengths vary from 4 to 256 tokens (a per-row
max_new_tokens; eos off, so every row generates exactly its length). Both paths get the same batch
token budget:
  - static: rows in arrival order, in batches of budget // (longest prompt + 256) rows; each batch runs
    `model.generate` until its longest row is done (max_new_tokens = the batch's largest, which favours
    the static path: today's job uses one max_new_tokens for all rows);
  - engine: `bloom.Engine` with cache_tokens = the budget and max_seq_len = longest prompt + 256, so as
    many rows run at once as in a static batch, but a finished row's slot goes to the next row at once.
Runs are interleaved (static, engine, static, ...) and the medians reported: rows/s and generated
tokens/s (each row's own tokens), and the mean rows per decode step. A random model (wide weights),
float32, packed for CPU as the replica does.

    python benchmarks/bench_engine.py                 # ~1 min on 2 cores
    python benchmarks/bench_engine.py --hidden 1024 --vocab 16384 --repeats 1   # weight-bound, ~1.5 min
    python benchmarks/bench_engine.py --rows 64 --repeats 1

256 rows is what the labeling job hands an actor at a time (rows_per_batch): the engine runs a batch's
rows to their end before the next batch comes, so the last steps of each batch are partly empty; with
fewer rows that tail weighs more (at 64 rows, first-come-first-served scheduling alone caps the gain
at 1.46x the static steps, at 256 rows at 1.81x).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from common import describe, machine, random_lm, write_results

import torch

import bloom

ROOT = Path(__file__).resolve().parent
MAX_NEW = 256


def corpus(rows: int, vocab: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, vocab) for _ in range(rng.randint(8, 48))] for _ in range(rows)]
    return prompts, [rng.randint(4, MAX_NEW) for _ in range(rows)]


def run_static(model, prompts, lengths, batch_rows: int) -> list[list[int]]:
    outputs = []
    for start in range(0, len(prompts), batch_rows):
        group = prompts[start : start + batch_rows]
        T = max(map(len, group))
        ids = torch.tensor([[0] * (T - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in group])
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max(lengths[start : start + batch_rows]),
                             eos_token_id=[])
        outputs += [out[j, T : T + n].tolist() for j, n in enumerate(lengths[start : start + batch_rows])]
    return outputs


def run_engine(model, prompts, lengths, budget: int, prefill_chunk: int) -> tuple[list[list[int]], float]:
    """Outputs, and the mean number of sequences holding a slot per step (batch occupancy)."""
    engine = bloom.Engine(model, cache_tokens=budget, max_seq_len=48 + MAX_NEW, prefill_chunk=prefill_chunk)
    seqs = [engine.submit(p, bloom.GenerationParams(max_new_tokens=n, eos_token_id=())) for p, n in zip(prompts, lengths)]
    occupancy = []
    while engine.has_work:
        engine.step()
        occupancy.append(len(engine.running) + len(engine.prefilling))
    return [s.output_ids for s in seqs], statistics.mean(occupancy)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256, help="the job hands an actor 256 rows at a time (rows_per_batch)")
    p.add_argument("--batch-rows", type=int, default=16, help="static batch rows; sets the token budget")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_engine.json")
    args = p.parse_args(argv)

    model, packed = random_lm(args)
    prompts, lengths = corpus(args.rows, args.vocab)
    budget = args.batch_rows * (48 + MAX_NEW)  # the static batch's padded tokens at its longest
    generated = sum(lengths)
    info = machine()
    print(f"machine: {describe(info)}, {info['threads']} threads")
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, float32, {packed} Linear packed")
    print(f"corpus: {args.rows} rows, prompts 8-48 tokens, completions 4-{MAX_NEW} ({generated} tokens); "
          f"budget {budget} tokens = {args.batch_rows} static rows x (48 + {MAX_NEW})")

    contenders = {
        "static": lambda: (run_static(model, prompts, lengths, args.batch_rows), float(args.batch_rows)),
        "engine": lambda: run_engine(model, prompts, lengths, budget, args.prefill_chunk),
    }
    times = {name: [] for name in contenders}
    outputs, occupancy = {}, {}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            outputs[name], occupancy[name] = fn()
            times[name].append(time.perf_counter() - start)

    results = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "budget_tokens": budget,
               "generated_tokens": generated, "runs": {}}
    base = statistics.median(times["static"])
    print(f"{'path':<18}{'seconds':>9}{'rows/s':>9}{'tokens/s':>10}{'speed-up':>10}{'occupancy':>11}{'same as static':>16}")
    for name, t in times.items():
        sec = statistics.median(t)
        same = sum(a == b for a, b in zip(outputs[name], outputs["static"]))
        assert all(len(o) == n for o, n in zip(outputs[name], lengths))
        results["runs"][name] = {"seconds": t, "median_seconds": sec, "rows_per_s": args.rows / sec,
                                 "tokens_per_s": generated / sec, "speedup": base / sec,
                                 "mean_rows_per_step": occupancy[name], "rows_identical_to_static": same}
        print(f"{name:<18}{sec:>9.2f}{args.rows / sec:>9.1f}{generated / sec:>10.0f}{base / sec:>9.2f}x"
              f"{occupancy[name]:>11.1f}{same:>12}/{args.rows}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
