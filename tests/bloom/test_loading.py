"""Loading and saving: layouts the reference writes and reads, device maps, and clear errors on bad input."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import bloom
from tests.conftest import left_padded, load_reference


def logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, mask = left_padded([torch.randint(4, 256, (n,), generator=g).tolist() for n in (6, 3)])
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits[mask.bool()]


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_save_loads_in_both_implementations(make_checkpoint, tmp_path):
    src = make_checkpoint(std=0.15)
    model = bloom.BloomForCausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert "lm_head.weight" not in index["weight_map"]  # tied: not written, as the reference does
    assert all(k.startswith("transformer.") for k in index["weight_map"])
    reloaded = bloom.BloomForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded), logits(model), atol=0, rtol=0)
    torch.testing.assert_close(logits(load_reference(tmp_path)), logits(model), atol=1e-5, rtol=0)


def test_resaving_unsharded_removes_stale_shards(make_checkpoint, tmp_path):
    model = bloom.BloomForCausalLM.from_pretrained(make_checkpoint())
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    bloom.BloomForCausalLM.from_pretrained(tmp_path)


def test_prefixless_checkpoint_like_official_bloom(make_checkpoint, tmp_path):
    """Official bigscience checkpoints store the body without `transformer.` and no lm_head."""
    src = make_checkpoint(std=0.15)
    bloom.BloomModel.from_pretrained(src).save_pretrained(tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "word_embeddings.weight" in keys and not any(k.startswith("transformer.") for k in keys)
    ours = bloom.BloomForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(ours), logits(load_reference(tmp_path)), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(ours), logits(bloom.BloomForCausalLM.from_pretrained(src)), atol=0, rtol=0)


def test_task_head_missing_is_initialised_with_a_warning(make_checkpoint, caplog):
    src = make_checkpoint(std=0.15)  # a causal LM: no `score` weights
    with caplog.at_level(logging.WARNING, logger="bloom"):
        model = bloom.BloomForSequenceClassification.from_pretrained(src, num_labels=4)
    assert "score.weight" in caplog.text
    assert model.score.weight.shape == (4, 64) and model.score.weight.abs().sum() > 0


def test_base_model_ignores_head_weights(make_checkpoint):
    src = make_checkpoint("BloomForTokenClassification", num_labels=3)
    body = bloom.BloomModel.from_pretrained(src)
    ref = load_reference(src, "BloomModel")
    ids = torch.randint(4, 256, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(body(ids).last_hidden_state, ref(ids).last_hidden_state, atol=1e-5, rtol=0)


def test_dtype_auto_uses_the_checkpoint_dtype(make_checkpoint, tmp_path):
    bloom.BloomForCausalLM.from_pretrained(make_checkpoint(), dtype=torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert bloom.BloomForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    assert bloom.BloomForCausalLM.from_pretrained(tmp_path).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        bloom.BloomForCausalLM.from_pretrained(tmp_path, dtype="float8")


def test_weights_are_not_held_twice(make_checkpoint):
    """Loading fills a meta-device model: no parameter is left on meta, none shares storage with another."""
    model = bloom.BloomForCausalLM.from_pretrained(make_checkpoint())
    params = list(model.parameters())
    assert not any(p.is_meta for p in params)
    assert len({p.data_ptr() for p in params}) == len(params)


# ----------------------------------------------------------------------------- device maps


def test_device_map_split_between_cpu_and_disk(make_checkpoint, tmp_path):
    src = make_checkpoint(std=0.15, n_layer=4)
    whole = bloom.BloomForCausalLM.from_pretrained(src)
    device_map = {
        "transformer.word_embeddings": "cpu", "lm_head": "cpu", "transformer.word_embeddings_layernorm": "cpu",
        "transformer.h.0": "cpu", "transformer.h.1": "disk", "transformer.h.2": "cpu", "transformer.h.3": "disk",
        "transformer.ln_f": "cpu",
    }
    split = bloom.BloomForCausalLM.from_pretrained(src, device_map=device_map, offload_folder=tmp_path / "offload")
    assert split.transformer.h[1].self_attention.dense.weight.is_meta  # really offloaded
    assert any((tmp_path / "offload").iterdir())
    torch.testing.assert_close(logits(split), logits(whole), atol=1e-6, rtol=0)
    out = split.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4)
    assert torch.equal(out, whole.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4))


def test_device_map_auto_with_max_memory_offloads(make_checkpoint, tmp_path):
    src = make_checkpoint(std=0.15, n_layer=4)
    whole = bloom.BloomForCausalLM.from_pretrained(src)
    # A block is ~200 kB: 700 kB of CPU memory holds the embeddings and some blocks; the rest goes to disk, blocks whole.
    model = bloom.BloomForCausalLM.from_pretrained(
        src, device_map="auto", max_memory={"cpu": 700_000}, offload_folder=tmp_path / "off")
    placed = model.hf_device_map
    assert "disk" in placed.values() and "cpu" in placed.values()
    assert all(k.count(".") <= 2 for k in placed)  # never finer than a block (transformer.h.N)
    torch.testing.assert_close(logits(model), logits(whole), atol=1e-6, rtol=0)


def test_disk_without_offload_folder_is_refused(make_checkpoint):
    with pytest.raises(ValueError, match="offload_folder"):
        bloom.BloomForCausalLM.from_pretrained(make_checkpoint(), device_map={"": "disk"})


def test_device_map_naming_an_unknown_module(make_checkpoint):
    with pytest.raises(ValueError, match="transformer.h.9"):
        bloom.BloomForCausalLM.from_pretrained(make_checkpoint(), device_map={"transformer.h.9": "cpu"})


# ----------------------------------------------------------------------------- bad input


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bloom.BloomForCausalLM.from_pretrained(tmp_path / "nope")


def test_missing_config(make_checkpoint, tmp_path):
    d = copy_checkpoint(make_checkpoint(), tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        bloom.BloomForCausalLM.from_pretrained(d)


def test_missing_weights(make_checkpoint, tmp_path):
    d = copy_checkpoint(make_checkpoint(), tmp_path / "c")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        bloom.BloomForCausalLM.from_pretrained(d)


def test_missing_shard(make_checkpoint, tmp_path):
    bloom.BloomForCausalLM.from_pretrained(make_checkpoint()).save_pretrained(tmp_path, max_shard_size="40KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        bloom.BloomForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("keep", [4, 100, -1000])
def test_truncated_safetensors(make_checkpoint, tmp_path, keep):
    d = copy_checkpoint(make_checkpoint(), tmp_path / "c")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:keep])
    with pytest.raises(ValueError, match="model.safetensors.*(truncated|not a valid)"):
        bloom.BloomForCausalLM.from_pretrained(d)


def test_wrong_shape_names_the_tensor(make_checkpoint, tmp_path):
    d = copy_checkpoint(make_checkpoint(), tmp_path / "c")
    tensors = load_file(d / "model.safetensors")
    tensors["transformer.h.1.mlp.dense_h_to_4h.weight"] = torch.zeros(200, 64)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"transformer.h.1.mlp.dense_h_to_4h.weight: checkpoint \[200, 64\], model \[256, 64\]"):
        bloom.BloomForCausalLM.from_pretrained(d)


def test_missing_and_unexpected_tensors_are_named(make_checkpoint, tmp_path):
    d = copy_checkpoint(make_checkpoint(), tmp_path / "c")
    tensors = load_file(d / "model.safetensors")
    del tensors["transformer.h.0.input_layernorm.bias"]
    tensors["transformer.h.0.surprise"] = torch.zeros(3)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        bloom.BloomForCausalLM.from_pretrained(d)
    assert "missing tensor transformer.h.0.input_layernorm.bias" in str(err.value)
    assert "unexpected tensor transformer.h.0.surprise" in str(err.value)


def test_pickled_only_checkpoint_is_refused(make_checkpoint, tmp_path):
    d = copy_checkpoint(make_checkpoint(), tmp_path / "c")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="pickled.*pytorch_model.bin.*safetensors"):
        bloom.BloomForCausalLM.from_pretrained(d)


def test_config_for_another_architecture(make_checkpoint, tmp_path):
    d = copy_checkpoint(make_checkpoint(), tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        bloom.BloomForCausalLM.from_pretrained(d)


def test_fast_dtype_is_bf16_only_where_the_cpu_has_bf16_instructions(make_checkpoint, monkeypatch):
    from bloom import loading

    for flags, want in (({"avx2", "avx512f", "avx512_bf16"}, torch.bfloat16), ({"avx2", "amx_bf16"}, torch.bfloat16),
                        ({"avx2", "avx512f"}, torch.float32), (set(), torch.float32)):
        monkeypatch.setattr(loading, "_cpu_flags", lambda flags=flags: frozenset(flags))
        assert bloom.resolve_dtype("fast", device="cpu") == want
        assert bloom.BloomModel.from_pretrained(make_checkpoint(), dtype="fast").dtype == want
    with pytest.raises(ValueError, match="'fast'"):
        bloom.resolve_dtype("fastest")
