"""The engine tests' models: tiny random BLOOMs with wide weights, so greedy generations vary."""

import pytest

import bloom

STD = 0.3  # wide random weights: varied, non-repeating generations


@pytest.fixture(scope="module")
def lm(make_checkpoint):
    return bloom.BloomForCausalLM.from_pretrained(make_checkpoint(std=STD, seed=1))


@pytest.fixture(scope="module")
def text_lm(make_checkpoint, tokenizer):
    """A model whose vocabulary is the tokenizer's, for stop strings."""
    return bloom.BloomForCausalLM.from_pretrained(make_checkpoint(std=STD, seed=2, vocab_size=len(tokenizer)))
