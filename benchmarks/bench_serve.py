"""Load on the online endpoint, with and without dynamic batching (loopback only, bounded).

Starts local Ray and the endpoint from serve_config.yaml (one replica, a tiny random classifier), then
for each setting sends a fixed number of requests from concurrent clients to /v1/classify on
127.0.0.1 and reports requests/s and p50/p99 latency. "Without batching" is the same deployment with
max_batch_tokens=1 (every request its own forward), set through user_config, as a user would.

    python benchmarks/bench_serve.py            # ~1 minute on 2 cores
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import local_serve, machine, write_results

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=400, help="requests per setting (bounded)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_serve.json")
    args = p.parse_args(argv)

    import requests
    import yaml

    import bloom
    from bloom.tiny import SAMPLE_TEXT, make_tiny_checkpoint

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from pipelines.serve import app_from_config

    model = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "clf", bloom.BloomForSequenceClassification,
                                 hidden_size=args.hidden, n_layer=4, n_head=8, id2label={0: "a", 1: "b"})
    config = yaml.safe_load((ROOT.parent / "serve_config.yaml").read_text())
    application = config["applications"][0]
    application["args"]["tasks"] = {"classify": {"model": str(model), "max_input_tokens": 512}}
    deployment = application["deployments"][0]
    deployment.update(autoscaling_config=None, num_replicas=1, ray_actor_options={"num_cpus": 1})
    url = local_serve() + "/v1/classify"
    texts = [SAMPLE_TEXT[i % len(SAMPLE_TEXT)] for i in range(args.requests)]
    results = {"machine": machine(), "requests": args.requests, "clients": args.clients, "model_hidden": args.hidden, "runs": {}}

    def one(text):
        start = time.perf_counter()
        r = requests.post(url, json={"inputs": text}, timeout=60)
        return time.perf_counter() - start, r.status_code

    for name, tokens in (("without batching", 1), ("with batching", 8192)):
        deployment["user_config"] = {"max_batch_tokens": tokens, "batch_wait_timeout_s": 0.005}
        app, app_name, prefix, _ = app_from_config(config)
        serve.run(app, name=app_name, route_prefix=prefix)
        for t in texts[:20]:  # warm-up
            one(t)
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            done = list(pool.map(one, texts))
        wall = time.perf_counter() - start
        latencies = sorted(t for t, _ in done)
        ok = sum(1 for _, code in done if code == 200)
        run = {"ok": ok, "requests_per_s": ok / wall, "p50_ms": 1000 * statistics.median(latencies),
               "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))]}
        results["runs"][name] = run
        print(f"{name:17s}: {run['requests_per_s']:6.1f} requests/s, p50 {run['p50_ms']:6.1f} ms, "
              f"p99 {run['p99_ms']:6.1f} ms ({ok}/{len(done)} ok, {args.clients} clients)")
    serve.shutdown()
    ray.shutdown()
    write_results(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
