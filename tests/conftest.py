"""Shared fixtures: tiny BLOOM checkpoints written by the reference (transformers) in the real HF layout."""

from __future__ import annotations

import json

import pytest
import torch

from bloom.tiny import randomise_, sample_tokenizer

TINY = dict(vocab_size=256, hidden_size=64, n_layer=2, n_head=8, pad_token_id=3, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(cls_name="BloomForCausalLM", std=None, seed=0, **config) -> directory.

    The reference builds the model (its own init, or `randomise_` with std) and saves it with
    `save_pretrained`, exactly as a real fine-tuned checkpoint is written. Cached per arguments."""
    import transformers

    cache = {}

    def make(cls_name: str = "BloomForCausalLM", std: float | None = None, seed: int = 0, **config):
        key = json.dumps([cls_name, std, seed, config], sort_keys=True)
        if key not in cache:
            torch.manual_seed(seed)
            cfg = transformers.BloomConfig(**{**TINY, **config})
            model = getattr(transformers, cls_name)(cfg).eval()
            if std is not None:
                randomise_(model, std, seed)
            path = tmp_path_factory.mktemp(cls_name.lower())
            model.save_pretrained(path)
            cache[key] = path
        return cache[key]

    return make


def load_reference(path, cls_name: str = "BloomForCausalLM", **kwargs):
    import transformers

    return getattr(transformers, cls_name).from_pretrained(path, **kwargs).eval()


def left_padded(batch: list[list[int]], pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids → left-padded (input_ids, attention_mask), both (B, T)."""
    T = max(map(len, batch))
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in batch])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in batch])
    return ids, mask


@pytest.fixture(scope="session")
def tokenizer():
    """A BLOOM-style tokenizer with 512 ids, trained on the package's multilingual sample text."""
    return sample_tokenizer(512)
