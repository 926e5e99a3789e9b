"""The embedded default: a tiny demo checkpoint per task and a demo Parquet corpus, built if absent.

With no --model and no --input, `jobs/label_corpus.py` labels this corpus with this checkpoint, so the
whole job runs on a fresh machine with no network. The weights are random: labels are meaningless,
but every step (checkpoint loading, Ray Data, actors, Parquet, resume) is the real one.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bloom.tiny import SAMPLE_TEXT, make_tiny_checkpoint

from .config import LabelConfig
from .tasks import TASKS

DEMO_ROOT = Path(__file__).resolve().parent.parent / "demo"
# The model class and the labels (where its head has any) of each task's demo checkpoint, from the task.
DEMO_HEADS = {name: (task.model_class(LabelConfig(task=name)), {"id2label": task.demo_labels} if task.demo_labels else {})
              for name, task in TASKS.items()}
QUESTIONS = ["Who wrote the article?", "Which cities are named?", "What does the model do?", "When was it published?"]


def demo_checkpoint(task: str, root: Path = DEMO_ROOT) -> Path:
    """A tiny random checkpoint with the head (and labels) the task needs; built once."""
    path = root / f"tiny-bloom-{task}"
    if not (path / "config.json").exists():
        cls, config = DEMO_HEADS[task]
        make_tiny_checkpoint(path, cls, **config)
    return path


def demo_corpus(root: Path = DEMO_ROOT, rows: int = 200) -> Path:
    """A Parquet corpus with columns id, text, question, context (two files, several row groups)."""
    path = root / "corpus"
    if not path.exists():
        path.mkdir(parents=True)
        texts = [SAMPLE_TEXT[i % len(SAMPLE_TEXT)] * (1 + i % 3) for i in range(rows)]
        table = pa.table({
            "id": pa.array([f"doc-{i:05d}" for i in range(rows)]),
            "text": texts,
            "question": [QUESTIONS[i % len(QUESTIONS)] for i in range(rows)],
            "context": texts,
        })
        half = rows // 2
        pq.write_table(table.slice(0, half), path / "part-a.parquet", row_group_size=25)
        pq.write_table(table.slice(half), path / "part-b.parquet", row_group_size=25)
    return path


def demo_nightly(root: Path = DEMO_ROOT, days: int = 3) -> Path:
    """A nightly-job config over a demo corpus of `days` date partitions (the demo corpus's rows split
    by day), annotated with the demo classify and NER checkpoints. Returns the YAML's path."""
    import yaml

    corpus = root / "nightly-corpus"
    table = pq.read_table(demo_corpus(root))
    per = -(-table.num_rows // days)
    for day in range(days):
        part = corpus / f"date=2026-11-{day + 1:02d}"
        if not part.exists():
            part.mkdir(parents=True)
            pq.write_table(table.slice(day * per, per), part / "docs.parquet", row_group_size=25)
    config = {"corpus": str(corpus), "output": str(root / "nightly-out"), "partitions": "date=*",
              "annotators": [{"name": "sentiment", "task": "classify", "model": str(demo_checkpoint("classify", root))},
                             {"name": "entities", "task": "ner", "model": str(demo_checkpoint("ner", root))}]}
    path = root / "nightly.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
