"""Weight-only int8 against bfloat16, in one run: weight bytes, decode and prefill speed, as the replica runs them.

Three variants of the same random checkpoint (bench_model's, bloom-560m shape by default), each loaded in
bfloat16 and prepared as the replica does on CPU:
  - bf16: every Linear oneDNN-packed (the tied LM head gets a packed copy);
  - int8: transformer Linears and the LM head quantized (`quantize_int8()`), the rest packed;
  - int8-layers: the transformer Linears quantized, the LM head left bf16 and packed.
Decode tokens/s is measured without the prompt: (n - 1) / (time of n new tokens - time of 1), greedy,
32-token prompts, at batch 1 and 8. Calls are interleaved and the medians taken (see bench_model.timed).

    python benchmarks/bench_quant.py                 # ~3 min on 2 cores
    python benchmarks/bench_quant.py --shape tiny
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench_model import checkpoint, memory_bandwidth, timed
from common import bench_main, describe, machine

import torch

import bloom
from bloom.quant import weight_bytes

ROOT = Path(__file__).resolve().parent
VARIANTS = {"bf16": None, "int8": dict(lm_head=True), "int8-layers": dict(lm_head=False)}


def load(path: Path, quantize: dict | None) -> bloom.BloomForCausalLM:
    model = bloom.BloomForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    if quantize is not None:
        model.quantize_int8(**quantize)
    model.pack_for_cpu()
    return model


def run(args) -> dict:
    path = checkpoint(args.shape)
    cfg = bloom.BloomConfig.from_pretrained(path)
    models = {name: load(path, q) for name, q in VARIANTS.items()}
    g = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(4, cfg.vocab_size, (b, args.prompt_len), generator=g) for b in (1, 8)}
    outputs = {}

    def generate(name, batch, n):
        def go():
            outputs[name, batch, n] = models[name].generate(prompts[batch], max_new_tokens=n, eos_token_id=[])
        return go

    fns = {(name, b, n): generate(name, b, n) for b in (1, 8) for n in (1, args.new_tokens) for name in models}
    with torch.inference_mode():
        times = timed(fns, args.repeats)
    rows = []
    for name, model in models.items():
        row = {"variant": name, "weight_bytes": weight_bytes(model), "prefill_b1_ms": times[name, 1, 1] * 1e3}
        for b in (1, 8):
            row[f"decode_b{b}_tok_s"] = b * (args.new_tokens - 1) / (times[name, b, args.new_tokens] - times[name, b, 1])
            row[f"same_tokens_as_bf16_b{b}"] = bool(torch.equal(outputs[name, b, args.new_tokens],
                                                                outputs["bf16", b, args.new_tokens]))
        rows.append(row)
    # The host's memory speed against its cores' decides how much int8 gains (its kernel is compute-bound).
    # the faster of bench_model's readers (a sum, the packed matrix-vector product decoding runs)
    return {"machine": {**machine(), "memory_read_gb_s": max(memory_bandwidth(torch.device("cpu")).values()) / 1e9},
            "shape": args.shape, "repeats": args.repeats, "runs": rows}


def print_results(results: dict) -> None:
    m = results["machine"]
    print(f"{describe(m)}; {m['memory_read_gb_s']:.1f} GB/s memory reads; torch {m.get('torch')}, {m.get('threads')} "
          f"threads; {results['shape']} shape, medians of {results['repeats']}")
    base = results["runs"][0]
    for r in results["runs"]:
        print(f"  {r['variant']:<12} weights {r['weight_bytes'] / 1e9:5.2f} GB ({r['weight_bytes'] / base['weight_bytes']:.2f}x)"
              f" | decode b1 {r['decode_b1_tok_s']:6.1f} tok/s ({r['decode_b1_tok_s'] / base['decode_b1_tok_s']:.2f}x)"
              f" | b8 {r['decode_b8_tok_s']:6.1f} tok/s ({r['decode_b8_tok_s'] / base['decode_b8_tok_s']:.2f}x)"
              f" | prefill 32 tok {r['prefill_b1_ms']:5.0f} ms | same greedy tokens: "
              f"{r['same_tokens_as_bf16_b1']}, {r['same_tokens_as_bf16_b8']}")


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", choices=["560m", "tiny"], default="560m")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=33)
    p.add_argument("--repeats", type=int, default=5)


def main(argv=None) -> int:
    return bench_main(argv, __doc__, ROOT / "results" / "bench_quant.json", arguments, run, print_results)


if __name__ == "__main__":
    sys.exit(main())
