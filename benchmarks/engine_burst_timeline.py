"""Where a burst request's time to first token goes inside the engine (no HTTP): `--clients` prompts
sharing a `--prefix`-token template arrive at once on a started engine (the template computed once
before, as bench_serve_prefix.py does), with the prefix cache on, then off. Prints each engine step
(start, duration, decode rows, prefill tokens and chunks, sequences admitted) and each request's
timeline: wait for a slot, steps until its first token, TTFT. The endpoint's TTFT less this one is
the HTTP / Serve part (bench_serve_prefix.py --timeline prints the endpoint's per request).

    python benchmarks/engine_burst_timeline.py            # ~20 s on 2 cores
    python benchmarks/engine_burst_timeline.py --prefill-chunk 512 --cold
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from common import random_lm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def traced(engine, log: list[dict]):
    """Wrap engine.step to record each step that runs the model: its start, duration and decision."""
    step = engine.step

    def run():
        before = {s: s.num_cached for s in [*engine.waiting, *engine.prefilling, *engine.running]}
        before.update({s: 0 for _, s in list(engine._inbox)})
        decode, reused = len(engine.running), engine.prompt_tokens_reused
        waiting, start = len(engine.waiting) + len(engine._inbox), time.perf_counter()
        out = step()
        grown = sum(s.num_cached - n for s, n in before.items())
        log.append({"start": start, "ms": 1000 * (time.perf_counter() - start), "decode": decode,
                    "waiting": waiting, "prefilling": len(engine.prefilling),
                    "prefill": grown - decode - (engine.prompt_tokens_reused - reused),
                    "reused": engine.prompt_tokens_reused - reused})
        return out

    engine.step = run


def burst(model, prompts, params, prefix_cache: bool, prefill_chunk: int, cold: bool):
    import torch

    from bloom.engine import Engine

    engine = Engine(model, cache_tokens=len(prompts) * 512, max_seq_len=512, prefill_chunk=prefill_chunk,
                    prefix_cache=prefix_cache)
    log: list[dict] = []
    traced(engine, log)
    engine.start(on_start=lambda: torch.set_num_threads(1))
    try:
        if not cold:
            engine.generate([prompts[0]], params)
        log.clear()
        t0 = time.perf_counter()
        seqs = [engine.submit(p, params) for p in prompts[1:]]
        for s in seqs:
            s.result()
    finally:
        engine.stop()
    print(f"prefix_cache {'on' if prefix_cache else 'off'}: steps (ms from the burst, duration, sequences "
          f"waiting before, decoding, prefilling after; prompt tokens computed, and copied from the prefix cache)")
    for r in log:
        print(f"  {1000 * (r['start'] - t0):7.1f} {r['ms']:6.1f} ms  waiting {r['waiting']:2d}  decode "
              f"{r['decode']:2d}  prefilling {r['prefilling']:2d}  prefill {r['prefill']:4d}  reused {r['reused']:4d}")
    print("  request: slot wait ms, steps to its first token, TTFT ms")
    ttft = []
    for i, s in enumerate(seqs):
        first = s.times["first_token"]
        steps = sum(1 for r in log if s.times["submitted"] <= r["start"] < first)
        ttft.append(1000 * (first - s.times["submitted"]))
        print(f"  {i:3d} {1000 * (s.times['admitted'] - s.times['submitted']):7.1f} {steps:3d} {ttft[-1]:7.1f}")
    stats = engine.stats()
    print(f"  TTFT p50 {statistics.median(ttft):.1f} ms, max {max(ttft):.1f} ms; prompt tokens computed "
          f"{stats['prompt_tokens'] - stats['prefix_tokens_reused']} of {stats['prompt_tokens']}")
    return statistics.median(ttft)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--prefix", type=int, default=400)
    p.add_argument("--own", type=int, default=24, help="each prompt's own tokens after the template")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--cold", action="store_true", help="the template not computed before the burst")
    args = p.parse_args(argv)

    import torch

    from bloom.engine import GenerationParams

    torch.set_num_threads(1)
    model, _ = random_lm(args)
    rng = random.Random(0)
    prefix = [rng.randrange(4, args.vocab) for _ in range(args.prefix)]
    prompts = [prefix + [rng.randrange(4, args.vocab) for _ in range(args.own)] for _ in range(args.clients + 1)]
    params = GenerationParams(max_new_tokens=args.new_tokens, eos_token_id=())
    on = burst(model, prompts, params, True, args.prefill_chunk, args.cold)
    off = burst(model, prompts, params, False, args.prefill_chunk, args.cold)
    print(f"engine TTFT p50 on/off x{on / off:.2f} ({on:.0f} vs {off:.0f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
