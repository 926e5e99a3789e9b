"""The low-bit weight kernels this torch build offers on this CPU, against the bf16 product the replica runs.

Why `quantize: int8` gains little on CPU, and what else there is: each kernel does the Linears of one
decoding step of a bloom-560m-shaped model (24 layers' query_key_value, dense, dense_h_to_4h and
dense_4h_to_h, then the 250880-row LM head; every weight its own random tensor, so they are read from
memory as in a real step, not from cache), at 1, 8 and 64 rows. Interleaved, medians.

  bf16        oneDNN-packed bf16 weights (`pack_for_cpu`, what the replica runs)
  int8        weight-only int8, one scale per output channel: `aten._weight_int8pack_mm` (`quantize: int8`)
  int4        weight-only int4, groups of 128: `aten._weight_int4pack_mm_for_cpu` (torchao's int4 on CPU)
  w8a8-row    int8 weights and int8 activations, a scale per row: `aten._int_mm`
  w8a8-tensor int8 weights, activations rounded to uint8 with one scale for the whole input (every row of a
              batch: one row's outlier coarsens the others): fbgemm's dynamic quantized linear, deprecated

The w8a8 kernels round activations too, so they are not weight-only; they are here for their speed.

    python benchmarks/bench_kernels.py          # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from bench_model import SHAPES, timed
from common import bench_main, describe, machine

ROOT = Path(__file__).resolve().parent
GROUP = 128  # int4 group size along the input


def prepare(w: torch.Tensor) -> dict:
    """The weight (out, in), float32, in each kernel's form: {name: fn(x float32 (rows, in))}."""
    out_f = w.shape[0]
    scales = w.abs().amax(1) / 127
    q8 = (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
    g = w.view(out_f, -1, GROUP)
    low, step = g.amin(-1), ((g.amax(-1) - g.amin(-1)) / 15).clamp(min=1e-8)
    q4 = ((g - low[..., None]) / step[..., None]).round().clamp(0, 15).to(torch.int32).view(w.shape)
    q4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
    # torch's int4 convention: w = (q - 8) * scale + zero
    scale_zero = torch.stack([step, low + 8 * step], -1).transpose(0, 1).contiguous().bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the quantized-tensor API warns that it is deprecated
        torch.backends.quantized.engine = "x86"
        fbgemm = torch.ops.quantized.linear_prepack(
            torch.quantize_per_channel(w, scales, torch.zeros(out_f, dtype=torch.long), 0, torch.qint8), None)
    packed, s8 = torch.ops.mkldnn._reorder_linear_weight(w.bfloat16()), scales.bfloat16()

    def w8a8_row(x):
        s = x.abs().amax(-1, keepdim=True).clamp(min=1e-30) / 127
        return torch._int_mm((x / s).round().to(torch.int8), q8.t()) * s * scales

    return {
        "bf16": lambda x: torch.ops.mkldnn._linear_pointwise(x.bfloat16(), packed, None, "none", [], ""),
        "int8": lambda x: torch.ops.aten._weight_int8pack_mm(x.bfloat16(), q8, s8),
        "int4": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), q4, GROUP, scale_zero),
        "w8a8-row": w8a8_row,
        "w8a8-tensor": lambda x: torch.ops.quantized.linear_dynamic(x, fbgemm, False),
    }


def run(args) -> dict:
    shape = SHAPES["560m"]
    c, v = shape["hidden_size"], shape["vocab_size"]
    layers = [(3 * c, c), (c, c), (4 * c, c), (c, 4 * c)] * args.layers + [(v, c)]
    g = torch.Generator().manual_seed(0)
    kernels = [prepare(torch.randn(o, i, generator=g) * 0.02) for o, i in layers]
    names = list(kernels[0])
    inputs = {(rows, i): torch.randn(rows, i, generator=g) for rows in args.rows for i in (c, 4 * c)}
    # The bf16 input conversion is part of each call for every kernel alike (the model's activations are
    # bf16 already; this keeps one float32 input for all).
    fns = {(name, rows): (lambda name=name, rows=rows: [k[name](inputs[rows, i]) for k, (o, i) in zip(kernels, layers)])
           for rows in args.rows for name in names}
    with torch.inference_mode():
        times = timed(fns, args.repeats)
    weights = sum(o * i for o, i in layers)
    return {"machine": machine(), "layers": args.layers, "weights": weights, "repeats": args.repeats,
            "runs": [{"kernel": name, "rows": rows, "ms": times[name, rows] * 1e3,
                      "vs_bf16": times["bf16", rows] / times[name, rows]} for rows in args.rows for name in names]}


def print_results(results: dict) -> None:
    print(f"{describe(results['machine'])}; torch {results['machine'].get('torch')}, "
          f"{results['machine'].get('threads')} threads; the Linears of one step of {results['layers']} layers "
          f"+ LM head ({results['weights'] / 1e6:.0f} M weights), medians of {results['repeats']}")
    rows = sorted({r["rows"] for r in results["runs"]})
    print(f"  {'kernel':<12}" + "".join(f"{f'{n} row' + 's' * (n > 1):>22}" for n in rows))
    for name in dict.fromkeys(r["kernel"] for r in results["runs"]):
        cells = {r["rows"]: r for r in results["runs"] if r["kernel"] == name}
        print(f"  {name:<12}" + "".join(f"{cells[n]['ms']:>10.1f} ms (x{cells[n]['vs_bf16']:.2f})" for n in rows))


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--repeats", type=int, default=5)


def main(argv=None) -> int:
    return bench_main(argv, __doc__, ROOT / "results" / "bench_kernels.json", arguments, run, print_results)


if __name__ == "__main__":
    sys.exit(main())
