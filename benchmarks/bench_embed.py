"""Embeddings against the NER forward: rows/s of the embed task and of the ner task through the replica
(the job's path: tokenize, batch within the token budget, forward, the task's output) on the same rows
and the same body (hidden, layers, seed), one checkpoint per task.

Both run the bare transformer over each row once; NER adds its classifier and the merge of token labels
into entities, embed adds the pooling, so the ratio should be close to 1. Runs are interleaved (ner,
embed, ner, ...) and medians reported.

    python benchmarks/bench_embed.py                        # ~1 min on 2 idle cores
    python benchmarks/bench_embed.py --rows 64 --repeats 1 --hidden 128 --layers 2
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from common import bench_main, describe, machine

ROOT = Path(__file__).resolve().parent


def add_arguments(p) -> None:
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="fast", help="the replica's dtype setting")


def corpus(rows: int) -> list[dict]:
    """The demo corpus's kind of rows: sample sentences repeated 1-4 times (about 15-120 tokens)."""
    from bloom.tiny import SAMPLE_TEXT

    return [{"id": str(i), "text": " ".join(SAMPLE_TEXT[(i + k) % len(SAMPLE_TEXT)] for k in range(1 + i % 4))}
            for i in range(rows)]


def run(args) -> dict:
    import torch

    import bloom
    from bloom.tiny import make_tiny_checkpoint
    from pipelines.config import LabelConfig
    from pipelines.demo import DEMO_HEADS
    from pipelines.replica import BloomReplica

    rows = corpus(args.rows)
    replicas = {}
    with tempfile.TemporaryDirectory() as tmp:
        size = dict(hidden_size=args.hidden, n_layer=args.layers, n_head=args.hidden // 64)
        ner_cls, ner_config = DEMO_HEADS["ner"]
        checkpoints = {"ner": make_tiny_checkpoint(Path(tmp) / "ner", ner_cls, **ner_config, **size),
                       "embed": make_tiny_checkpoint(Path(tmp) / "lm", bloom.BloomForCausalLM, **size)}
        for task, path in checkpoints.items():
            replicas[task] = BloomReplica(LabelConfig(task=task, model=str(path), dtype=args.dtype),
                                          num_threads=torch.get_num_threads())
    info = machine()
    print(f"machine: {describe(info)}, {info['threads']} threads")
    print(f"model: hidden {args.hidden}, {args.layers} layers, dtype {replicas['ner'].model.dtype}; "
          f"{args.rows} rows, {sum(len(replicas['ner'].tokenizer.encode(r['text'])) for r in rows)} tokens")
    replicas["ner"].label_rows(rows[:8])  # warm up both
    replicas["embed"].label_rows(rows[:8])
    seconds = {"ner": [], "embed": []}
    for _ in range(args.repeats):
        for task, replica in replicas.items():
            start = time.perf_counter()
            out = replica.label_rows(rows)
            seconds[task].append(time.perf_counter() - start)
            assert not any(r.get("error") for r in out), task
    rate = {task: args.rows / statistics.median(s) for task, s in seconds.items()}
    return {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "seconds": seconds,
            "rows_per_s": rate, "embed_over_ner": rate["embed"] / rate["ner"]}


def show(results: dict) -> None:
    rate = results["rows_per_s"]
    print(f"ner: {rate['ner']:7.1f} rows/s   embed: {rate['embed']:7.1f} rows/s   embed/ner x{results['embed_over_ner']:.2f}"
          f"   (medians of {len(results['seconds']['ner'])}, interleaved)")


if __name__ == "__main__":
    raise SystemExit(bench_main(None, __doc__, ROOT / "results" / "bench_embed.json", add_arguments, run, show))
