"""Generation on the online endpoint: continuous batching under mixed load (loopback only, bounded).

Starts local Ray and the endpoint from serve_config.yaml (one replica; a tiny random causal LM for
generate and a tiny classifier for classify), then measures:
  1. throughput: `--clients` concurrent clients send completions with max_tokens drawn from 4..256;
     generated tokens/s and requests/s;
  2. short requests under load: while 3 clients run 192-token generations, the latency of a 4-token
     completion and of a /v1/classify, against the same requests on the idle endpoint (medians);
  3. TTFT and TPOT p50/p99 of streamed completions (from the SSE chunks' arrival times).

    python benchmarks/bench_serve_generate.py                     # ~2 minutes on 2 cores
    python benchmarks/bench_serve_generate.py --baseline 52de9e6  # against the static path, one command

--baseline REV runs the same measurements on the code of git revision REV too (exported from this
repository into a temporary folder; 52de9e6 is the last commit whose endpoint batched generation
statically), alternating baseline and this tree `--repeats` times, and prints both with their ratios.
"""

import argparse
import dataclasses
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import against_baseline, describe, machine, write_results

ROOT = Path(__file__).resolve().parent


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1)))] if values else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=64, help="completions in the throughput run (bounded)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_serve_generate.json")
    p.add_argument("--baseline", metavar="REV", help="also measure git revision REV's code, interleaved")
    p.add_argument("--repeats", type=int, default=2, help="with --baseline: runs of each, alternating")
    p.add_argument("--code", type=Path, default=ROOT.parent, help=argparse.SUPPRESS)  # the tree to measure
    args = p.parse_args(argv)
    if args.baseline:
        return compare(args, argv if argv is not None else sys.argv[1:])
    sys.path.insert(0, str(args.code))  # before any import of bloom or pipelines (Ray's workers: see compare)

    import requests
    import yaml

    import bloom
    from bloom.tiny import SAMPLE_TEXT, make_tiny_checkpoint

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from pipelines.serve import app_from_config

    tmp = Path(tempfile.mkdtemp())
    lm = make_tiny_checkpoint(tmp / "lm", hidden_size=args.hidden, n_layer=args.layers, n_head=8, vocab_size=4096)
    clf = make_tiny_checkpoint(tmp / "clf", bloom.BloomForSequenceClassification, hidden_size=args.hidden,
                               n_layer=args.layers, n_head=8, id2label={0: "a", 1: "b"})
    from pipelines.config import LabelConfig

    config = yaml.safe_load((args.code / "serve_config.yaml").read_text())
    application = config["applications"][0]
    generate = {"model": str(lm), "max_input_tokens": 256, "cache_tokens": 8192, "dtype": "float32"}
    known = {f.name for f in dataclasses.fields(LabelConfig)}  # a baseline may predate a setting
    application["args"].update(max_new_tokens_cap=256, tasks={
        "generate": {k: v for k, v in generate.items() if k in known},
        "classify": {"model": str(clf), "max_input_tokens": 256}})
    application["deployments"][0].update(autoscaling_config=None, num_replicas=1, ray_actor_options={"num_cpus": 1})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app, name, prefix, _ = app_from_config(config)
    serve.run(app, name=name, route_prefix=prefix)
    base = f"http://127.0.0.1:{port}"
    rng = random.Random(0)
    prompts = [SAMPLE_TEXT[i % len(SAMPLE_TEXT)][:120] for i in range(args.requests)]

    def complete(prompt, max_tokens, stream=False):
        start, marks = time.perf_counter(), []
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        with requests.post(base + "/v1/completions", json=body, timeout=300, stream=stream) as r:
            if stream:
                for line in r.iter_lines(decode_unicode=True):
                    if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                        marks.append(time.perf_counter() - start)
                return marks
            r.raise_for_status()
            return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]

    def classify(text):
        start = time.perf_counter()
        requests.post(base + "/v1/classify", json={"inputs": text}, timeout=300).raise_for_status()
        return time.perf_counter() - start

    for prompt in prompts[:4]:  # warm-up
        complete(prompt, 8)
        classify(prompt)
    results = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}

    # 1. throughput with mixed lengths
    lengths = [rng.randint(4, 256) for _ in prompts]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        done = list(pool.map(lambda i: complete(prompts[i], lengths[i]), range(len(prompts))))
    wall = time.perf_counter() - start
    generated = sum(n for _, n in done)
    results["throughput"] = {"requests": len(done), "clients": args.clients, "seconds": wall,
                             "generated_tokens": generated, "generated_tokens_per_s": generated / wall,
                             "requests_per_s": len(done) / wall,
                             "latency_p50_s": pct([t for t, _ in done], 0.5),
                             "latency_p99_s": pct([t for t, _ in done], 0.99)}
    print(f"throughput: {generated / wall:7.1f} generated tokens/s, {len(done) / wall:5.2f} requests/s "
          f"({args.clients} clients, max_tokens 4..256)")

    # 2. short requests, idle then under load (interleaved samples, medians)
    def short_latencies(n=8):
        return ([complete(prompts[i % len(prompts)], 4)[0] for i in range(n)],
                [classify(prompts[i % len(prompts)]) for i in range(n)])

    idle_gen, idle_clf = short_latencies()
    stop = threading.Event()

    def long_client(k):
        while not stop.is_set():
            complete(prompts[k], 192)

    loaders = [threading.Thread(target=long_client, args=(k,)) for k in range(3)]
    for t in loaders:
        t.start()
    time.sleep(1.0)
    busy_gen, busy_clf = short_latencies()
    stop.set()
    for t in loaders:
        t.join()
    short = {"completion_4_tokens": {"idle_ms": 1000 * statistics.median(idle_gen),
                                     "under_load_ms": 1000 * statistics.median(busy_gen)},
             "classify": {"idle_ms": 1000 * statistics.median(idle_clf), "under_load_ms": 1000 * statistics.median(busy_clf)}}
    for v in short.values():
        v["ratio"] = v["under_load_ms"] / v["idle_ms"]
    results["short_under_load"] = short
    for k, v in short.items():
        print(f"{k:20s}: idle {v['idle_ms']:7.1f} ms, with 3 clients generating 192 tokens {v['under_load_ms']:7.1f} ms "
              f"(x{v['ratio']:.2f})")

    # 3. streamed: TTFT and TPOT
    with ThreadPoolExecutor(8) as pool:
        marks = list(pool.map(lambda i: complete(prompts[i], 64, stream=True), range(16)))
    ttft = [m[0] for m in marks if m]
    tpot = [(m[-1] - m[0]) / (len(m) - 1) for m in marks if len(m) > 1]
    results["stream"] = {"ttft_p50_ms": 1000 * pct(ttft, 0.5), "ttft_p99_ms": 1000 * pct(ttft, 0.99),
                         "tpot_p50_ms": 1000 * pct(tpot, 0.5), "tpot_p99_ms": 1000 * pct(tpot, 0.99)}
    print("streams (8 clients, 64 tokens): TTFT p50 {ttft_p50_ms:.1f} ms p99 {ttft_p99_ms:.1f} ms; "
          "TPOT p50 {tpot_p50_ms:.1f} ms p99 {tpot_p99_ms:.1f} ms".format(**results["stream"]))
    results["engine"] = requests.get(base + "/v1/stats", timeout=10).json().get("engine")
    if results["engine"]:
        print(f"engine: mean rows per step {results['engine']['mean_rows_per_step']:.1f}, "
              f"ended {results['engine']['ended']}")
    print(f"machine: {describe(results['machine'])}")
    serve.shutdown()
    ray.shutdown()
    write_results(results, args.out)
    return 0


