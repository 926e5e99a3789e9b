"""BLOOM in plain PyTorch: the reference's API (transformers' BLOOM) with `from bloom import ...`."""

from .config import BloomConfig
from .engine import Engine, GenerationParams, Sequence
from .generation import GenerateOutput, KVCache, StreamStep
from .loading import fast_bf16, resolve_dtype
from .model import (
    BloomForCausalLM,
    BloomForQuestionAnswering,
    BloomForSequenceClassification,
    BloomForTokenClassification,
    BloomModel,
    BloomPreTrainedModel,
)
from .tokenizer import BloomTokenizerFast, train_bloom_tokenizer

__all__ = [
    "BloomConfig",
    "BloomTokenizerFast",
    "train_bloom_tokenizer",
    "BloomPreTrainedModel",
    "BloomModel",
    "BloomForCausalLM",
    "BloomForSequenceClassification",
    "BloomForTokenClassification",
    "BloomForQuestionAnswering",
    "KVCache",
    "Engine",
    "GenerationParams",
    "Sequence",
    "GenerateOutput",
    "StreamStep",
    "fast_bf16",
    "resolve_dtype",
]
