"""This implementation against the reference (transformers' BLOOM), in one run, same machine and threads.

Measures the machine's limits (matmul FLOP/s per dtype, memory read bandwidth) and, for each dtype:
  - labeling forward: tokens/s of the body (hidden states, no LM head), a left-padded batch, against
    the reference's body and the reference's causal LM (logits at every position); share of peak;
  - greedy generation: new tokens/s at batch 1 and 8 (KV cache, no early stop), and batch 1 against
    the bandwidth bound (weight bytes read per token);
  - a sweep of forward tokens/s over batch size and sequence length, plotted to a PNG.
The checkpoint is written once by the reference (random weights, bloom-560m shape by default) and
loaded by both implementations. Prints a table and writes a JSON of the results.

    python benchmarks/bench_model.py                 # bloom-560m shape, float32 and bfloat16
    python benchmarks/bench_model.py --shape tiny    # seconds; overhead-dominated
    python benchmarks/bench_model.py --device cuda   # the default where a GPU is present
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import bloom
from common import describe, machine, read_results, write_results

ROOT = Path(__file__).resolve().parent
SHAPES = {
    "560m": dict(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16),
    "tiny": dict(vocab_size=1024, hidden_size=128, n_layer=4, n_head=4),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict, repeats: int, device: torch.device = torch.device("cpu")) -> dict:
    """Median seconds per call of each function, after a warm-up call of each.

    Calls are interleaved (a, b, a, b, ...) so that drift in the machine's speed (shared VMs vary
    by tens of percent from minute to minute) hits every contender alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak(dtype: torch.dtype, hidden: int, device: torch.device, repeats: int = 5) -> float:
    """Best FLOP/s of this machine's matmul in `dtype` over the model's own GEMM shapes
    (1024 tokens × hidden → 3·hidden and 4·hidden, and back), by torch's plain linear and, on CPU, by
    the oneDNN-packed linear that our model uses there (whichever is faster sets the peak)."""
    best = 0.0
    for n_in, n_out in ((hidden, 3 * hidden), (hidden, 4 * hidden), (4 * hidden, hidden)):
        x = torch.randn(1024, n_in, dtype=dtype, device=device)
        linear = torch.nn.Linear(n_in, n_out, bias=False, dtype=dtype, device=device)
        fns = {"plain": lambda linear=linear: linear(x)}
        if device.type == "cpu" and dtype in (torch.float32, torch.bfloat16):
            fns["packed"] = lambda packed=bloom.packing.PackedLinear(linear): packed(x)
        with torch.inference_mode():
            t = min(timed(fns, repeats, device).values())
        best = max(best, 2 * 1024 * n_in * n_out / t)
    return best


