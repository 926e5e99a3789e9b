"""Generate from a BLOOM checkpoint, streaming tokens as they come.

With no --model, uses the labeling job's demo checkpoint (demo/tiny-bloom-generate), built if absent,
so it runs on a fresh machine with no network. Random weights produce gibberish; the point is the
whole path: checkpoint → tokenizer → left-padded batch → KV-cached generation with finish reasons.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from bloom import BloomForCausalLM, BloomTokenizerFast
from pipelines.demo import demo_checkpoint

DEFAULT_PROMPTS = ["The quick brown fox", "Le modèle multilingue", "这个模型"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint directory (config.json, safetensors, tokenizer.json); default: the demo checkpoint")
    p.add_argument("--prompt", action="append", dest="prompts", help="a prompt (repeatable); default: three samples")
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate per prompt (default 24)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    p.add_argument("--sample", action="store_true", help="sample (temperature 0.8, top-p 0.95) instead of greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    model_dir = args.model or demo_checkpoint("generate")
    model = BloomForCausalLM.from_pretrained(model_dir, dtype=args.dtype)
    tokenizer = BloomTokenizerFast.from_pretrained(model_dir, padding_side="left")
    prompts = args.prompts or DEFAULT_PROMPTS
    batch = tokenizer(prompts, padding=True, return_tensors="pt")

    texts, start, n_tokens = [[] for _ in prompts], time.perf_counter(), 0
    for step in model.stream(batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=args.max_new_tokens,
                             do_sample=args.sample, temperature=0.8 if args.sample else 1.0,
                             top_p=0.95 if args.sample else 1.0, seed=args.seed,
                             stop_strings=args.stop, tokenizer=tokenizer):
        for row in step.active.nonzero().flatten().tolist():
            texts[row].append(int(step.tokens[row]))
            n_tokens += 1
        reasons = step.finish_reason
    elapsed = time.perf_counter() - start
    for prompt, ids, reason in zip(prompts, texts, reasons):
        print(f"{prompt!r} → {tokenizer.decode(ids, skip_special_tokens=True)!r}  [{reason}, {len(ids)} tokens]")
    print(f"{n_tokens} tokens in {elapsed:.2f} s ({n_tokens / elapsed:.1f} tokens/s, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
