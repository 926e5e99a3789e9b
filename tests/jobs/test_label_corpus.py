"""jobs/label_corpus.py's defaults, without running a job."""

import importlib.util
from pathlib import Path

from pipelines.config import LabelConfig
from pipelines.demo import DEMO_ROOT

ROOT = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("label_corpus", ROOT / "jobs" / "label_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_default_output_is_named_after_a_model_that_is_not_the_demos():
    script = load_script()
    own = script.with_demo_defaults(LabelConfig(task="ner", model="checkpoints/tiny-ner/", input=["x.parquet"]))
    assert own.output == str(DEMO_ROOT / "out-ner-tiny-ner")  # not the demo's demo/out-ner: no collision
    hub = script.with_demo_defaults(LabelConfig(task="classify", model="bigscience/bloom-560m", input=["x.parquet"]))
    assert hub.output == str(DEMO_ROOT / "out-classify-bloom-560m")
    given = script.with_demo_defaults(LabelConfig(task="ner", model="m", input=["x.parquet"], output="out/ner"))
    assert given.output == "out/ner"
