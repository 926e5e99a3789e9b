"""This implementation against the reference (transformers' BLOOM), in one run, same machine and threads.

Measures, for each dtype:
  - labeling forward: tokens/s of the body (hidden states, no LM head), a left-padded batch;
  - greedy generation: new tokens/s at batch 1 and 8 (KV cache, no early stop);
and the machine's matmul peak in the same run, to show what share of it each forward reaches.
The checkpoint is written once by the reference (random weights, bloom-560m shape by default) and
loaded by both implementations. Prints a table and writes a JSON of the results.

    python benchmarks/bench_model.py                 # bloom-560m shape, float32 and bfloat16
    python benchmarks/bench_model.py --shape tiny    # seconds; overhead-dominated
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import bloom

ROOT = Path(__file__).resolve().parent
SHAPES = {
    "560m": dict(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16),
    "tiny": dict(vocab_size=1024, hidden_size=128, n_layer=4, n_head=4),
}


def timed(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each function, after a warm-up call of each.

    Calls are interleaved (a, b, a, b, ...) so that drift in the machine's speed (shared VMs vary
    by tens of percent from minute to minute) hits every contender alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak(dtype: torch.dtype, hidden: int, repeats: int = 5) -> float:
    """Best FLOP/s of this machine's matmul in `dtype` over the model's own GEMM shapes
    (1024 tokens × hidden → 3·hidden and 4·hidden, and back)."""
    best = 0.0
    for n_in, n_out in ((hidden, 3 * hidden), (hidden, 4 * hidden), (4 * hidden, hidden)):
        x, w = torch.randn(1024, n_in, dtype=dtype), torch.randn(n_out, n_in, dtype=dtype)
        torch.nn.functional.linear(x, w)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best = max(best, 2 * 1024 * n_in * n_out / (time.perf_counter() - start))
    return best


def checkpoint(shape: str) -> Path:
    path = ROOT / "results" / f"ckpt-{shape}"
    if not (path / "config.json").exists():
        import transformers

        print(f"writing a random {shape} checkpoint with the reference to {path}", file=sys.stderr)
        torch.manual_seed(0)
        cfg = transformers.BloomConfig(**SHAPES[shape], pad_token_id=3)
        transformers.BloomForCausalLM(cfg).save_pretrained(path)
    return path


def body_flops(cfg, batch: int, seq: int) -> float:
    """Matmul FLOPs of one forward of the body: 24·C² per token per layer, plus attention 4·T·C per token."""
    C, L = cfg.hidden_size, cfg.n_layer
    return L * batch * seq * (24 * C * C + 4 * seq * C)


def run(args) -> dict:
    import transformers

    path = checkpoint(args.shape)
    cfg = bloom.BloomConfig.from_pretrained(path)
    g = torch.Generator().manual_seed(0)
    results = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "shape": args.shape, "config": SHAPES[args.shape], "runs": [],
    }
    for dtype_name in args.dtypes:
        dtype = bloom.resolve_dtype(dtype_name)
        peak = matmul_peak(dtype, cfg.hidden_size)
        ours = bloom.BloomForCausalLM.from_pretrained(path, dtype=dtype)
        ref = transformers.BloomForCausalLM.from_pretrained(path, dtype=dtype).eval()
        # Labeling forward: the body only (no 250880-wide LM head), left-padded rows of mixed length.
        B, T = args.label_batch, args.label_len
        ids = torch.randint(4, cfg.vocab_size, (B, T), generator=g)
        mask = torch.ones(B, T, dtype=torch.long)
        for row in range(B):
            mask[row, : row * T // (2 * B)] = 0  # up to a quarter of the row is padding
        row = {"dtype": dtype_name, "matmul_peak_tflops": peak / 1e12}
        with torch.inference_mode():
            forward = {name: (lambda m=model: m.transformer(input_ids=ids, attention_mask=mask, use_cache=False))
                       for name, model in (("ours", ours), ("reference", ref))}
            for name, t in timed(forward, args.repeats).items():
                row[f"label_{name}_tok_s"] = B * T / t
                row[f"label_{name}_peak_share"] = body_flops(cfg, B, T) / t / peak
        # Greedy generation, no early stop, same prompts for both.
        for gb in (1, 8):
            prompt = torch.randint(4, cfg.vocab_size, (gb, args.prompt_len), generator=g)
            n = args.new_tokens
            outs = {}
            run_ours = lambda: outs.__setitem__("ours", ours.generate(prompt, max_new_tokens=n, eos_token_id=[]))
            run_ref = lambda: outs.__setitem__("reference", ref.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=3))
            for name, t in timed({"ours": run_ours, "reference": run_ref}, args.gen_repeats).items():
                row[f"gen_b{gb}_{name}_tok_s"] = gb * n / t
            row[f"gen_b{gb}_same_tokens"] = bool(torch.equal(outs["ours"], outs["reference"]))
        results["runs"].append(row)
        del ours, ref
        print_row(row)
    return results


def print_row(r: dict) -> None:
    d = r["dtype"]
    print(f"\n[{d}] matmul peak {r['matmul_peak_tflops']:.2f} TFLOP/s")
    print(f"  labeling forward   ours {r['label_ours_tok_s']:8.0f} tok/s ({r['label_ours_peak_share']:.0%} of peak)"
          f" | reference {r['label_reference_tok_s']:8.0f} tok/s ({r['label_reference_peak_share']:.0%})"
          f" | ×{r['label_ours_tok_s'] / r['label_reference_tok_s']:.2f}")
    for gb in (1, 8):
        o, ref = r[f"gen_b{gb}_ours_tok_s"], r[f"gen_b{gb}_reference_tok_s"]
        print(f"  greedy batch {gb:<2}     ours {o:8.1f} tok/s | reference {ref:8.1f} tok/s | ×{o / ref:.2f}"
              f" | same tokens: {r[f'gen_b{gb}_same_tokens']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="560m")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--label-batch", type=int, default=8)
    p.add_argument("--label-len", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gen-repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_model.json")
    args = p.parse_args(argv)
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
