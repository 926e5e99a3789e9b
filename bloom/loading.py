"""Loading and saving checkpoints in the Hugging Face layout (config.json + safetensors).

`load_pretrained` checks everything it can from the file headers before reading a single weight
(names, shapes, files), builds the model on the meta device and fills it tensor by tensor straight
onto each tensor's device, so a replica never holds two copies of its weights. Device maps
("auto", "balanced", "sequential" or a dict, with max_memory) are computed and applied by accelerate,
with a BloomBlock as the unit that is never split.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from .config import BloomConfig, write_atomic
from .packing import InferenceLinear

logger = logging.getLogger("bloom")

PREFIX = "transformer."  # task models nest BloomModel under this name; official BLOOM weights lack it
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "*.pt", "*.pth", "*.ckpt")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(dtype, config: BloomConfig | None = None, device=None) -> torch.dtype:
    """None → float32; "auto" → the checkpoint's torch_dtype (float32 if unrecorded); "fast" → bfloat16
    where `device` computes it faster than float32 (`fast_bf16`), else float32; names or torch dtypes."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return resolve_dtype(config.torch_dtype if config and config.torch_dtype else None)
    if dtype == "fast":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16, 'auto' or 'fast'")
    return _DTYPES[name]


def fast_bf16(device=None) -> bool:
    """Whether `device` multiplies in bf16 faster than in fp32: CUDA GPUs with bf16 (Ampere and later),
    and x86 CPUs with AMX or AVX-512 BF16 instructions (BLOOM was trained in bf16, so its weights lose
    nothing to it)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell cheaply, so no bf16 by default
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


# ----------------------------------------------------------------------------- reading the checkpoint


def checkpoint_tensors(directory: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Each tensor of the checkpoint → (its safetensors file, its shape), from the file headers (each read
    once, checked complete); refuses pickled checkpoints."""
    if (directory / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{directory / INDEX_FILE} is not a valid safetensors index: {e}") from e
        paths = sorted({directory / fname for fname in weight_map.values()})
    elif (directory / SINGLE_FILE).is_file():
        weight_map, paths = None, [directory / SINGLE_FILE]
    else:
        pickled = sorted(p.name for pattern in PICKLED for p in directory.glob(pattern))
        if pickled:
            raise ValueError(
                f"{directory} holds only pickled weights ({', '.join(pickled)}); bloom loads safetensors only, "
                "because unpickling can execute arbitrary code. Convert them once, in a trusted environment, "
                "to model.safetensors."
            )
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
    tensors = {}
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{INDEX_FILE} in {directory} lists {path.name}, which is missing")
        for name, (shape, _) in safetensors_header(path).items():
            if weight_map is None or weight_map.get(name) == path.name:
                tensors[name] = (path, shape)
    return tensors


def safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name → (shape, dtype) from a safetensors header, validating that the file is complete."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length exceeds the file")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid safetensors file ({e}); it may be truncated") from e
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated: its header needs {8 + n + end} bytes, the file has {size}")
    return {name: (tuple(info["shape"]), info["dtype"]) for name, info in header.items()}


def missing_heads(cls, directory: str | os.PathLike) -> list[str]:
    """The heads of model class `cls` (its `_head_names`, e.g. ["score"]) that the checkpoint in `directory`
    has no weights for, read from the file headers alone. BLOOM's LM head is tied to the embedding, so a
    causal LM needs none of its own."""
    directory = Path(directory)
    present = {name.removeprefix(PREFIX).split(".")[0] for name in checkpoint_tensors(directory)}
    tied = BloomConfig.from_pretrained(directory).tie_word_embeddings
    return [h for h in cls._head_names if h not in present and not (h == "lm_head" and tied)]


def _head_names() -> set[str]:
    """Every task head's module name, from the model classes (each declares its own in `_head_names`)."""
    from .model import BloomPreTrainedModel

    heads, todo = set(), [BloomPreTrainedModel]
    while todo:
        cls = todo.pop()
        heads.update(cls._head_names)
        todo += cls.__subclasses__()
    return heads


