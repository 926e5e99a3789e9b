"""LoRA adapters as PEFT saves them, many per model, chosen per row (or per packed token) in one batch.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (what PEFT's
`save_pretrained` writes). `read_adapter` checks it against the model (every config field, every tensor's
name and shape, the base model's name) before reading a weight, and keeps per (layer, module) the pair
A (r, in) and B·scaling (out, r). Nothing is merged into the base weights: a forward adds
x Aᵀ (B·s)ᵀ to the base linear's output for the rows that use the adapter (`LoraBatch`), so rows with
different adapters, and rows with none (the base model), share one batch.

`AdapterBank` is a model's set of adapters: names declared with their source (a local directory, or
anything a `fetch` callable turns into one, e.g. an s3:// prefix that the caller downloads), loaded on
first use into an LRU bounded by a count and optionally by bytes.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .loading import safetensors_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
STACKED_SETS = 4  # adapter sets whose stacked weights an AdapterBank keeps (each a copy of its adapters')
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# The linears PEFT targets in BLOOM, with their (out, in) sizes in units of hidden_size.
TARGETS = {"query_key_value": ("self_attention", 3, 1), "dense": ("self_attention", 1, 1),
           "dense_h_to_4h": ("mlp", 4, 1), "dense_4h_to_h": ("mlp", 1, 4)}
_KEY = re.compile(r"base_model\.model\.(?:transformer\.)?h\.(\d+)\.(self_attention|mlp)\."
                  r"(query_key_value|dense|dense_h_to_4h|dense_4h_to_h)\.lora_([AB])\.weight")

# Fields of adapter_config.json that do not change what a saved LoRA computes at inference: bookkeeping,
# training-only settings (dropout), and settings only read when a field refused below is set.
_IGNORED = {"base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version", "auto_mapping",
            "lora_dropout", "megatron_core", "qalora_group_size", "fan_in_fan_out"}
# Fields read below. Any other field with a value (not null, false, 0, {} or []) is refused by name: a
# newer PEFT's feature we do not implement must not be silently ignored.
_READ = {"peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "bias", "init_lora_weights"}


class UnknownAdapter(ValueError, LookupError):
    """An adapter name that the bank does not hold or know a source for (an endpoint's 404)."""


@dataclass
class LoraAdapter:
    """One loaded adapter. weights: (layer, module name) → (A (r, in), B·scaling (out, r)) on that layer's
    device, in the model's dtype; nbytes: their memory."""

    name: str
    r: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    source: str
    nbytes: int


def read_config(directory: Path) -> dict:
    """adapter_config.json → the dict, refusing (ValueError naming the field) anything but a plain LoRA
    on BLOOM's four linears: DoRA, other adapter types, other targets, per-layer ranks, biases, saved
    modules, initialisations that rewrite the base weights."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {directory} (a PEFT adapter directory has "
                                f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e

    def refuse(field: str, why: str):
        raise ValueError(f"{path}: {field} = {cfg.get(field)!r} is not supported ({why})")

    if cfg.get("peft_type") != "LORA":
        refuse("peft_type", "only LORA adapters are")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        refuse("r", "the rank must be a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        refuse("lora_alpha", "it must be a number")
    if not isinstance(cfg.get("use_rslora", False), bool):
        refuse("use_rslora", "it must be true or false")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or not targets or not set(targets) <= set(TARGETS):
        refuse("target_modules", f"a list of BLOOM's {', '.join(TARGETS)} is")
    if cfg.get("bias", "none") != "none":
        refuse("bias", 'only "none" is: LoRA biases change the base model\'s biases')
    if cfg.get("init_lora_weights", True) not in (True, False, "gaussian"):
        refuse("init_lora_weights", "initialisations such as PiSSA, OLoRA or LoftQ rewrite the base weights")
    for field, value in cfg.items():
        if field not in _IGNORED | _READ and value not in (None, False, 0, {}, [], ""):
            refuse(field, "this LoRA variant or option is not implemented")
    return cfg


def same_base(declared: str | None, ours: str | None) -> bool:
    """Whether an adapter's base_model_name_or_path names our base: equal, or equal last path components
    (a local copy of a hub model, "/models/bloom-560m" for "bigscience/bloom-560m"). Unknown on either side
    passes: the shapes are checked anyway."""
    if not declared or not ours:
        return True
    return declared.rstrip("/") == ours.rstrip("/") or Path(declared).name == Path(ours).name


def read_adapter(directory, model, name: str, base_name: str | None = None, source: str | None = None) -> LoraAdapter:
    """Read the PEFT LoRA adapter in `directory` for `model` (a BloomModel or a BLOOM task model).

    Checks the config (`read_config`), the base model's name against `base_name` when both are known, and
    every tensor's name and shape against the model before reading any weight; errors name the field or
    tensor. The weights go to each layer's device in the model's dtype."""
    directory = Path(directory)
    cfg = read_config(directory)
    if not same_base(cfg.get("base_model_name_or_path"), base_name):
        raise ValueError(f"adapter {name!r} ({directory}) was trained on base model "
                         f"{cfg['base_model_name_or_path']!r}, this model is {base_name!r}")
    body = getattr(model, "transformer", model)
    C, n_layer, r = body.config.hidden_size, body.config.n_layer, cfg["r"]
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {directory}")
    header, found = safetensors_header(path), {}
    for key, (shape, _) in header.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise ValueError(f"{path}: tensor {key!r} is not a LoRA A or B of BLOOM's "
                             f"{', '.join(TARGETS)} (saved modules, biases and DoRA vectors are not supported)")
        layer, parent, module, ab = int(m[1]), m[2], m[3], m[4]
        where, n_out, n_in = TARGETS[module]
        if parent != where or module not in cfg["target_modules"]:
            raise ValueError(f"{path}: tensor {key!r} is not under the config's target_modules {cfg['target_modules']}")
        if layer >= n_layer:
            raise ValueError(f"{path}: tensor {key!r} is for layer {layer}; the base model has {n_layer} layers")
        expect = (r, n_in * C) if ab == "A" else (n_out * C, r)
        if tuple(shape) != expect:
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(shape)}, the base model (hidden_size {C}) "
                             f"and r = {r} need {expect}")
        found.setdefault((layer, module), {})[ab] = key
    for (layer, module), pair in found.items():
        if len(pair) != 2:
            raise ValueError(f"{path}: layer {layer} {module} has lora_{next(iter(pair))} without its pair")
    if not found:
        raise ValueError(f"{path} holds no LoRA weights")
    from safetensors.torch import load_file

    tensors = load_file(path)
    # PEFT's scaling: alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA. fan_in_fan_out is ignored
    # as PEFT ignores it for torch.nn.Linear layers (it resets it to false with a warning).
    scaling = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    weights, nbytes = {}, 0
    for (layer, module), pair in sorted(found.items()):
        ref = body.h[layer].input_layernorm.weight  # a LayerNorm is never packed or quantised: its device, dtype
        A = tensors[pair["A"]].to(ref.device, ref.dtype)
        # Scaled in fp32 before rounding to the model dtype, as PEFT's product is scaled in its own dtype.
        B = (tensors[pair["B"]].float() * scaling).to(ref.device, ref.dtype)
        weights[layer, module] = (A, B)
        nbytes += A.numel() * A.element_size() + B.numel() * B.element_size()
    return LoraAdapter(name, r, scaling, weights, source or str(directory), nbytes)


class LoraBatch:
    """Which adapter each row (or packed token) of one forward uses; passed to the model as `lora=`.

    adapters: the K adapters the forward uses; slots: (n,) LongTensor, each row's (or, when per_token,
    each packed token's: B = 1) index into `adapters`, -1 for the base model. Per linear, the adapters that
    change it are stacked, A_all (K·r, in) and B_all (out, K·r), so each row's term is 2 matmuls for the
    whole batch however many adapters it mixes: x A_allᵀ, times a 0/1 mask keeping each row's own adapter's
    r columns, times B_allᵀ. The zeros add nothing (x + 0 == x), so a row's result is its adapter's alone,
    and a base row's is the base's bit for bit; the price is K times the (small) LoRA products."""

    def __init__(self, adapters: list[LoraAdapter], slots: torch.Tensor, per_token: bool, stacks: dict | None = None):
        self.adapters, self.slots, self.per_token = adapters, slots, per_token
        self.size = len(slots)
        self.uniform = len(adapters) == 1 and bool((slots == 0).all())  # every row, the one adapter: no mask
        self.stacks = stacks if stacks is not None else stack(adapters)
        self._masks: dict = {}  # (owner key, device) → the (n, K·r) 0/1 mask, built once per forward

    def check(self, B: int, T: int) -> None:
        """Raise ValueError unless this batch fits a forward of input (B, T)."""
        n, what = (T, "tokens") if self.per_token else (B, "rows")
        if self.per_token and B != 1:
            raise ValueError(f"a per-token LoraBatch takes one packed row, got a batch of {B}")
        if n != self.size:
            raise ValueError(f"the LoraBatch names adapters for {self.size} {what}, the input has {n}")

    def touches(self, layer: int, module: str) -> bool:
        """Whether any adapter of the batch changes this linear."""
        return (layer, module) in self.stacks

    def add_(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (B, T, out) += each row's x (B, T, in) Aᵀ (B·s)ᵀ with its own adapter's A and B; returns y."""
        A, B, owners = self.stacks[layer, module]
        h = x @ A.T  # (B, T, K·r)
        mask = self._mask(owners, x.device, h.dtype)
        if mask is not None:
            h = h.view(self.size, -1, h.shape[-1]).mul_(mask).view(h.shape)
        y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), B.T)
        return y

    def _mask(self, owners: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """(n, 1, K·r) fp mask: 1 where column j belongs to the adapter of row (or token) i; None when every
        row uses the batch's one adapter."""
        if self.uniform:
            return None
        key = (owners, device)
        if key not in self._masks:
            own = torch.tensor(owners, device=device)
            self._masks[key] = (self.slots.to(device)[:, None] == own[None, :]).to(dtype)[:, None, :]
        return self._masks[key]


def stack(adapters: list[LoraAdapter]) -> dict:
    """(layer, module) → (A_all (K·r, in), B_all (out, K·r), owners: the adapter index of each of the K·r
    columns), over the adapters that change that linear, in order."""
    out = {}
    for key in sorted(set().union(*(a.weights.keys() for a in adapters))):
        parts = [(i, *a.weights[key]) for i, a in enumerate(adapters) if key in a.weights]
        A = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        B = torch.cat([p[2] for p in parts], 1) if len(parts) > 1 else parts[0][2]
        out[key] = (A, B, tuple(i for i, a, _ in parts for _row in range(a.shape[0])))
    return out


class AdapterBank:
    """A model's adapters by name: declared with a source, loaded on first use, kept in an LRU.

    model: the BLOOM model the adapters are for. max_adapters: how many stay loaded; max_bytes: optionally,
    how much memory their weights may take; the least recently used adapter not needed by the forward
    being built is dropped first (a forward that needs more adapters than the budget holds them all until
    the next `get`; a LoraBatch keeps its adapters' weights alive while it is used). The stacked weights of
    the last STACKED_SETS adapter sets are kept too (copies; a set of one adapter copies nothing).
    fetch(source) → a local directory, for sources that are not local directories (e.g.
    "s3://bucket/adapters/fr": bloom never downloads; the caller's storage layer does). base_name: the
    model's name or path, checked against each adapter's base_model_name_or_path. Thread-safe."""

    def __init__(self, model, *, max_adapters: int = 8, max_bytes: int | None = None,
                 fetch: Callable[[str], str | Path] | None = None, base_name: str | None = None):
        if not isinstance(max_adapters, int) or max_adapters < 1:
            raise ValueError(f"max_adapters must be a positive integer, got {max_adapters!r}")
        self.model, self.max_adapters, self.max_bytes = model, max_adapters, max_bytes
        self.fetch, self.base_name = fetch, base_name
        self.sources: dict[str, str] = {}
        self.loaded: OrderedDict[str, LoraAdapter] = OrderedDict()  # least recently used first
        self.loads = 0  # adapters read from their source so far (reloads after eviction included)
        self._stacks: OrderedDict[tuple, dict] = OrderedDict()  # adapter set → its `stack`
        self._lock = threading.RLock()

    def add(self, name: str, source, load: bool = False) -> None:
        """Declare adapter `name` from `source` (a directory, or what `fetch` resolves); load it now if asked.
        Re-declaring a name with another source drops the loaded copy."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ValueError(f"adapter names are letters, digits, '.', '_' and '-' (at most 128), got {name!r}")
        source = str(source)
        if not self.fetch and not Path(source).is_dir():
            raise ValueError(f"adapter {name!r}: {source!r} is not a local directory (other sources need the "
                             "bank's fetch callable)")
        with self._lock:
            if self.sources.get(name) not in (None, source):
                self.loaded.pop(name, None)
            self.sources[name] = source
        if load:
            self.get(name)

    def names(self) -> list[str]:
        """Every declared adapter name, sorted."""
        return sorted(self.sources)

    def __contains__(self, name) -> bool:
        return name in self.sources

    def check(self, name: str) -> None:
        """Raise UnknownAdapter unless `name` is declared."""
        if name not in self.sources:
            known = ", ".join(self.names()) or "none"
            raise UnknownAdapter(f"unknown adapter {name!r} (declared: {known})")

    def get(self, name: str, keep: frozenset = frozenset()) -> LoraAdapter:
        """The loaded adapter `name`, read from its source if needed; then drop least recently used adapters
        (other than `keep`'s) beyond the budget."""
        self.check(name)
        with self._lock:
            if name in self.loaded:
                self.loaded.move_to_end(name)
            else:
                source = self.sources[name]
                directory = Path(source) if Path(source).is_dir() or self.fetch is None else Path(self.fetch(source))
                self.loaded[name] = read_adapter(directory, self.model, name, self.base_name, source)
                self.loads += 1
            self._trim(keep | {name})
            return self.loaded[name]

    def nbytes(self) -> int:
        """Memory held by the loaded adapters' weights."""
        return sum(a.nbytes for a in self.loaded.values())

    def _trim(self, keep) -> None:
        over = lambda: len(self.loaded) > self.max_adapters or (  # noqa: E731
            self.max_bytes is not None and self.nbytes() > self.max_bytes)
        for name in [n for n in self.loaded if n not in keep]:
            if not over():
                return
            del self.loaded[name]

    def batch(self, names: list[str | None], per_token: bool = False) -> LoraBatch | None:
        """A LoraBatch for one forward: names[i] the adapter of row i (or packed token i when per_token),
        None for the base model. None when no row uses an adapter (the forward then runs the base alone)."""
        used = [n for n in dict.fromkeys(names) if n is not None]
        if not used:
            return None
        keep = frozenset(used)
        adapters = [self.get(n, keep) for n in used]
        slot = {n: i for i, n in enumerate(used)}
        slots = torch.tensor([-1 if n is None else slot[n] for n in names])
        with self._lock:
            # The stacked weights of a set of adapters, kept while those very adapters stay loaded: an
            # engine's decode steps mostly repeat one set.
            key = tuple(id(a) for a in adapters)
            if key not in self._stacks:
                live = {id(a) for a in self.loaded.values()}
                for k in [k for k in self._stacks if not set(k) <= live]:
                    del self._stacks[k]
                self._stacks[key] = stack(adapters)
                while len(self._stacks) > STACKED_SETS:
                    self._stacks.popitem(last=False)
            self._stacks.move_to_end(key)
            return LoraBatch(adapters, slots, per_token, self._stacks[key])
