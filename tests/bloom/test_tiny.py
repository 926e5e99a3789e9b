"""`python -m bloom.tiny`: a test checkpoint from the shell, loadable with its head and labels."""

import subprocess
import sys

import pytest

import bloom


def tiny(*args):
    return subprocess.run([sys.executable, "-m", "bloom.tiny", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("cls, labels", [
    ("BloomForCausalLM", []),
    ("BloomForSequenceClassification", ["negative", "positive"]),
    ("BloomForTokenClassification", ["O", "B-PER", "I-PER"]),
    ("BloomForQuestionAnswering", []),
])
def test_checkpoints_load_with_their_head_and_labels(tmp_path, cls, labels):
    done = tiny("--class", cls, *[a for label in labels for a in ("--label", label)], tmp_path / "m")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "m")
    model = getattr(bloom, cls).from_pretrained(tmp_path / "m")
    if labels:
        assert model.config.id2label == dict(enumerate(labels))
    assert bloom.BloomTokenizerFast.from_pretrained(tmp_path / "m")("Hello").input_ids


def test_sizes_seeds_and_a_bad_class(tmp_path):
    assert tiny("--hidden-size", "32", "--layers", "1", "--seed", "3", tmp_path / "a").returncode == 0
    model = bloom.BloomForCausalLM.from_pretrained(tmp_path / "a")
    assert model.config.hidden_size == 32 and model.config.n_layer == 1
    assert tiny("--hidden-size", "32", "--layers", "1", tmp_path / "b").returncode == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "b" / "model.safetensors").read_bytes()
    bad = tiny("--class", "BloomConfig", tmp_path / "c")
    assert bad.returncode == 2 and "'BloomConfig' is not a bloom model class" in bad.stderr
