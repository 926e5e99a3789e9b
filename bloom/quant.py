"""Weight-only int8: `quantize_int8(model)` swaps the transformer's `nn.Linear`s (and, optionally, the
LM head) for `Int8Linear`s holding int8 weights with one scale per output channel. Activations stay
in bfloat16; only the weights are rounded. It halves the bytes of those weights, for models whose bf16
weights do not fit and for decoding a row at a time (on this project's 2-vCPU EPYC: x1.13 at batch 1,
slower from a few rows on; README, Performance).

On CPU the product is PyTorch's own int8 weight kernel, `aten._weight_int8pack_mm` (the one torchao's
int8 weight-only mode calls there). Its CPU kernel is vectorised for bfloat16 activations only (float32
runs ~15x slower), so int8 needs a bfloat16 model. On other devices (CUDA) the weight is converted to
bfloat16 in slices per call and multiplied by the device's own matmul: the memory saving holds, the
speed-up does not (each step reads the int8 weight and writes and reads its bf16 copy); PyTorch's CUDA
build of the kernel, if any, was not available to check here (no GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .packing import InferenceLinear

QUANTIZE = (None, "int8")  # the values of the `quantize` setting (None: the model's own dtype)
# The CPU kernel converts the weight once per 4 input rows, so its time grows with the rows: at 32 rows
# and more, converting the whole weight to bf16 once and multiplying is as fast or faster (measured on
# (4096, 1024) and (1024, 4096): 0.82 vs 0.86 ms at 32 rows, 6.5 vs 2.9 ms at 256).
KERNEL_MAX_ROWS = 32
SLICE = 2**24  # weights converted at a time when quantizing or dequantizing (a 250880-row LM head in 16)


class Int8Linear(InferenceLinear):
    """An inference-only `nn.Linear` with an int8 weight (out, in) and bf16 scales (out,), symmetric per
    output channel: W ≈ weight * scales[:, None]. The plain weight is dropped."""

    made_by = "quantized to int8 (quantize_int8())"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.slice_rows = max(1, SLICE // self.in_features)
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scales = torch.empty(w.shape[0], dtype=w.dtype, device=w.device)
        for start in range(0, w.shape[0], self.slice_rows):  # in slices: fp32 temporaries stay small
            rows = slice(start, start + self.slice_rows)
            block = w[rows].float()
            # The scale is rounded to the model dtype first and the weight divided by the rounded scale,
            # so that the pair the kernel multiplies is the closest to W.
            scales[rows] = (block.abs().amax(dim=1) / 127).clamp(min=torch.finfo(w.dtype).tiny)
            q[rows] = (block / scales[rows].float()[:, None]).round_().clamp_(-127, 127)
        self.register_buffer("weight", q, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)
        # torch 2.13's CPU kernel reads in_features in steps of 16 with no tail: other widths give garbage
        # or a crash (measured), so they take the dequantizing path. The device is fixed (no moves).
        self.kernel = w.device.type == "cpu" and self.in_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        self._check_inference(x)
        rows = x.numel() // self.in_features
        if self.kernel and rows < KERNEL_MAX_ROWS:
            # The kernel takes a 2-D input and loads it with aligned vector loads: copy a misaligned view.
            x2 = x.reshape(rows, self.in_features)
            if not x2.is_contiguous() or x2.data_ptr() % 64:
                x2 = x2.clone(memory_format=torch.contiguous_format)
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales).view(*x.shape[:-1], self.out_features)
        else:  # in slices of output rows, so that the bf16 copy never holds the whole weight
            y = torch.cat([F.linear(x, w.to(x.dtype)) * s for w, s in
                           zip(self.weight.split(self.slice_rows), self.scales.split(self.slice_rows))], -1)
        return y if self.bias is None else y + self.bias


def quantize_int8(model: nn.Module, lm_head: bool = True) -> int:
    """Replace the transformer's `nn.Linear`s (query_key_value, dense, dense_h_to_4h, dense_4h_to_h) and,
    when `lm_head`, the causal LM head by `Int8Linear`s, in place, one at a time (each bf16 weight is
    released as its int8 copy is made, so the peak is the bf16 model plus one layer). Returns how many.

    The model must be bfloat16 (ValueError otherwise). Task heads (score, classifier, qa_outputs) stay
    as they are: they are a few rows and decide the labels. The embedding stays bf16; a tied LM head
    gets an int8 copy (vocab x hidden bytes). `pretraining_tp` row-parallel layers stay plain (they
    slice the weight). Call before `pack_for_cpu`, which then packs only what is left plain. After this
    the model can no longer be trained, moved, converted or saved."""
    check_quantize("int8", model.get_input_embeddings().weight.dtype)
    targets = [(layer, name) for block in getattr(model, "transformer", model).h
               for layer, names in ((block.self_attention, ("query_key_value", "dense")),
                                    (block.mlp, ("dense_h_to_4h", "dense_4h_to_h")))
               for name in names if not (layer.tp > 1 and name in ("dense", "dense_4h_to_h"))]
    if lm_head and hasattr(model, "lm_head"):
        targets.append((model, "lm_head"))
    targets = [(parent, name) for parent, name in targets if isinstance(getattr(parent, name), nn.Linear)]
    if any(getattr(parent, name).weight.is_meta for parent, name in targets):
        raise ValueError("quantize='int8' needs every weight in memory; this model has weights offloaded to "
                         "disk (on the meta device)")
    for parent, name in targets:
        setattr(parent, name, Int8Linear(getattr(parent, name)))  # the bf16 Linear is released here
    return len(targets)


def check_quantize(quantize: str | None, dtype: torch.dtype | None = None) -> None:
    """ValueError naming the setting when `quantize` is unknown or does not go with the model's dtype
    (None: not known yet, e.g. "fast" before the device is known)."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(map(repr, QUANTIZE))}, got {quantize!r}")
    if quantize == "int8" and dtype not in (None, torch.bfloat16):
        raise ValueError(
            f"quantize='int8' needs dtype bfloat16, got {str(dtype).removeprefix('torch.')}: PyTorch's int8 "
            "weight kernel is fast for bf16 activations only (float32 runs ~15x slower on CPU), and float16 "
            "overflows in the unscaled product. Set dtype: bfloat16."
        )


def weight_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each tensor once (a tied weight counts once; a
    oneDNN-packed weight by its element count)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
