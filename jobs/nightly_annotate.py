"""Annotate the partitions of a corpus that are new or changed since the last successful run.

On a cluster:  ray job submit --working-dir . -- python jobs/nightly_annotate.py --config nightly.yaml
On a laptop:   python jobs/nightly_annotate.py --config nightly.yaml        (a local Ray of its own)
A demo:        python jobs/nightly_annotate.py       (no --config: demo partitions and checkpoints)
Joins a cluster only when --address or RAY_ADDRESS names one, and starts or joins Ray only when a
partition needs labeling.

The YAML names the corpus root (partition directories such as date=2026-11-23/), the output root
and the annotators (name, task, model and any labeling setting); see deploy/nightly.yaml. Each
partition is published atomically; rerunning is safe, and a killed run resumes its work.
`output_format: delta` (or --output-format delta) writes a Delta Lake table instead (docs/nightly.md).

Exit status: 0 succeeded (also when there was nothing to do), 1 some partition failed (the others
were published), 2 bad configuration or input, 75 another run holds the output (its lock, or for delta its claim / a commit came first).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines import RayUnavailable, add_ray_flags, cluster_address
from pipelines.nightly import LockHeld, NightlyConfig

EXIT_LOCKED = 75  # EX_TEMPFAIL: try again later


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML: corpus, output, annotators, ... (default: a demo)")
    p.add_argument("--corpus", help="corpus root (overrides the YAML)")
    p.add_argument("--output", help="output root (overrides the YAML)")
    p.add_argument("--wait", type=float, dest="lock_wait", help="seconds to wait for a running job's lock (default 0)")
    p.add_argument("--prune", action="store_const", const=True,
                   help="unpublish partitions deleted from the corpus (delta: also drop dropped annotators' columns)")
    p.add_argument("--output-format", choices=["parquet", "delta"],
                   help="parquet: partition directories (local or shared mount); delta: a Delta table (also s3://, gs://)")
    p.add_argument("--dry-run", action="store_true", help="print what would be labeled, label nothing")
    add_ray_flags(p)
    args = p.parse_args(argv)
    overrides = {k: v for k in ("corpus", "output", "lock_wait", "prune", "output_format") if (v := getattr(args, k)) is not None}
    try:
        cluster_address(args.address, args.ray_num_cpus)  # --ray-num-cpus with a cluster to join: refused now
        if args.config is None:
            from pipelines.demo import demo_nightly

            args.config = demo_nightly()
        config = NightlyConfig.from_yaml(args.config, **overrides)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"nightly_annotate: {e}", file=sys.stderr)
        return 2
    from pipelines import init_ray
    from pipelines.nightly import annotator_fingerprints, run_nightly

    try:
        annotator_fingerprints(config)  # every annotator's model fits its task, before Ray starts
    except (ValueError, FileNotFoundError) as e:
        print(f"nightly_annotate: {e}", file=sys.stderr)
        return 2

    def connect():
        print(init_ray(args.ray_num_cpus, args.address, args.ray_connect_timeout), file=sys.stderr, flush=True)

    try:  # Ray starts only once the output's lock is held and a partition needs labeling
        report = run_nightly(config, dry_run=args.dry_run, connect=connect)
    except LockHeld as e:
        print(f"nightly_annotate: {e}; not running", file=sys.stderr)
        return EXIT_LOCKED
    except (ValueError, FileNotFoundError, RayUnavailable) as e:
        print(f"nightly_annotate: {e}", file=sys.stderr)
        return 2
    for note in report["notes"]:
        print(f"recovered: {note}")
    verb = "would label" if args.dry_run else "labeled"
    print(f"{verb} {len(report['new'])} new and {len(report['changed'])} changed partition(s); "
          f"{len(report['unchanged'])} unchanged; {len(report['deleted'])} gone from the corpus"
          + (f" ({len(report['pruned'])} pruned)" if report["pruned"] else ""))
    if args.dry_run:
        for kind in ("new", "changed", "unchanged", "deleted"):
            for key in report[kind]:
                print(f"  {kind:9s} {key}")
    names = [a.name for a in config.annotators]
    for item in report["published"]:
        reused = item.get("reused") or []
        relabeled = [n for n in names if n not in reused]
        print(f"published {item['partition']}: {item['rows']} rows, errored {item['errored_rows']}; "
              f"relabeled: {', '.join(relabeled) or 'none'}; reused: {', '.join(reused) or 'none'}")
    if report.get("recast"):
        print(f"recast {len(report['recast'])} published partition(s) to the id / kept column types all partitions "
              f"now share: {', '.join(report['recast'])}")
    if report.get("table_version") is not None:
        print(f"Delta table at version {report['table_version']}"
              + (f"; upkeep: {report['upkeep']}" if report.get("upkeep") else ""))
    for key, why in report["failed"].items():
        print(f"FAILED {key}: {why}", file=sys.stderr)
    print(json.dumps({k: report[k] for k in ("status", "run_id", "rows_labeled")}
                     | {"published": len(report["published"]), "failed": len(report["failed"])}))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
