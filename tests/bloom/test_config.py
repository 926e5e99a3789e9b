"""BloomConfig: the reference's fields and defaults, old spellings, round trips, validation."""

import dataclasses
import json
import subprocess
import sys

import pytest
import transformers

from bloom import BloomConfig

REFERENCE_FIELDS = [
    "vocab_size", "hidden_size", "n_layer", "n_head", "layer_norm_epsilon", "initializer_range", "use_cache",
    "bos_token_id", "eos_token_id", "apply_residual_connection_post_layernorm", "hidden_dropout",
    "attention_dropout", "pretraining_tp", "slow_but_exact", "tie_word_embeddings",
]


def test_defaults_equal_the_reference():
    ours, ref = BloomConfig(), transformers.BloomConfig()
    for name in REFERENCE_FIELDS:
        assert getattr(ours, name) == getattr(ref, name), name
    assert ours.num_labels == ref.num_labels == 2
    assert ours.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    assert ours.num_hidden_layers == ours.n_layer and ours.num_attention_heads == ours.n_head


def test_old_key_spellings_and_megatron_keys(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "bloom", "n_embed": 96, "num_attention_heads": 12, "num_hidden_layers": 3,
        "vocab_size": 1000, "masked_softmax_fusion": True, "offset_alibi": 100, "skip_bias_add": True,
        "id2label": {"0": "O", "1": "B-PER", "2": "I-PER"},
    }))
    cfg = BloomConfig.from_pretrained(tmp_path)
    assert (cfg.hidden_size, cfg.n_head, cfg.n_layer) == (96, 12, 3)
    assert cfg.num_labels == 3 and cfg.id2label[1] == "B-PER" and cfg.label2id["I-PER"] == 2
    assert cfg.extra["masked_softmax_fusion"] is True  # kept, unused, written back
    assert not hasattr(cfg, "offset_alibi")


def test_save_is_readable_by_the_reference(tmp_path):
    cfg = BloomConfig(vocab_size=500, hidden_size=48, n_layer=3, n_head=6, pad_token_id=3, num_labels=3,
                      problem_type="multi_label_classification", slow_but_exact=True, pretraining_tp=2,
                      apply_residual_connection_post_layernorm=True, extra={"masked_softmax_fusion": True})
    cfg.save_pretrained(tmp_path)
    ref = transformers.BloomConfig.from_pretrained(tmp_path)
    for name in REFERENCE_FIELDS + ["pad_token_id", "problem_type", "num_labels"]:
        assert getattr(ref, name) == getattr(cfg, name), name
    assert ref.id2label == cfg.id2label
    again = BloomConfig.from_pretrained(tmp_path)
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_reads_what_the_reference_writes(tmp_path):
    transformers.BloomConfig(hidden_size=32, n_head=4, n_layer=1, vocab_size=300,
                             id2label={0: "neg", 1: "pos"}).save_pretrained(tmp_path)
    cfg = BloomConfig.from_pretrained(tmp_path)
    assert (cfg.hidden_size, cfg.n_head, cfg.n_layer, cfg.vocab_size) == (32, 4, 1, 300)
    assert cfg.id2label == {0: "neg", 1: "pos"} and cfg.num_labels == 2


def test_overrides_win(tmp_path):
    BloomConfig(hidden_size=32, n_head=4).save_pretrained(tmp_path)
    cfg = BloomConfig.from_pretrained(tmp_path, id2label={0: "a", 1: "b", 2: "c"})
    assert cfg.num_labels == 3 and cfg.label2id == {"a": 0, "b": 1, "c": 2}


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden_size": 100, "n_head": 8}, "divisible by n_head"),
    ({"n_layer": 0}, "n_layer"),
    ({"hidden_dropout": 1.5}, "hidden_dropout"),
    ({"problem_type": "ranking"}, "problem_type"),
    ({"pad_token_id": 300, "vocab_size": 256}, "pad_token_id"),
    ({"hidden_size": 60, "n_head": 6, "pretraining_tp": 7, "slow_but_exact": True}, "pretraining_tp"),
])
def test_invalid_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BloomConfig(**kwargs)


def test_bad_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        BloomConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        BloomConfig.from_pretrained(tmp_path)


def test_bloom_package_imports_no_service_or_reference_libraries():
    """`bloom` is plain PyTorch: importing it must not pull in ray, fastapi or transformers."""
    code = "import sys, bloom; print(sorted(m for m in ('ray', 'fastapi', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
