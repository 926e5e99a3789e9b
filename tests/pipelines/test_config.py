"""The model fingerprint: it covers every weight byte, and its weight hashes are cached per user."""

import hashlib
import json
import os
import shutil

import pytest

import bloom
from bloom.tiny import make_tiny_checkpoint
from pipelines.config import LabelConfig, digest_cache_path, file_sha256, model_fingerprint


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_checkpoints_of_the_same_shape_have_different_fingerprints(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", bloom.BloomForSequenceClassification, id2label={0: "n", 1: "p"}, seed=0)
    b = make_tiny_checkpoint(tmp_path / "b", bloom.BloomForSequenceClassification, id2label={0: "n", 1: "p"}, seed=1)
    assert (a / "model.safetensors").stat().st_size == (b / "model.safetensors").stat().st_size
    assert model_fingerprint(a) != model_fingerprint(b)


def test_weights_copied_over_change_it_even_with_the_same_size_and_mtime(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", seed=0)
    b = make_tiny_checkpoint(tmp_path / "b", seed=1)
    before = model_fingerprint(a)
    assert model_fingerprint(a) == before  # stable, now from the cache
    weights = a / "model.safetensors"
    stat = weights.stat()
    shutil.copyfile(b / "model.safetensors", weights)  # same inode, same size
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its old mtime put back
    assert weights.stat().st_size == stat.st_size and weights.stat().st_ino == stat.st_ino
    assert model_fingerprint(a) != before
    assert model_fingerprint(a) == model_fingerprint(b)  # same config, tokenizer and now weights


def test_hashes_are_cached_and_hub_blobs_are_named_by_theirs(tmp_path, cache_home):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"x" * 1000)
    first = file_sha256(path)
    assert first == hashlib.sha256(b"x" * 1000).hexdigest()
    cache = json.loads(digest_cache_path().read_text())
    assert digest_cache_path().parent == cache_home / "bloomline" and cache[str(path)]["sha256"] == first
    # The cached value is what is returned while the file's identity is unchanged (no second read).
    cache[str(path)]["sha256"] = "0" * 64
    digest_cache_path().write_text(json.dumps(cache))
    assert file_sha256(path) == "0" * 64
    path.write_bytes(b"y" * 1000)  # rewritten: read again
    assert file_sha256(path) not in (first, "0" * 64)
    # A hub cache: the snapshot's file links to a blob named by its content's sha256.
    blob = tmp_path / "models--org--m" / "blobs" / ("ab" * 32)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"weights")
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "model.safetensors").symlink_to(blob)
    assert file_sha256(tmp_path / "snap" / "model.safetensors") == "ab" * 32


def test_an_unwritable_cache_only_costs_a_rehash(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")


def test_a_generation_cache_smaller_than_one_sequence_is_refused():
    with pytest.raises(ValueError, match="cache_tokens 500 cannot hold one sequence: .* = 1056 tokens"):
        LabelConfig(task="generate", cache_tokens=500, max_input_tokens=1024, max_new_tokens=32)
    LabelConfig(task="generate", cache_tokens=1056, max_input_tokens=1024, max_new_tokens=32)
    LabelConfig(task="classify", cache_tokens=500)  # only generation has a cache
