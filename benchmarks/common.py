"""What the benchmarks share: the machine their figures come from, and writing their results.

Figures on these machines differ by CPU family (AMX vs AVX512-BF16 bf16 speed), so every result names
the CPU model, its bf16 features and the core count."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512f", "sha_ni")


def machine() -> dict:
    """CPU model, the flags that decide bf16 (and hashing) speed, cores, torch and threads, from lscpu."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    info = {"cpu": fields.get("Model name", platform.processor() or "?").strip(), "cores": os.cpu_count(),
            "flags": [f for f in FLAGS if f in flags], "platform": platform.platform()}
    try:
        import torch

        info.update(torch=torch.__version__, threads=torch.get_num_threads())
    except ImportError:
        pass
    return info


def describe(info: dict) -> str:
    """machine() in one line, for printing beside the figures."""
    return f"{info['cpu']}, {info['cores']} CPUs, flags: {' '.join(info['flags']) or 'none'}"


def write_results(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {out}")
