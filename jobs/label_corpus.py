"""Label a Parquet corpus with BLOOM on Ray: generation, classification, NER or extractive QA.

On a cluster:   ray job submit --working-dir . -- python jobs/label_corpus.py --task ner --model /models/x --input s3://b/in --output s3://b/out
On a laptop:    python jobs/label_corpus.py --task ner          (demo checkpoint and corpus, local Ray)

Joins the Ray cluster named by --address or RAY_ADDRESS (as under `ray job submit`), else starts a local
Ray of its own (never one that `ray start` left on the machine). Bad input and a finished output are
found before Ray starts; a rerun of a finished job starts no Ray.
A killed run, rerun with the same arguments, resumes; every input row is written exactly once.
Settings come from --config FILE (YAML, any LabelConfig field) and the flags below, which win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from pipelines import RAY_FLAGS, add_ray_flags
from pipelines.config import TASKS, LabelConfig

FLAGS = [  # (flag, LabelConfig field, type, help)
    ("--input", "input", "list", "Parquet files, directories or globs (local, s3://, gs://); default: the demo corpus"),
    ("--output", "output", str, "output directory for Parquet parts and _report.json; default: demo/out-<task> "
                                "with the demo checkpoint, demo/out-<task>-<model directory name> with another"),
    ("--model", "model", str, "checkpoint directory or hub id; default: a tiny demo checkpoint for the task"),
    ("--text-column", "text_column", str, "column with the text to label (default: text)"),
    ("--id-column", "id_column", str, "column copied to the output to identify rows (default: id)"),
    ("--keep-column", "keep_columns", "list", "another input column to copy to the output (repeatable)"),
    ("--prompt-template", "prompt_template", str, "generate / zero-shot classify: prompt over columns, e.g. 'Summarize: {text}'"),
    ("--question-column", "question_column", str, "qa: the question column (default: question)"),
    ("--context-column", "context_column", str, "qa: the context column (default: context)"),
    ("--max-new-tokens", "max_new_tokens", int, "generate: tokens to generate per row (default 32)"),
    ("--temperature", "temperature", float, "generate: sampling temperature (with --sample)"),
    ("--top-p", "top_p", float, "generate: nucleus sampling mass (with --sample)"),
    ("--top-k", "top_k", int, "generate: sample among the k likeliest tokens (0: off; with --sample)"),
    ("--repetition-penalty", "repetition_penalty", float, "generate: > 1 makes tokens already in the text less likely (default 1: off)"),
    ("--frequency-penalty", "frequency_penalty", float, "generate: in [-2, 2], lowers a token's logit by this much per time it was generated (default 0: off)"),
    ("--presence-penalty", "presence_penalty", float, "generate: in [-2, 2], lowers a token's logit by this much once it was generated (default 0: off)"),
    ("--min-tokens", "min_tokens", int, "generate: no eos or stop string ends a row before this many new tokens (default 0)"),
    ("--logit-bias", "logit_bias", "json", "generate: a JSON object of token id to a bias in [-100, 100] added to its logit, e.g. '{\"50256\": -100}'"),
    ("--seed", "seed", int, "generate: sampling seed (each row's seed derives from it and the prompt)"),
    ("--stop", "stop", "list", "generate: a stop string (repeatable); the text ends before it"),
    ("--candidate-label", "candidate_labels", "list", "classify: a candidate label for zero-shot with a causal LM (repeatable)"),
    ("--label-prefix", "label_prefix", str, "zero-shot classify: text put between the prompt and each candidate label (default: a space)"),
    ("--threshold", "threshold", float, "classify: multi-label probability threshold (default 0.5)"),
    ("--aggregation-strategy", "aggregation_strategy", str, "ner: none, simple, first, average or max (default simple)"),
    ("--ignore-label", "ignore_labels", "list", "ner: an entity label left out of the output (repeatable; default: O)"),
    ("--stride", "stride", int, "ner/qa: tokens shared by consecutive windows of a long text (default 32)"),
    ("--max-answer-len", "max_answer_len", int, "qa: longest answer in tokens (default 30)"),
    ("--max-input-tokens", "max_input_tokens", int, "tokens per row (per window for ner/qa) (default 1024)"),
    ("--max-text-chars", "max_text_chars", int, "rows with longer texts are errors, before tokenizing (default 200000)"),
    ("--too-long", "too_long", str, "rows over --max-input-tokens: 'error' (default) or 'truncate'"),
    ("--max-errored-rows", "max_errored_rows", int, "fail the job when more rows than this errored"),
    ("--max-errored-fraction", "max_errored_fraction", float, "fail the job past this fraction of errored rows (default 0.1)"),
    ("--dtype", "dtype", str, "fast (default: bfloat16 where the hardware computes it fast, else float32), float32, bfloat16, float16, or auto (the checkpoint's)"),
    ("--quantize", "quantize", str, "int8: weight-only int8 weights, half the memory of bfloat16 (needs --dtype bfloat16; "
                                    "faster for batch-1 decoding on CPU, slower for prefill)"),
    ("--device-map", "device_map", str, "spread each replica over its GPUs: auto, balanced, sequential"),
    ("--num-actors", "num_actors", int, "most replicas in the pool (default: what the cluster fits)"),
    ("--min-actors", "min_actors", int, "fewest replicas in the pool (default 1)"),
    ("--gpus-per-actor", "num_gpus_per_actor", float, "GPUs per replica (default: 1 if the cluster has GPUs, else 0)"),
    ("--cpus-per-actor", "num_cpus_per_actor", float, "CPUs per replica (default: from the cluster, one CPU left free)"),
    ("--batch-token-budget", "batch_token_budget", int, "padded tokens per forward pass (default 8192)"),
    ("--cache-tokens", "cache_tokens", int, "generate: the engine's KV cache in tokens, in slots of max input + max new "
                                            "tokens (default: 16 slots, fewer if over half the free memory)"),
    ("--prefill-chunk", "prefill_chunk", int, "generate: prompt tokens the engine prefills per step (default 256)"),
    ("--rows-per-batch", "rows_per_batch", int, "rows handed to a replica at a time (default 256)"),
]


def json_object(text: str) -> dict:
    """A flag's JSON object (e.g. --logit-bias '{"42": 5}'); argparse reports anything else."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def parse_args(argv=None) -> tuple[LabelConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default=None, help="what to compute (default: generate)")
    p.add_argument("--config", type=Path, help="YAML file with any LabelConfig settings; flags win over it")
    for flag, dest, kind, text in FLAGS:
        if kind == "list":
            p.add_argument(flag, dest=dest, action="append", default=None, help=text)
        elif kind == "json":
            p.add_argument(flag, dest=dest, type=json_object, default=None, help=text)
        else:
            p.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    p.add_argument("--sample", dest="do_sample", action="store_const", const=True, help="generate: sample instead of greedy")
    p.add_argument("--overwrite", action="store_const", const=True, help="replace an output written with other settings")
    add_ray_flags(p)
    args = p.parse_args(argv)
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
    from pipelines.label import JobFailed, plan_label_job, run_label_job

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
