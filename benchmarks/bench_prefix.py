"""Few-shot labeling on the engine: rows under one shared ~400-token template, the prefix cache on vs off.

The corpus: a template of `--template` tokens (a few-shot prompt: instructions and examples) followed by
each row's own 24-36 tokens, 8 new tokens per row (greedy, eos off). Each run builds a fresh `bloom.Engine`
(16 slots, the cache empty: the first rows compute the template) and generates every row; runs are
interleaved (off, on, off, ...) and the medians reported as rows/s, with the ratio on/off and the prefix
hit rate (prompt tokens reused / prompt tokens). Both runs must give the same tokens.

Growth: the same rows spread over 1 and 10 distinct templates, with the default prefix budget (a quarter
of cache_tokens) and with one sized for 10 templates: blocks and bytes held, bytes per template held, the
hit rate and rows/s. A random model (wide weights), float32, packed for CPU as the replica does.

    python benchmarks/bench_prefix.py                       # ~1.5 min on 2 idle cores
    python benchmarks/bench_prefix.py --rows 64 --repeats 1 --no-growth
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from common import describe, machine, random_lm, write_results


import bloom
from bloom.engine.prefix import DEFAULT_BLOCK

ROOT = Path(__file__).resolve().parent
NEW_TOKENS = 8
SLOTS = 16


def corpus(rows: int, templates: int, template_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """rows prompts: one of `templates` templates (round robin) + the row's own 24-36 tokens."""
    rng = random.Random(seed)
    heads = [[rng.randrange(4, vocab) for _ in range(template_len)] for _ in range(templates)]
    return [heads[i % templates] + [rng.randrange(4, vocab) for _ in range(rng.randint(24, 36))] for i in range(rows)]


def run(model, prompts, prefix_cache: bool, prefix_tokens: int | None = None) -> tuple[list[list[int]], float, dict]:
    """Outputs, seconds and the engine's stats (with the process's CPU seconds, "cpu_s": on a shared
    machine they vary less than the wall time) after generating every prompt on a fresh engine."""
    longest = max(map(len, prompts)) + NEW_TOKENS
    engine = bloom.Engine(model, cache_tokens=SLOTS * longest, max_seq_len=longest, prefix_cache=prefix_cache,
                          prefix_cache_tokens=prefix_tokens)
    params = bloom.GenerationParams(max_new_tokens=NEW_TOKENS, eos_token_id=())
    start, cpu = time.perf_counter(), time.process_time()
    seqs = engine.generate(prompts, params)
    stats = {**engine.stats(), "cpu_s": time.process_time() - cpu}
    return [s.output_ids for s in seqs], time.perf_counter() - start, stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--template", type=int, default=400, help="shared template tokens")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-growth", action="store_true", help="skip the 1 vs 10 templates runs")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_prefix.json")
    args = p.parse_args(argv)

    model, packed = random_lm(args)
    prompts = corpus(args.rows, 1, args.template, args.vocab)
    info = machine()
    print(f"machine: {describe(info)}, {info['threads']} threads")
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, float32, {packed} Linear packed")
    print(f"corpus: {args.rows} rows = a {args.template}-token template + 24-36 own tokens, {NEW_TOKENS} new tokens "
          f"each; {SLOTS} slots, prefix blocks of {DEFAULT_BLOCK} tokens")

    times, cpu = {"off": [], "on": []}, {"off": [], "on": []}
    outputs, stats = {}, {}
    for _ in range(args.repeats):
        for name in times:
            outputs[name], sec, stats[name] = run(model, prompts, name == "on")
            times[name].append(sec)
            cpu[name].append(stats[name]["cpu_s"])
    assert outputs["on"] == outputs["off"], "the prefix cache changed some row's tokens"
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    results = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
               "rows_per_s": {"off": args.rows / off, "on": args.rows / on}, "seconds": times, "cpu_seconds": cpu,
               "cpu_ratio": statistics.median(cpu["off"]) / statistics.median(cpu["on"]),
               "speedup": off / on, "prefix_hit_rate": stats["on"]["prefix_hit_rate"],
               "prefix_bytes": stats["on"]["prefix_bytes"], "growth": []}
    print(f"prefix cache off: {args.rows / off:7.1f} rows/s   on: {args.rows / on:7.1f} rows/s   "
          f"x{off / on:.2f} (CPU seconds x{results['cpu_ratio']:.2f})   hit rate {stats['on']['prefix_hit_rate']:.1%}"
          f"   (medians of {args.repeats})")

    if not args.no_growth:
        template_tokens = (args.template // DEFAULT_BLOCK + 2) * DEFAULT_BLOCK  # its blocks + a row's own
        print(f"{'templates':>9}{'budget tokens':>15}{'blocks held':>13}{'MB held':>9}{'MB/template':>13}"
              f"{'MB pool':>9}{'hit rate':>10}{'rows/s':>8}")
        for templates, budget in ((1, None), (10, None), (10, 10 * template_tokens)):
            rows = corpus(args.rows, templates, args.template, args.vocab, seed=1)
            _, sec, s = run(model, rows, True, budget)
            blocks = s["prefix_blocks"] * DEFAULT_BLOCK
            entry = {"templates": templates, "budget_tokens": blocks, "blocks_held": s["prefix_blocks_held"],
                     "bytes_held": s["prefix_bytes_held"], "bytes_pool": s["prefix_bytes"],
                     "bytes_per_template": s["prefix_bytes_held"] / templates,
                     "hit_rate": s["prefix_hit_rate"], "rows_per_s": args.rows / sec}
            results["growth"].append(entry)
            print(f"{templates:>9}{blocks:>15}{entry['blocks_held']:>13}{entry['bytes_held'] / 1e6:>9.2f}"
                  f"{entry['bytes_per_template'] / 1e6:>13.2f}{entry['bytes_pool'] / 1e6:>9.2f}"
                  f"{entry['hit_rate']:>10.1%}{entry['rows_per_s']:>8.1f}")
    write_results(results, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
