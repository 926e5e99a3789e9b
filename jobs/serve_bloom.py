"""Start the online endpoint from a Serve config (default: serve_config.yaml) and serve until stopped.

    python jobs/serve_bloom.py                     # demo checkpoints, http://127.0.0.1:8000
    python jobs/serve_bloom.py --config my.yaml --port 9000

Joins the cluster named by --address or RAY_ADDRESS, else starts a local Ray of its own. Demo
checkpoints named in the config (demo/tiny-bloom-<task>) are built first if absent. `serve run serve_config.yaml` does the same for
configs that name existing checkpoints. Ctrl-C (SIGINT) or SIGTERM stops the endpoint, its replicas
and the local Ray cleanly, also when started in the background.
"""

import argparse
import signal
import sys
from pathlib import Path

from pipelines import RayUnavailable, add_ray_flags, cluster_address, init_ray

ROOT = Path(__file__).resolve().parent.parent  # the checkout: serve_config.yaml and demo/


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml", help="Serve config YAML")
    p.add_argument("--host", help="address to bind (default: the config's, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default: the config's, 8000)")
    add_ray_flags(p)
    args = p.parse_args(argv)
    try:
        cluster_address(args.address, args.ray_num_cpus)  # --ray-num-cpus with a cluster to join: refused now
    except ValueError as e:
        print(f"serve_bloom: {e}", file=sys.stderr)
        return 2

    import yaml

    config = yaml.safe_load(args.config.read_text())
    from pipelines import adapters
    from pipelines.demo import DEMO_ROOT, demo_checkpoint

    for task, settings in config["applications"][0]["args"]["tasks"].items():
        model = Path(settings["model"])
        if not model.is_absolute():
            model = ROOT / model
        if model.parent == DEMO_ROOT and not model.exists():
            demo_checkpoint(task)
        settings["model"] = str(model)
        if settings.get("adapters"):  # LoRA adapters' relative paths, as the model's, from the checkout
            settings["adapters"] = adapters.absolute(settings["adapters"], ROOT)
    from ray import serve

    from pipelines.serve import app_from_config

    try:
        print(init_ray(args.ray_num_cpus, args.address, args.ray_connect_timeout), file=sys.stderr, flush=True)
    except RayUnavailable as e:
        print(f"serve_bloom: {e}", file=sys.stderr)
        return 2
    # SIGINT and SIGTERM both stop it cleanly: a shell starts a background job with SIGINT ignored, and
    # `docker stop` / Kubernetes send SIGTERM (which Ray's own handler would answer with a stack dump).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    app, name, prefix, http = app_from_config(config)
    http = {**http, **({"host": args.host} if args.host else {}), **({"port": args.port} if args.port else {})}
    serve.start(http_options=http, logging_config=config.get("logging_config"))  # Serve's own actors' logs
    print(f"serving {name} on http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}{prefix}", flush=True)
    try:
        serve.run(app, name=name, route_prefix=prefix, blocking=True)
    except KeyboardInterrupt:  # Ctrl-C: stop the replicas and Serve, then Ray stops as the script exits
        serve.shutdown()
        print("stopped", flush=True)
    return 0


def _stop(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
