"""The endpoint's prefix cache under load: 16 concurrent clients stream completions whose prompts share a
400-token prefix (a few-shot template or system prompt) and end with their own 24 tokens, with the
generate task's `prefix_cache` on and off (loopback only, bounded).

Starts local Ray and the endpoint from serve_config.yaml (one replica, a tiny random causal LM, float32),
deploys it with prefix_cache on, then off, alternating `--repeats` times (a redeploy between), and measures
per setting: TTFT p50 / p90 (the first streamed text's arrival) and generated tokens/s over the round
(every client sends `--per-client` requests one after the other, `--new-tokens` each, greedy, eos off).
Before each round one request computes the prefix, as a running endpoint would have seen it.

The clients pass a logit_bias of +100 on the tokens whose text is whole printable characters, so that
every new token streams text at once, as a trained model's do. Without it, this random model's greedy
tokens are mostly ids the tiny tokenizer has no text for, or pieces of a UTF-8 character, whose text
the endpoint holds back: the first text came many tokens after the first token, and about half of the
completions streamed no text before their end (their "TTFT" was their whole duration), which hid
the prefill time the cache saves. `--timeline` prints each request's send time, TTFT and duration.

    python benchmarks/bench_serve_prefix.py                 # ~2 minutes on 2 cores
    python benchmarks/bench_serve_prefix.py --repeats 1 --per-client 1
    python benchmarks/bench_serve_prefix.py --baseline 95b6b18   # against the endpoint before prefix caching

--baseline REV also runs the measurement on the code of git revision REV (95b6b18: the last commit before
the prefix cache, with its defaults then: 16 cache slots, prefill_chunk 256), each tree in its own process
and Ray, alternating `--repeats` times; a tree without the `prefix_cache` setting runs its one round. It
prints this tree's TTFT and tokens/s with the cache on against the baseline's: issue 21's "TTFT p50 at
most 1/3 of today's, tokens/s not lower".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import against_baseline, describe, local_serve, machine, write_results

ROOT = Path(__file__).resolve().parent


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1)))]


def whole_text(text: str) -> bool:
    """Whether a token's text streams at once: not empty, no piece of a UTF-8 character, printable."""
    return bool(text) and "\ufffd" not in text and text.isprintable()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--per-client", type=int, default=2, help="requests each client sends, one after the other")
    p.add_argument("--prefix", type=int, default=400, help="shared prompt tokens")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2, help="rounds of each setting, alternating")
    p.add_argument("--any-tokens", action="store_true",
                   help="no logit_bias (the measurement before 2026-12-03 14:30: TTFT of the first text, held back)")
    p.add_argument("--timeline", action="store_true", help="print every request's send time, TTFT and duration")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_serve_prefix.json")
    p.add_argument("--baseline", metavar="REV", help="also measure git revision REV's endpoint, interleaved")
    p.add_argument("--code", type=Path, default=ROOT.parent, help=argparse.SUPPRESS)  # the tree to measure
    args = p.parse_args(argv)
    if args.baseline:
        return compare(args, argv if argv is not None else sys.argv[1:])
    sys.path.insert(0, str(args.code))  # before any import of bloom or pipelines

    import requests
    import yaml

    from bloom.tiny import make_tiny_checkpoint

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from pipelines.config import LabelConfig
    from pipelines.serve import app_from_config

    # A tree from before the prefix cache has no such setting: its one round runs as it did then ("off").
    settings = ["on", "off"] if "prefix_cache" in {f.name for f in dataclasses.fields(LabelConfig)} else ["off"]

    vocab = 4096
    lm = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "lm", hidden_size=args.hidden, n_layer=args.layers,
                              n_head=args.hidden // 64, vocab_size=vocab)
    rng = random.Random(0)
    prefix = [rng.randrange(4, vocab) for _ in range(args.prefix)]
    prompts = [prefix + [rng.randrange(4, vocab) for _ in range(24)] for _ in range(args.clients * args.per_client + 1)]

    from bloom import BloomTokenizerFast

    tokenizer = BloomTokenizerFast.from_pretrained(lm)
    printable = {} if args.any_tokens else {str(i): 100 for i in range(vocab) if whole_text(tokenizer.decode([i]))}

    base = local_serve()

    def deploy(prefix_cache: bool) -> None:
        config = yaml.safe_load((args.code / "serve_config.yaml").read_text())
        application = config["applications"][0]
        generate = {"model": str(lm), "max_input_tokens": args.prefix + 64, "dtype": "float32"}
        if "on" in settings:  # the tree has the setting
            generate["prefix_cache"] = prefix_cache
        application["args"].update(max_new_tokens_cap=args.new_tokens, tasks={"generate": generate})
        application["deployments"][0].update(autoscaling_config=None, num_replicas=1,
                                             ray_actor_options={"num_cpus": 1})
        app, name, route_prefix, _ = app_from_config(config)
        serve.run(app, name=name, route_prefix=route_prefix)

    timeline: list[tuple[float, float, float]] = []  # (sent, seconds to the first text, to the end) per request

    def stream(prompt) -> tuple[float, int]:
        """(seconds to the first text, generated tokens) of one streamed completion."""
        start, first, tokens = time.perf_counter(), None, 0
        body = {"prompt": prompt, "max_tokens": args.new_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "logit_bias": printable or None}
        with requests.post(base + "/v1/completions", json=body, timeout=300, stream=True) as r:
            r.raise_for_status()
            for line in r.iter_lines(decode_unicode=True):
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        end = time.perf_counter() - start
        timeline.append((start, first if first is not None else float("nan"), end))
        return first if first is not None else end, tokens

    def client(k: int) -> list[tuple[float, int]]:
        return [stream(prompts[1 + k * args.per_client + j]) for j in range(args.per_client)]

    rounds: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(args.repeats):
        for name in rounds:
            deploy(name == "on")
            stream(prompts[0])  # the prefix seen once before the round (and the replica warmed)
            timeline.clear()
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                done = [x for part in pool.map(client, range(args.clients)) for x in part]
            wall = time.perf_counter() - start
            ttft = [t for t, _ in done]
            stats = requests.get(base + "/v1/stats", timeout=10).json()["engine"]
            rounds[name].append({"ttft_p50_ms": 1000 * pct(ttft, 0.5), "ttft_p90_ms": 1000 * pct(ttft, 0.9),
                                 "tokens_per_s": sum(n for _, n in done) / wall, "seconds": wall,
                                 "prefix_hit_rate": stats.get("prefix_hit_rate", 0.0)})
            print(f"prefix_cache {name:3s}: TTFT p50 {rounds[name][-1]['ttft_p50_ms']:7.1f} ms  "
                  f"p90 {rounds[name][-1]['ttft_p90_ms']:7.1f} ms  {rounds[name][-1]['tokens_per_s']:6.1f} tokens/s  "
                  f"hit rate {rounds[name][-1]['prefix_hit_rate']:.1%}", flush=True)
            if args.timeline:
                print("    sent at ms   TTFT ms   end ms")
                for sent, first, end in sorted(timeline):
                    print(f"    {1000 * (sent - start):10.0f} {1000 * first:9.0f} {1000 * end:8.0f}")
    serve.shutdown()
    ray.shutdown()

    med = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rounds.items()}
    results = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds,
               "median": med}
    print(f"{args.clients} clients x {args.per_client} streamed completions, {args.prefix}-token shared prefix + 24 own, "
          f"{args.new_tokens} new tokens; medians of {args.repeats} alternating rounds:")
    if "on" in med:
        results.update(ttft_p50_on_over_off=med["on"]["ttft_p50_ms"] / med["off"]["ttft_p50_ms"],
                       tokens_per_s_on_over_off=med["on"]["tokens_per_s"] / med["off"]["tokens_per_s"])
        print(f"  TTFT p50 on/off x{results['ttft_p50_on_over_off']:.2f} ({med['on']['ttft_p50_ms']:.0f} vs "
              f"{med['off']['ttft_p50_ms']:.0f} ms)   tokens/s on/off x{results['tokens_per_s_on_over_off']:.2f} "
              f"({med['on']['tokens_per_s']:.1f} vs {med['off']['tokens_per_s']:.1f})")
    print(f"machine: {describe(results['machine'])}")
    write_results(results, args.out)
    return 0


