"""CPU inference with prepacked weights: `pack_for_cpu(model)` swaps every CPU `nn.Linear` for a
`PackedLinear` whose weight is reordered once into oneDNN's blocked layout.

It uses `torch.ops.mkldnn` (the kernels torch.compile's CPU backend calls), private to PyTorch; so the
first use per dtype checks the kernel against `F.linear` and packing is skipped where it is missing or
disagrees.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

class InferenceLinear(nn.Module):
    """Base of the inference-only replacements of `nn.Linear` (`PackedLinear`, `bloom.quant.Int8Linear`):
    their weights are held in a form only their forward reads, the plain weight is dropped, and so the
    module cannot be trained, moved, converted or saved. Load the checkpoint again for that."""

    def _check_inference(self, x: torch.Tensor) -> None:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(f"{type(self).__name__} is inference-only: the model was {self.made_by}")

    def _apply(self, fn, recurse=True):
        raise RuntimeError(f"this model's weights were {self.made_by}; load the checkpoint again to move or "
                           "convert it")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedLinear(InferenceLinear):
    """An inference-only `nn.Linear` for CPU whose weight is held in oneDNN's blocked layout.

    PyTorch's CPU `F.linear` is slow at the few-row shapes of decoding: on a 2-vCPU EPYC it reads a
    (250880, 1024) weight at 15-17 GB/s at one row and 6 GB/s (fp32) at eight, against 31-36 GB/s of
    memory bandwidth. Reordered once into oneDNN's layout the same product reads 26-32 GB/s, and
    prefill-sized products are no slower (fp32 faster). bf16 results are bit-identical to F.linear's;
    fp32 differ in rounding only (a different summation order). The plain weight is dropped."""

    made_by = "packed for CPU inference (pack_for_cpu())"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach()),
                             persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        self._check_inference(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


@functools.cache
def _packing_works(dtype: torch.dtype) -> bool:
    """Whether this torch build has oneDNN's packed linear for `dtype`, and it agrees with F.linear."""
    try:
        linear, x = nn.Linear(32, 48, dtype=dtype), torch.randn(3, 5, 32, dtype=dtype)
        with torch.no_grad():
            got, want = PackedLinear(linear)(x), linear(x)
        return bool(torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def pack_for_cpu(model: nn.Module) -> int:
    """Replace the model's CPU `nn.Linear`s (float32/bfloat16) by `PackedLinear`s, in place, for inference.

    Returns how many were packed: 0 where the build lacks oneDNN, the model is on another device, or its
    dtype is float16. A tied LM head gets a packed copy (the embedding keeps its plain weight: one more
    vocab x hidden matrix in memory). `pretraining_tp` row-parallel layers stay plain (they slice the
    weight). After packing the model can no longer be trained, moved, converted or saved."""
    packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child.weight.device.type != "cpu":
                continue
            if child.weight.dtype not in (torch.float32, torch.bfloat16) or not _packing_works(child.weight.dtype):
                continue
            if getattr(parent, "tp", 1) > 1 and name in ("dense", "dense_4h_to_h"):
                continue
            setattr(parent, name, PackedLinear(child))
            packed += 1
    return packed
