"""Batch-1 decoding's weight products: does a bigger product, or another packing, read bf16 weights faster?

A batch-1 bf16 decoding step of bloom-560m reads every weight once, so its speed is bounded by memory
bandwidth; `bench_model.py` finds it at about half that bound on the EPYC VM, with the products
reading ~67 GB/s where one large product reads ~85. This measures, in one interleaved run, the Linears
of one step's 24 layers (query_key_value, dense, dense_h_to_4h, dense_4h_to_h; each weight its own
tensor, so read from memory) at one row, in bf16, as:

  packed            oneDNN-packed weights (`pack_for_cpu`, what the replica runs)
  packed, hint 1    packed for a batch of 1 (`_reorder_linear_weight`'s batch_size hint), which lets
                    oneDNN pick a layout for matrix-vector products
  plain             torch's `F.linear` on the unpacked weight
  stacked           per layer, the three products whose input is hidden-wide as one product of
                    8 x hidden outputs, plus dense_4h_to_h: the most that fusing products per layer could
                    gain (in BLOOM they cannot be fused: query_key_value is one product already, dense
                    reads the attention's output, and dense_4h_to_h the GELU of dense_h_to_4h's)
and, for scale, one product over a single weight of the LM head's size (250880 x hidden), which reads
memory at about the machine's limit. Each row gives ms per step and GB/s of weights read.

    python benchmarks/bench_gemv.py            # ~30 s on 2 cores
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_model import SHAPES, timed
from common import bench_main, describe, machine

ROOT = Path(__file__).resolve().parent


def packed(w: torch.Tensor, hint: int | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, hint)


def product(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def run(args) -> dict:
    c, v = SHAPES["560m"]["hidden_size"], SHAPES["560m"]["vocab_size"]
    shapes = [(3 * c, c), (c, c), (4 * c, c), (c, 4 * c)]
    g = torch.Generator().manual_seed(0)

    def weight(o: int, i: int) -> torch.Tensor:
        return (torch.randn(o, i, generator=g) * 0.02).bfloat16()

    plain = [[weight(o, i) for o, i in shapes] for _ in range(args.layers)]
    x = {i: torch.randn(1, i, generator=g).bfloat16() for i in (c, 4 * c)}
    # Each layout: the (input width, packed weight) of every product of a step, in order.
    layouts = {
        "packed": [(i, packed(w)) for layer in plain for w, (o, i) in zip(layer, shapes)],
        "packed, hint 1": [(i, packed(w, 1)) for layer in plain for w, (o, i) in zip(layer, shapes)],
        "stacked": [p for layer in plain for p in ((c, packed(torch.cat(layer[:3]))), (4 * c, packed(layer[3])))],
    }
    fns = {name: (lambda step=step: [product(x[i], w) for i, w in step]) for name, step in layouts.items()}
    fns["plain"] = lambda: [F.linear(x[i], w) for layer in plain for w, (o, i) in zip(layer, shapes)]
    head = packed(weight(v, c))
    fns["one large product"] = lambda: product(x[c], head)
    with torch.inference_mode():
        times = timed(fns, args.repeats)
    step_bytes = 2 * args.layers * sum(o * i for o, i in shapes)
    nbytes = {name: step_bytes for name in fns} | {"one large product": 2 * v * c}
    return {"machine": machine(), "layers": args.layers, "repeats": args.repeats, "step_bytes": step_bytes,
            "runs": [{"layout": name, "ms": t * 1e3, "gb_per_s": nbytes[name] / t / 1e9,
                      "vs_packed": times["packed"] / t if name != "one large product" else None}
                     for name, t in times.items()]}


def show(results: dict) -> None:
    print(f"{describe(results['machine'])}; torch {results['machine'].get('torch')}, "
          f"{results['machine'].get('threads')} threads; one row, bf16, the Linears of {results['layers']} "
          f"layers ({results['step_bytes'] / 1e6:.0f} MB), medians of {results['repeats']}")
    for r in results["runs"]:
        vs = f"  x{r['vs_packed']:.2f} of packed" if r["vs_packed"] else "  (a single weight, for scale)"
        print(f"  {r['layout']:<18}{r['ms']:>8.2f} ms{r['gb_per_s']:>8.1f} GB/s{vs}")


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--repeats", type=int, default=9)


def main(argv=None) -> int:
    return bench_main(argv, __doc__, ROOT / "results" / "bench_gemv.json", arguments, run, show)


if __name__ == "__main__":
    sys.exit(main())