def compare(args, argv: list[str]) -> int:
    """This tree with the cache on against the baseline revision's endpoint (each run in its own process)."""
    runs = against_baseline(Path(__file__), args.baseline, argv, args.repeats)
    figures = {}
    for key in ("ttft_p50_ms", "ttft_p90_ms", "tokens_per_s"):
        base = statistics.median(r["median"]["off"][key] for r in runs["baseline"])
        this = statistics.median(r["median"]["on"][key] for r in runs["this tree"])
        off = statistics.median(r["median"]["off"][key] for r in runs["this tree"])
        figures[key] = {"baseline": base, "this_tree_on": this, "this_tree_off": off, "ratio": this / base}
    print(f"\n{'':14s} {'baseline ' + args.baseline:>18s} {'this tree, on':>14s} {'(off)':>8s} {'ratio':>7s}")
    for key, f in figures.items():
        print(f"{key:14s} {f['baseline']:18.1f} {f['this_tree_on']:14.1f} {f['this_tree_off']:8.1f} {f['ratio']:6.2f}x")
    print(f"goals: TTFT p50 ratio <= 0.33, tokens/s ratio >= 1; medians of {args.repeats} alternating runs each; "
          f"machine: {describe(runs['this tree'][-1]['machine'])}")
    write_results({"machine": runs["this tree"][-1]["machine"], "baseline": args.baseline, "repeats": args.repeats,
                   "figures": figures, "runs": runs}, args.out.with_name(args.out.stem + "_vs_baseline.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
