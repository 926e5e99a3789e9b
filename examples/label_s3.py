"""Label JSON lines on S3 inside your own Ray Data pipeline: read, label, keep the labeled rows, write Parquet.

    python examples/label_s3.py --task generate --model /models/bloomz-560m --max-new-tokens 32 \\
        --input s3://bucket/notes/ --output s3://bucket/labeled/

Every labeling setting of the job is a flag here too (--help lists them); --input is a JSON-lines file
or folder, --output the Parquet folder to write. Locations take the job's form, client options in the
query (s3://bucket/notes?endpoint_override=localhost:9000&scheme=http for an S3-compatible server).
Unlike the job, a run killed midway starts over: see docs/library.md.
"""

from __future__ import annotations

import argparse
import sys

from pipelines import RAY_FLAGS, add_ray_flags, init_ray, storage
from pipelines.config import TASKS, LabelConfig
from pipelines.processor import label
from pipelines.tasks.settings import add_flags


def label_json_lines(input_uri: str, output_uri: str, config: LabelConfig) -> None:
    """Read the JSON lines at input_uri, label them with config, drop the rows that errored (a row's
    `error` says why it was not labeled) and write the rest as Parquet under output_uri."""
    import ray
    from ray.data.expressions import col

    in_fs, in_path = storage.filesystem(input_uri)
    out_fs, out_path = storage.filesystem(output_uri)
    ds = ray.data.read_json(in_path, filesystem=in_fs)  # newline-delimited JSON, read by Arrow
    ds = label(ds, config)
    # An expression, not a Python lambda: Arrow filters the batch and keeps its column types.
    ds = ds.filter(expr=col("error").is_null())
    ds.write_parquet(out_path, filesystem=out_fs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, required=True)
    add_flags(p)  # every setting of the labeling job, --input and --output among them
    add_ray_flags(p)
    args = p.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if v is not None and k not in RAY_FLAGS}
    config = LabelConfig.from_dict(settings)
    if len(config.input) != 1 or not config.output:
        p.error("give one --input (JSON lines) and an --output")
    print(init_ray(args.ray_num_cpus, args.address, args.ray_connect_timeout), file=sys.stderr)
    label_json_lines(config.input[0], config.output, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
