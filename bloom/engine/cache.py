"""The engine's KV cache: one slot of `max_seq_len` tokens per running sequence, allocated once, and how
big to make it.

Why slots and not pages: pages would fit more short sequences in the same memory, but without a paged
attention kernel every decode step must first gather each row's keys and values into one tensor; on
CPU that copy made a first paged version of this engine 2.2x slower than the static path in
benchmarks/bench_engine.py, where slots are faster than it.
"""

from __future__ import annotations

import os

import numpy as np
import torch

DEFAULT_SLOTS = 64  # sequences a cache holds by default (see fit_cache_tokens)


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on `device`: the driver's free memory on CUDA; on CPU the
    kernel's MemAvailable (free memory plus what it can reclaim), else the free pages."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_bytes_per_token(config, element_size: int, n_layer: int | None = None) -> int:
    """Bytes of one token's keys and values over `n_layer` layers (default: all of the model's)."""
    return 2 * (config.n_layer if n_layer is None else n_layer) * config.hidden_size * element_size


def fit_cache_tokens(model, max_seq_len: int, slots: int = DEFAULT_SLOTS, memory_share: float = 0.5,
                     free=free_memory) -> int:
    """A KV cache size for `slots` sequences of `max_seq_len` tokens, or fewer where that would take more
    than `memory_share` of what is free on a device holding layers (each device holds the cache of its
    own layers); at least one sequence. Call after loading the model, so that its weights are counted."""
    layers: dict[torch.device, int] = {}
    for block in model.transformer.h:
        w = block.input_layernorm.weight
        layers[w.device] = layers.get(w.device, 0) + 1
    elem = model.transformer.h[0].input_layernorm.weight.element_size()
    per_token = {d: kv_bytes_per_token(model.config, elem, n) for d, n in layers.items()}
    room = min(int(memory_share * free(d)) // b for d, b in per_token.items())
    return max(1, min(slots, room // max_seq_len)) * max_seq_len


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. Zeros, not empty: a forward also reads positions it masks out, whose probability is
    then exactly 0, and 0 × value must stay 0 (uninitialised memory may hold NaN).

    On CPU the memory comes from calloc (numpy's zeros): the kernel hands out zero pages as they are first
    written, so a cache of many long slots costs no time to allocate and only the memory its sequences
    fill (torch.zeros writes every page: 1.3-1.8 s and 1.3 GB for 64 slots of 1056 tokens of a hidden 512
    x 8 layers model on the 2-vCPU EPYC, against 6 ms and nothing)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = 1
    for n in shape:
        numel *= n
    raw = torch.from_numpy(np.zeros(numel * dtype.itemsize, dtype=np.uint8))
    return raw.view(dtype).view(shape)


class SlotKVCache:
    """Keys and values of every layer, allocated once: (num_slots, H, max_seq_len, D) per layer, each on its
    layer's device. A sequence holds one slot (its prompt and new tokens at positions 0, 1, 2, ...) from
    admission to its end; `allocate` and `release` hand slots out and take them back."""

    def __init__(self, model, cache_tokens: int, max_seq_len: int):
        if max_seq_len < 1 or cache_tokens < max_seq_len:
            raise ValueError(f"cache_tokens ({cache_tokens}) must hold at least one sequence of max_seq_len "
                             f"({max_seq_len}) tokens")
        cfg = model.config
        self.max_seq_len = max_seq_len
        self.num_slots = cache_tokens // max_seq_len
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for block in model.transformer.h:
            w = block.input_layernorm.weight  # never packed, so it names the layer's device and dtype
            shape = (self.num_slots, cfg.n_head, max_seq_len, cfg.head_dim)
            self.keys.append(lazy_zeros(shape, w.dtype, w.device))
            self.values.append(lazy_zeros(shape, w.dtype, w.device))
        self._free = list(range(self.num_slots))

    @property
    def capacity(self) -> int:
        """Tokens the cache holds in all."""
        return self.num_slots * self.max_seq_len

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        """A free slot (the lowest), or None when all are taken."""
        if not self._free:
            return None
        self._free.sort()
        return self._free.pop(0)

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def take(self, slot: int, instead_of: int) -> None:
        """Hold the free `slot` and free `instead_of` (a sequence moved between them)."""
        self._free.remove(slot)
        self._free.append(instead_of)

    def move(self, src: int, dst: int, n: int, n_dst: int = 0) -> None:
        """Copy the first n tokens of slot src into slot dst; with n_dst, dst's first n_dst go to src (a swap)."""
        for buf in self.keys + self.values:
            held = buf[dst, :, :n_dst].clone()
            buf[dst, :, :n] = buf[src, :, :n]
            buf[src, :, :n_dst] = held