FIGURES = [("generated tokens/s, mixed max_tokens", ("throughput", "generated_tokens_per_s")),
           ("requests/s", ("throughput", "requests_per_s")),
           ("4-token completion under load / idle", ("short_under_load", "completion_4_tokens", "ratio")),
           ("classify under load / idle", ("short_under_load", "classify", "ratio")),
           ("TTFT p50 ms", ("stream", "ttft_p50_ms")), ("TTFT p99 ms", ("stream", "ttft_p99_ms")),
           ("TPOT p50 ms", ("stream", "tpot_p50_ms")), ("TPOT p99 ms", ("stream", "tpot_p99_ms"))]


def compare(args, argv: list[str]) -> int:
    """Run this script on the baseline's code and on this tree, alternating, each in its own process (and
    its own Ray); print each figure's medians and this tree's ratio to the baseline."""
    runs = against_baseline(Path(__file__), args.baseline, argv, args.repeats)

    def figure(result, path):
        for key in path:
            result = result[key]
        return result

    print(f"\n{'':40s} {'baseline ' + args.baseline:>18s} {'this tree':>12s} {'ratio':>8s}")
    table = {}
    for label, path in FIGURES:
        base = statistics.median(figure(x, path) for x in runs["baseline"])
        this = statistics.median(figure(x, path) for x in runs["this tree"])
        table[label] = {"baseline": base, "this_tree": this, "ratio": this / base}
        print(f"{label:40s} {base:18.2f} {this:12.2f} {this / base:7.2f}x")
    machine_info = runs["this tree"][-1]["machine"]
    print(f"medians of {args.repeats} alternating runs each; machine: {describe(machine_info)}")
    write_results({"machine": machine_info, "baseline": args.baseline, "repeats": args.repeats, "figures": table,
                   "runs": runs}, args.out.with_name(args.out.stem + "_vs_baseline.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
