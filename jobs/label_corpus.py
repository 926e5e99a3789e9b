"""Label a Parquet corpus with BLOOM on Ray: generation, classification, NER or extractive QA.

On a cluster:   ray job submit --working-dir . -- python jobs/label_corpus.py --task ner --model /models/x --input s3://b/in --output s3://b/out
On a laptop:    python jobs/label_corpus.py --task ner          (demo checkpoint and corpus, local Ray)

Joins the Ray cluster named by --address or RAY_ADDRESS (as under `ray job submit`), else starts a local
Ray of its own (never one that `ray start` left on the machine). Bad input and a finished output are
found before Ray starts; a rerun of a finished job starts no Ray.
A killed run, rerun with the same arguments, resumes; every input row is written exactly once.
Settings come from --config FILE (YAML, any LabelConfig field) and the flags below, which win; each flag
is a setting declared in pipelines/tasks/settings.py (its help and default come from there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from pipelines import RAY_FLAGS, add_ray_flags
from pipelines.config import TASKS, LabelConfig
from pipelines.tasks.settings import SETTINGS, add_flags, default

def parser() -> argparse.ArgumentParser:
    """The command line: --task, --config, a flag per declared setting, and the Ray flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default=None, help=f"{SETTINGS['task'].help} (default: {default('task')})")
    p.add_argument("--config", type=Path, help="YAML file with any LabelConfig settings; flags win over it")
    add_flags(p)
    add_ray_flags(p)
    return p


def parse_args(argv=None) -> tuple[LabelConfig, argparse.Namespace]:
    args = parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", *RAY_FLAGS)}
    config = LabelConfig.from_yaml(args.config, **flags) if args.config else LabelConfig.from_dict(flags)
    return config, args


def with_demo_defaults(config: LabelConfig) -> LabelConfig:
    """Fill in the demo checkpoint, corpus and output for whatever was not given. The default output is
    named after the model when it is not the demo's, so that labeling the demo corpus with another
    checkpoint does not collide with the demo's own output (which would be refused)."""
    from pipelines.demo import DEMO_ROOT, demo_checkpoint, demo_corpus

    changes = {}
    if not config.model:
        changes["model"] = str(demo_checkpoint(config.task))
    if not config.input:
        changes["input"] = [str(demo_corpus())]
    if not config.output:
        suffix = "" if not config.model else "-" + (Path(config.model.rstrip("/")).name or "model")
        changes["output"] = str(DEMO_ROOT / f"out-{config.task}{suffix}")
    return dataclasses.replace(config, **changes) if changes else config


def main(argv=None) -> int:
    from pipelines import RayUnavailable, cluster_address, init_ray
    from pipelines.corpus.job import JobFailed, plan_label_job, run_label_job

    try:
        config, args = parse_args(argv)
        cluster_address(args.address, args.ray_num_cpus)  # --ray-num-cpus with a cluster to join: refused now
        # Before Ray starts: a bad setting, model or input costs nothing, and a finished output needs no Ray.
        planned = plan_label_job(with_demo_defaults(config))
        config = planned.config
        if not planned.finished:
            print(init_ray(args.ray_num_cpus, args.address, args.ray_connect_timeout), file=sys.stderr, flush=True)
        report = run_label_job(config, planned)
    except (ValueError, FileNotFoundError, RayUnavailable) as e:
        print(f"label_corpus: {e}", file=sys.stderr)
        return 2
    except JobFailed as e:
        print(f"label_corpus: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"{report['task']}: {report['rows_out']}/{report['rows_in']} rows in {config.output} "
          f"({report['errored_rows']} errored; {report['rows_labeled_this_run']} labeled this run at "
          f"{report['rows_per_second']} rows/s, {report['tokens_per_second']} tokens/s, {report['wall_seconds']} s)")
    print(json.dumps({k: report[k] for k in ("status", "rows_in", "rows_out", "errored_rows")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
