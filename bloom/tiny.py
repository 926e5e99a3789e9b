"""Tiny random BLOOM checkpoints with a trained BLOOM-style tokenizer, for demos, tests and benchmarks.

There is no model hub on an offline machine, so anything that needs "a BLOOM checkpoint" can build
one here in the real Hugging Face layout (config.json, model.safetensors, tokenizer.json).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import BloomConfig
from .tokenizer import BloomTokenizerFast, train_bloom_tokenizer

# A few lines in several scripts, so the trained vocabulary has merges for each.
SAMPLE_TEXT = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Large language models are trained on many languages at once.",
    "Le renard brun saute par-dessus le chien paresseux, puis il repart.",
    "El modelo multilingüe etiqueta cada frase del corpus durante la noche.",
    "Der Bericht wurde am Montag um 09:30 Uhr veröffentlicht.",
    "Модель обрабатывает тексты на разных языках.",
    "这个模型可以处理多种语言的文本。",
    "النموذج يعالج النصوص بلغات متعددة.",
    "यह मॉडल कई भाषाओं में पाठ को संसाधित करता है।",
    "Mô hình xử lý văn bản bằng nhiều ngôn ngữ.",
    "Kielimalli lukee ja kirjoittaa tekstiä 🙂 🚀",
    "def label(row):\n    return model(row['text'])  # code too",
    "Paris, Lagos, Mumbai and Lima were mentioned in the article by Dr. Ada Obi.",
]


def randomise_(model: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Spread every weight, LayerNorms included (weights 1±0.3), in place.

    The default init (std 0.02) makes a random model repeat one token forever; wider weights give
    varied generations (std 0.3 does at hidden 64-128), which generation tests and demos need."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "ln_f" in name:
                if name.endswith("weight"):
                    p.copy_(1 + 0.3 * (2 * torch.rand(p.shape, generator=g) - 1))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


def sample_tokenizer(vocab_size: int = 512, texts: list[str] | None = None) -> BloomTokenizerFast:
    """A BLOOM-style tokenizer trained on SAMPLE_TEXT (or `texts`); ids 0..3 are <unk> <s> </s> <pad>."""
    return train_bloom_tokenizer((texts or SAMPLE_TEXT) * 4, vocab_size=vocab_size)


def make_tiny_checkpoint(
    directory: str | os.PathLike,
    model_class=None,
    *,
    std: float | None = 0.3,
    seed: int = 0,
    vocab_size: int = 512,
    dtype: torch.dtype = torch.float32,
    **config,
) -> Path:
    """Write a random BLOOM checkpoint with its tokenizer to `directory` and return the path.

    model_class: any bloom model class (default BloomForCausalLM); config: BloomConfig fields
    (e.g. hidden_size, n_layer, n_head, id2label). std=None keeps the reference's init."""
    from .model import BloomForCausalLM

    model_class = model_class or BloomForCausalLM
    tokenizer = sample_tokenizer(vocab_size)
    defaults = dict(hidden_size=64, n_layer=2, n_head=4, pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    unk_token_id=tokenizer.unk_token_id)
    cfg = BloomConfig(vocab_size=vocab_size, **{**defaults, **config})
    torch.manual_seed(seed)
    model = model_class(cfg).eval()
    if std is not None:
        randomise_(model, std, seed)
    directory = Path(directory)
    model.to(dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
