"""Tiny random BLOOM checkpoints with a trained BLOOM-style tokenizer, for demos, tests and benchmarks.

There is no model hub on an offline machine, so anything that needs "a BLOOM checkpoint" can build
one here in the real Hugging Face layout (config.json, model.safetensors, tokenizer.json). From a shell:

    python -m bloom.tiny checkpoints/tiny-generate                 # a causal LM
    python -m bloom.tiny --class BloomForSequenceClassification --label spam --label ham checkpoints/spam
"""

from __future__ import annotations

import argparse
import os
import sys
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

    model_class: any bloom model class or its name (default BloomForCausalLM); config: BloomConfig
    fields (e.g. hidden_size, n_layer, n_head, id2label). std=None keeps the reference's init."""
    from . import model as models

    if not isinstance(model_class, type):
        name = model_class or "BloomForCausalLM"
        model_class = getattr(models, name, None)
        if not (isinstance(model_class, type) and issubclass(model_class, models.BloomPreTrainedModel)):
            raise ValueError(f"{name!r} is not a bloom model class")
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bloom.tiny", description="Write a tiny random BLOOM checkpoint "
                                "(config.json, model.safetensors, tokenizer.json) for trying the jobs.")
    p.add_argument("directory", help="where to write it")
    p.add_argument("--class", dest="model_class", default="BloomForCausalLM",
                   help="the bloom model class, i.e. the head (default BloomForCausalLM)")
    p.add_argument("--label", action="append", help="a label of the head, in id order (repeatable)")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="different seeds give different weights")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = p.parse_args(argv)
    config = dict(hidden_size=args.hidden_size, n_layer=args.layers, n_head=args.heads, seed=args.seed,
                  vocab_size=args.vocab_size, dtype=getattr(torch, args.dtype))
    if args.label:
        config["id2label"] = dict(enumerate(args.label))
    try:
        path = make_tiny_checkpoint(args.directory, args.model_class, **config)
    except ValueError as e:
        print(f"bloom.tiny: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
