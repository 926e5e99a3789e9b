"""Where the model's time goes: a torch.profiler breakdown of our forward, matmul against the rest.

On a CPU whose bf16 matmul is fast (AMX) the work around the products (GELU, softmax, adds, dtype
copies) is what limits the labeling forward, so this reports the non-matmul share of self CPU time
for three cases, each with the weights packed as the replica runs them:
  - labeling forward: the body over a left-padded batch (8 x 128 tokens by default);
  - a decode step at batch 8 and at batch 1 (one new token after a 32-token prompt, LM head included).

    python benchmarks/bench_profile.py                       # float32 and bfloat16, bloom-560m shape
    python benchmarks/bench_profile.py --dtypes bfloat16 --top 15
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import bloom
from bench_model import ROOT, checkpoint, left_padded
from common import describe, machine, write_results

# Self time of these ops is the matrix products; everything else is "non-matmul" work.
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::matmul",
              "mkldnn::_linear_pointwise", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_weight_int8pack_mm")


def breakdown(fn, repeats: int) -> dict:
    """Self CPU time per op over `repeats` calls of fn (after one warm-up): ms per call, and shares."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    ops = {e.key: e.self_cpu_time_total / 1e3 / repeats for e in prof.key_averages()}  # ms per call
    total = sum(ops.values())
    matmul = sum(ms for name, ms in ops.items() if name in MATMUL_OPS)
    return {"total_ms": total, "matmul_ms": matmul, "non_matmul_share": 1 - matmul / total,
            "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def cases(model, cfg, args, g) -> dict:
    ids, mask = left_padded(cfg, args.label_batch, args.label_len, g, "cpu")
    out = {"label": lambda: model.transformer(input_ids=ids, attention_mask=mask, use_cache=False)}
    for b in (8, 1):
        prompt = torch.randint(4, cfg.vocab_size, (b, args.prompt_len), generator=g)
        cache = model(prompt, use_cache=True).past_key_values
        nxt = torch.randint(4, cfg.vocab_size, (b, 1), generator=g)

        def step(cache=cache, nxt=nxt):
            # One token on top of the prompt's cache, which is rolled back after each step.
            model(nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.length = args.prompt_len

        out[f"decode_b{b}"] = step
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="560m")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--label-batch", type=int, default=8)
    p.add_argument("--label-len", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=8, help="ops to print per case")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_profile.json")
    args = p.parse_args(argv)
    info = machine()
    print(f"machine: {describe(info)}, {info['threads']} threads")
    path = checkpoint(args.shape)
    cfg = bloom.BloomConfig.from_pretrained(path)
    results = {"machine": info, "shape": args.shape, "runs": []}
    for dtype_name in args.dtypes:
        model = bloom.BloomForCausalLM.from_pretrained(path, dtype=bloom.resolve_dtype(dtype_name))
        model.pack_for_cpu()
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for case, fn in cases(model, cfg, args, g).items():
                r = breakdown(fn, args.repeats)
                print(f"\n[{dtype_name}] {case}: {r['total_ms']:.1f} ms, matmul {r['matmul_ms']:.1f} ms, "
                      f"non-matmul {r['non_matmul_share']:.0%}")
                for name, ms in list(r["ops"].items())[: args.top]:
                    print(f"  {ms:8.2f} ms  {ms / r['total_ms']:5.1%}  {name}")
                results["runs"].append({"dtype": dtype_name, "case": case, **r})
        del model
    write_results(results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