def _model_key(name: str, model: nn.Module) -> str:
    """Checkpoint tensor name → parameter name in `model`, with or without the `transformer.` prefix."""
    nested = hasattr(model, "transformer")
    if nested and not name.startswith(PREFIX) and not name.split(".")[0] in model._head_names:
        return PREFIX + name
    if not nested and name.startswith(PREFIX):
        return name[len(PREFIX):]
    return name


# ----------------------------------------------------------------------------- device maps


def _resolve_device_map(model, device_map, max_memory, dtype, device) -> dict[str, str | int]:
    """Return {module name: device} ("" = the whole model)."""
    if device_map is None:
        return {"": str(torch.device(device or "cpu"))}
    if isinstance(device_map, (str, torch.device)) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        return {"": str(torch.device(device_map))}
    if isinstance(device_map, dict):
        names = dict(model.named_modules())
        for name in device_map:
            if name and name not in names:
                raise ValueError(f"device_map names {name!r}, which is not a module of {type(model).__name__}")
        return dict(device_map)
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = model._no_split_modules
    if device_map != "sequential":
        max_memory = get_balanced_memory(model, max_memory, no_split_module_classes=no_split, dtype=dtype,
                                         low_zero=device_map == "balanced_low_0")
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)


def _device_of(key: str, device_map: dict) -> str | int:
    best = None
    for prefix in device_map:
        if (prefix == "" or key == prefix or key.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
            best = prefix
    if best is None:
        raise ValueError(f"device_map does not place {key}")
    return device_map[best]


# ----------------------------------------------------------------------------- load


def load_pretrained(cls, directory, *, dtype=None, device_map=None, max_memory=None, device=None,
                    offload_folder=None, config: BloomConfig | None = None, **config_overrides):
    """Build `cls` from a checkpoint directory (config.json + model.safetensors or a sharded set).

    dtype: torch dtype, name, "auto" (the checkpoint's) or "fast" (bf16 where the device has fast bf16,
    else float32); default float32.
    device / device_map: one device, or "auto" / "balanced" / "balanced_low_0" / "sequential" / a dict
    {module name: device}; devices may include "cpu" and "disk" (needs offload_folder).
    config_overrides update config.json's values (e.g. num_labels, id2label, problem_type).
    Raises FileNotFoundError / ValueError naming the file or tensor at fault, before loading any weight.
    """
    from accelerate.utils import offload_weight, save_offload_index
    from safetensors import safe_open

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"checkpoint directory {str(directory)!r} does not exist (bloom loads local directories; "
            "fetch hub models first, e.g. with huggingface_hub.snapshot_download)"
        )
    config = config or BloomConfig.from_pretrained(directory, **config_overrides)
    target = device if device is not None else ("cuda" if device_map and torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(dtype, config, target)
    tensors = checkpoint_tensors(directory)
    files = {name: path for name, (path, _) in tensors.items()}
    shapes = {name: shape for name, (_, shape) in tensors.items()}

    with torch.device("meta"):
        model = cls(config)
    expected = {k: tuple(p.shape) for k, p in model.named_parameters()}  # tied lm_head appears once
    found, unexpected, mismatched = {}, [], []
    for name, shape in shapes.items():
        key = _model_key(name, model)
        if key not in expected:
            unexpected.append(name)
        elif shape != expected[key]:
            mismatched.append(f"{name}: checkpoint {list(shape)}, model {list(expected[key])}")
        else:
            found[key] = name
    # A bare BloomModel may be loaded from a task checkpoint: its head weights are simply not used.
    unused_heads = [n for n in unexpected if n.split(".")[0] in _head_names() and not hasattr(model, n.split(".")[0])]
    unexpected = [n for n in unexpected if n not in unused_heads]
    missing = [k for k in expected if k not in found]
    missing_heads = [k for k in missing if k.split(".")[0] in cls._head_names]
    missing = [k for k in missing if k not in missing_heads]
    problems = [f"shape mismatch for {m}" for m in mismatched]
    problems += [f"missing tensor {k}" for k in missing] + [f"unexpected tensor {n}" for n in unexpected]
    if problems:
        raise ValueError(f"checkpoint {directory} does not fit {cls.__name__}: " + "; ".join(problems))
    if unused_heads:
        logger.info("%s ignores the head weights %s of %s", cls.__name__, unused_heads, directory)

    device_map = _resolve_device_map(model, device_map, max_memory, dtype, device)
    on_disk = "disk" in device_map.values()
    if on_disk and offload_folder is None:
        raise ValueError("device_map places modules on 'disk': pass offload_folder= (a directory for their weights)")
    if on_disk:
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
    offload_index = {}
    handles = {}
    try:
        for key, name in found.items():
            path = files[name]
            if path not in handles:
                handles[path] = safe_open(path, framework="pt", device="cpu")
            tensor = handles[path].get_tensor(name).to(dtype)
            target = _device_of(key, device_map)
            if target == "disk":
                offload_weight(tensor, key, offload_folder, index=offload_index)
            else:
                _set_tensor(model, key, tensor.to(_torch_device(target)))
    finally:
        handles.clear()
    if missing_heads:
        logger.warning("%s: no weights for %s in %s; they are newly initialised and must be trained",
                       cls.__name__, ", ".join(missing_heads), directory)
        for key in missing_heads:
            target = _device_of(key, device_map)
            tensor = torch.empty(expected[key], dtype=dtype, device=_torch_device("cpu" if target == "disk" else target))
            _set_tensor(model, key, tensor)
            model._init_weights(model.get_submodule(key.rsplit(".", 1)[0]))
    model.tie_weights()
    model.eval()
    if len(set(map(str, device_map.values()))) > 1 or on_disk:
        from accelerate import dispatch_model

        if on_disk:
            save_offload_index(offload_index, offload_folder)
        dispatch_model(model, device_map=device_map, offload_dir=offload_folder if on_disk else None)
    model.hf_device_map = device_map
    return model


def _torch_device(target) -> torch.device:
    return torch.device(f"cuda:{target}" if isinstance(target, int) else target)


def _set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())