def memory_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 11) -> dict:
    """Bytes/s of reading a large buffer once, per reader: the bound on decoding, which reads every weight
    once per step, is the fastest. The median of the repeats (on a shared VM the best one is an outlier
    now and then).

    On CPU the faster of two readers of 1 GiB: a sum, and the oneDNN-packed matrix-vector product that
    decoding itself runs. With 2 vCPUs the sum is limited by what two cores can have in flight, not by
    memory: on the EPYC VM it read 49 GB/s where the product read 87 GB/s, so a bound from the sum alone
    was exceeded by decoding (111-144% of it)."""
    n = int(gib * 2**30) // 4
    readers = {"sum": lambda x=torch.ones(n, dtype=torch.float32, device=device): x.sum()}
    if device.type == "cpu":
        linear = torch.nn.utils.skip_init(torch.nn.Linear, 1024, n // 1024, bias=False)
        linear.weight.data.fill_(1.0)
        packed, row = bloom.packing.PackedLinear(linear), torch.ones(1, 1024)
        del linear  # the packed copy alone is read
        readers["packed matrix-vector"] = lambda: packed(row)
    with torch.inference_mode():
        times = timed(readers, repeats, device)
    return {name: n * 4 / t for name, t in times.items()}


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


def left_padded(cfg, batch: int, seq: int, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with up to a quarter of each row padding on the left (rows of mixed length)."""
    ids = torch.randint(4, cfg.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        mask[row, : row * seq // (4 * batch)] = 0
    return ids.to(device), mask.to(device)


def run(args) -> dict:
    import transformers

    device = torch.device(args.device)
    path = checkpoint(args.shape)
    cfg = bloom.BloomConfig.from_pretrained(path)
    g = torch.Generator().manual_seed(0)
    readers = memory_bandwidth(device)
    bandwidth = max(readers.values())
    info = {**machine(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "transformers": transformers.__version__, "memory_read_gb_s": bandwidth / 1e9,
            "memory_read_gb_s_by_reader": {name: b / 1e9 for name, b in readers.items()}}
    results = {"machine": info, "shape": args.shape, "config": SHAPES[args.shape], "runs": [], "sweep": []}
    print(f"machine: {describe(info)}, {info['threads']} threads, device {info['device']}")
    print(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s ("
          + ", ".join(f"{name} {b / 1e9:.1f}" for name, b in readers.items()) + ")")
    for dtype_name in args.dtypes:
        dtype = bloom.resolve_dtype(dtype_name)
        peak = matmul_peak(dtype, cfg.hidden_size, device)
        ours = bloom.BloomForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        ref = transformers.BloomForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())  # tied head counted once
        # As the replica does on CPU: Linear weights packed for oneDNN (0 packed elsewhere).
        packed = ours.pack_for_cpu() if device.type == "cpu" else 0
        row = {"dtype": dtype_name, "matmul_peak_tflops": peak / 1e12, "weight_bytes": weight_bytes,
               "packed_linears": packed}
        # Labeling forward. Ours: the body (hidden states; task heads are a few numbers per row). The
        # reference twice: its body alone, and its causal LM with logits at every position (what
        # scoring text with a causal LM in transformers computes).
        B, T = args.label_batch, args.label_len
        ids, mask = left_padded(cfg, B, T, g, device)
        with torch.inference_mode():
            forward = {"ours": lambda: ours.transformer(input_ids=ids, attention_mask=mask, use_cache=False),
                       "reference": lambda: ref.transformer(input_ids=ids, attention_mask=mask, use_cache=False),
                       "reference_lm": lambda: ref(input_ids=ids, attention_mask=mask, use_cache=False)}
            for name, t in timed(forward, args.repeats, device).items():
                row[f"label_{name}_tok_s"] = B * T / t
            row["label_ours_peak_share"] = body_flops(cfg, B, T) * row["label_ours_tok_s"] / (B * T) / peak
            row["label_reference_peak_share"] = body_flops(cfg, B, T) * row["label_reference_tok_s"] / (B * T) / peak
        # Greedy generation, no early stop, same prompts for both.
        for gb in (1, 8):
            prompt = torch.randint(4, cfg.vocab_size, (gb, args.prompt_len), generator=g).to(device)
            n = args.new_tokens
            outs = {}
            run_ours = lambda: outs.__setitem__("ours", ours.generate(prompt, max_new_tokens=n, eos_token_id=[]))
            run_ref = lambda: outs.__setitem__("reference", ref.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=3))
            for name, t in timed({"ours": run_ours, "reference": run_ref}, args.gen_repeats, device).items():
                row[f"gen_b{gb}_{name}_tok_s"] = gb * n / t
            row[f"gen_b{gb}_same_tokens"] = bool(torch.equal(outs["ours"], outs["reference"]))
        # Batch-1 decode reads every weight once per token: its bound is bandwidth / weight bytes (the
        # prompt's prefill is included in the measured time, so this share is a lower bound).
        row["decode_b1_bound_tok_s"] = bandwidth / weight_bytes
        row["decode_b1_bound_share"] = row["gen_b1_ours_tok_s"] / row["decode_b1_bound_tok_s"]
        if dtype_name in args.sweep_dtypes:
            results["sweep"] += sweep(ours, ref, cfg, dtype_name, g, device, args.repeats)
        results["runs"].append(row)
        del ours, ref
        print_row(row)
    return results


SWEEP = [(b, 128) for b in (1, 4, 16)] + [(4, t) for t in (32, 512, 1024)]


def sweep(ours, ref, cfg, dtype_name: str, g, device, repeats: int) -> list[dict]:
    """Body forward tokens/s over batch sizes (at 128 tokens) and sequence lengths (at batch 4)."""
    points = []
    with torch.inference_mode():
        for batch, seq in SWEEP:
            ids, mask = left_padded(cfg, batch, seq, g, device)
            times = timed({name: (lambda m=m: m.transformer(input_ids=ids, attention_mask=mask, use_cache=False))
                           for name, m in (("ours", ours), ("reference", ref))}, max(2, repeats // 2), device)
            points += [{"dtype": dtype_name, "impl": name, "batch": batch, "seq": seq, "tok_s": batch * seq / t}
                       for name, t in times.items()]
    return points


def plot(results: dict, path: Path) -> Path | None:
    """Throughput against batch size and sequence length, ours and the reference (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (axis, key, fixed, label) in ((axes[0], "batch", ("seq", 128), "batch size (128 tokens)"),
                                      (axes[1], "seq", ("batch", 4), "sequence length (batch 4)")):
        for dtype in sorted({p["dtype"] for p in results["sweep"]}):
            for impl, style in (("ours", "-o"), ("reference", "--s")):
                pts = sorted((p[key], p["tok_s"]) for p in results["sweep"] if p["dtype"] == dtype
                             and p["impl"] == impl and p[fixed[0]] == fixed[1])
                axis.plot([x for x, _ in pts], [y for _, y in pts], style, label=f"{impl} {dtype}")
        axis.set_xscale("log", base=2)
        axis.set_xlabel(label)
        axis.set_ylabel("forward tokens/s")
        axis.grid(True, alpha=0.3)
    axes[0].legend()
    m = results["machine"]
    where = m["cpu"] if m["device"] == "cpu" else m["device"]
    fig.suptitle(f"BLOOM {results['shape']} body forward, {where}, {m['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def print_row(r: dict) -> None:
    d = r["dtype"]
    print(f"\n[{d}] matmul peak {r['matmul_peak_tflops']:.2f} TFLOP/s; weights {r['weight_bytes'] / 1e9:.2f} GB")
    print(f"  labeling forward   ours {r['label_ours_tok_s']:8.0f} tok/s ({r['label_ours_peak_share']:.0%} of peak)"
          f" | reference body {r['label_reference_tok_s']:8.0f} tok/s ({r['label_reference_peak_share']:.0%})"
          f" ×{r['label_ours_tok_s'] / r['label_reference_tok_s']:.2f}"
          f" | reference causal LM {r['label_reference_lm_tok_s']:8.0f} tok/s"
          f" ×{r['label_ours_tok_s'] / r['label_reference_lm_tok_s']:.2f}")
    for gb in (1, 8):
        o, ref = r[f"gen_b{gb}_ours_tok_s"], r[f"gen_b{gb}_reference_tok_s"]
        print(f"  greedy batch {gb:<2}     ours {o:8.1f} tok/s | reference {ref:8.1f} tok/s | ×{o / ref:.2f}"
              f" | same tokens: {r[f'gen_b{gb}_same_tokens']}")
    print(f"  batch-1 decode     {r['decode_b1_bound_share']:.0%} of the bandwidth bound "
          f"({r['decode_b1_bound_tok_s']:.1f} tok/s)")


def print_machines(path: Path) -> None:
    """The headline figures of every machine in the results file, side by side (one line per dtype)."""
    print(f"\nevery machine in {path.name}:")
    for key, res in read_results(path).items():
        for r in res["runs"]:
            print(f"  {key:<40} {r['dtype']:<9} labeling {r['label_ours_peak_share']:4.0%} of "
                  f"{r['matmul_peak_tflops']:.2f} TFLOP/s | greedy b8 x{r['gen_b8_ours_tok_s'] / r['gen_b8_reference_tok_s']:.2f}"
                  f" | b1 decode {r['decode_b1_bound_share']:4.0%} of the bandwidth bound")


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
    p.add_argument("--sweep-dtypes", nargs="*", default=["bfloat16"], help="dtypes to sweep batch and length for")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "bench_model.json")
    args = p.parse_args(argv)
    results = run(args)
    write_results(results, args.out)
    png = plot(results, args.out.with_suffix(".png")) if results["sweep"] else None
    if png:
        print(f"wrote {png}")
    print_machines(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