# ----------------------------------------------------------------------------- save


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size must be bytes or like '5GB' / '500MB', got {size!r}")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** {"K": 1, "M": 2, "G": 3}[unit[0]])


def save_pretrained(model, directory, max_shard_size: int | str = "5GB") -> None:
    """Write config.json and the weights as safetensors in the HF layout: one model.safetensors, or
    model-0000i-of-0000n.safetensors shards with model.safetensors.index.json past max_shard_size.
    Task models' body weights carry the `transformer.` prefix, as transformers writes them; a tied
    lm_head is not written. Files are written under temporary names and renamed into place."""
    from safetensors.torch import save_file

    if any(isinstance(m, InferenceLinear) for m in model.modules()):
        raise ValueError("cannot save a model packed for CPU inference or quantized (pack_for_cpu() and "
                         "quantize_int8() drop the plain weights); save it before, or load the checkpoint again")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    tensors = {k: p.detach().to("cpu").contiguous() for k, p in model.named_parameters()}
    if any(t.is_meta for t in tensors.values()):
        raise ValueError("cannot save a model with weights on the meta device (offloaded to disk)")
    shards, current, current_size = [], {}, 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and current_size + nbytes > limit:
            shards.append(current)
            current, current_size = {}, 0
        current[key] = t
        current_size += nbytes
    shards.append(current)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]
    for stale in list(directory.glob("model*.safetensors")) + [directory / INDEX_FILE]:
        if stale.name not in names and stale.exists():
            stale.unlink()
    for name, shard in zip(names, shards):
        tmp = directory / f".{name}.tmp"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, directory / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}}
        write_atomic(directory / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    config = model.config
    config.architectures = [type(model).__name__]
    config.torch_dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    config.save_pretrained(directory)
