"""LabelConfig: everything a labeling run needs, from the command line, a YAML file, or code.

Task parameters decide what is computed (they enter the run's fingerprint); resource knobs decide how
(actors, GPUs, token budget) and can change between a killed run and its resumption.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from bloom import resolve_dtype
from bloom.quant import check_quantize

from . import storage
from .tasks import TASKS


@dataclass
class LabelConfig:
    # --- what to label ---
    task: str = "generate"
    model: str = ""  # checkpoint directory (or hub id, fetched once when huggingface_hub is installed)
    input: list[str] = field(default_factory=list)  # Parquet files, directories, globs; local, s3://, gs://
    output: str = ""  # output directory (Parquet parts + run report)
    text_column: str = "text"
    id_column: str = "id"
    keep_columns: list[str] = field(default_factory=list)  # passed through besides the id column
    prompt_template: str | None = None  # e.g. "Summarize: {text}"; generate and zero-shot classify
    question_column: str = "question"  # qa
    context_column: str = "context"  # qa
    # --- generate ---
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    frequency_penalty: float = 0.0  # OpenAI's: count · penalty off each generated token's logit, in [-2, 2]
    presence_penalty: float = 0.0  # OpenAI's: penalty off each token generated at least once, in [-2, 2]
    min_tokens: int = 0  # no eos or stop string ends a row before this many new tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias in [-100, 100] added to its logit
    # --- classify ---
    candidate_labels: list[str] = field(default_factory=list)  # non-empty: zero-shot with a causal LM
    label_prefix: str = " "  # put between the prompt and each candidate label
    threshold: float = 0.5  # multi-label: labels whose probability reaches it
    # --- ner ---
    aggregation_strategy: str = "simple"
    ignore_labels: list[str] = field(default_factory=lambda: ["O"])
    stride: int = 32  # tokens shared by consecutive windows of a long text (ner, qa)
    # --- qa ---
    max_answer_len: int = 30
    # --- limits and errors ---
    max_input_tokens: int = 1024  # per row (per window for ner/qa)
    too_long: str = "error"  # or "truncate" (a template is kept whole, the text gives up its end; flags the row)
    max_text_chars: int = 200_000  # longer texts are errors before tokenizing
    max_errored_rows: int | None = None
    max_errored_fraction: float | None = 0.1
    overwrite: bool = False
    # --- resources (not part of the fingerprint) ---
    dtype: str = "fast"  # bfloat16 where the device computes it fast (recent GPUs, AMX/AVX512-BF16 CPUs), else float32
    # "int8": weight-only int8 transformer and LM-head weights (bloom.quant), half the bytes of bf16; needs
    # dtype bfloat16. Faster for decoding one or two rows on CPU, slower for prefill and larger batches.
    quantize: str | None = None
    device_map: str | None = None  # e.g. "auto" to spread a replica over an actor's GPUs
    num_actors: int | None = None  # pool max size; None: as many as the cluster fits
    min_actors: int = 1
    num_gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    num_cpus_per_actor: float | None = None  # None: 1 with GPUs; CPU-only: the cluster's CPUs minus one, split
    batch_token_budget: int = 8192  # padded tokens per forward
    # generate runs on a continuous-batching engine (bloom.engine): its KV cache, allocated once, holds
    # cache_tokens tokens in slots of max_input_tokens + max_new_tokens each (None: 16 slots, or fewer
    # where they would take over half the memory left after loading the model); new prompts are
    # prefilled prefill_chunk tokens per step.
    cache_tokens: int | None = None
    prefill_chunk: int = 256
    rows_per_batch: int = 256  # rows handed to an actor at a time

    RESOURCE_FIELDS = frozenset({
        "input", "output", "overwrite", "dtype", "quantize", "device_map", "num_actors", "min_actors",
        "num_gpus_per_actor", "num_cpus_per_actor", "batch_token_budget", "rows_per_batch",
        "cache_tokens", "prefill_chunk",
        "max_errored_rows", "max_errored_fraction",
    })

    def __post_init__(self):
        if isinstance(self.input, str):
            self.input = [self.input]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field at fault."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        TASKS[self.task].check_settings(self)  # the task's parameters, within the bounds a request has
        # "fast" and "auto" resolve when the model loads (on its device); the replica checks them then.
        check_quantize(self.quantize, resolve_dtype(self.dtype) if self.quantize and self.dtype not in ("fast", "auto")
                       else None)
        if self.too_long not in ("error", "truncate"):
            raise ValueError(f"too_long must be 'error' or 'truncate', got {self.too_long!r}")
        for name in ("max_input_tokens", "batch_token_budget", "rows_per_batch", "prefill_chunk", "min_actors",
                     "max_text_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.task == "generate":
            check_cache_tokens(self.cache_tokens, self.max_input_tokens + self.max_new_tokens)
            if self.min_tokens > self.max_new_tokens:
                raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})")
        if self.num_actors is not None and self.num_actors < self.min_actors:
            raise ValueError(f"num_actors ({self.num_actors}) is below min_actors ({self.min_actors})")
        if "stride" in TASKS[self.task].settings and not 0 <= self.stride < self.max_input_tokens // 2:
            raise ValueError(f"stride must be in [0, max_input_tokens / 2), got {self.stride}")
        if self.max_errored_fraction is not None and not 0 <= self.max_errored_fraction <= 1:
            raise ValueError(f"max_errored_fraction must be in [0, 1], got {self.max_errored_fraction}")
        if self.prompt_template is not None and "{" not in self.prompt_template:
            raise ValueError("prompt_template must name at least one column, e.g. 'Summarize: {text}'")
        if self.task == "classify" and len(self.candidate_labels) == 1:
            raise ValueError("zero-shot classification needs at least two candidate_labels")

    @classmethod
    def from_dict(cls, values: dict) -> "LabelConfig":
        return cls(**known_settings(cls, values))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "LabelConfig":
        """Settings from a YAML mapping; keyword overrides (e.g. command-line flags) win."""
        return cls(**yaml_settings(cls, path, overrides))

    def task_params(self) -> dict:
        """The settings that decide the output's content: the task's own parameters and the columns and
        limits it reads with (never another task's parameters, paths or resources)."""
        return TASKS[self.task].content_settings(self)

    def numerics(self) -> dict:
        """The settings that change the model's numbers, and so its output: dtype (as given: "fast" and
        "auto" resolve per machine) and quantize. Not parameters of the task, but a resume must keep them,
        or the output would hold rows of two precisions."""
        return {"dtype": self.dtype, "quantize": self.quantize}

    def fingerprint(self, model_fingerprint: str) -> str:
        """sha256 of the model's identity, the task parameters and the numerics: a resumed or appended run
        must match it."""
        blob = json.dumps({"model": model_fingerprint, "params": self.task_params(), "numerics": self.numerics()},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def check_cache_tokens(cache_tokens: int | None, slot: int) -> None:
    """ValueError when a given generation cache cannot hold one sequence of `slot` tokens (the longest
    prompt, max_input_tokens, plus the most new tokens); None (unset) is sized by the replica from memory."""
    if cache_tokens is not None and cache_tokens < slot:
        raise ValueError(f"cache_tokens {cache_tokens} cannot hold one sequence: a cache slot takes max_input_tokens "
                         f"+ max_new_tokens = {slot} tokens; give at least {slot} (several slots run rows together)")


def known_settings(cls, values: dict) -> dict:
    """`values` if each names a field of the dataclass `cls`, else a ValueError listing the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown setting(s): {', '.join(unknown)}; valid ones: {', '.join(sorted(names))}")
    return values


def yaml_settings(cls, path: str | Path, overrides: dict) -> dict:
    """The settings of a YAML mapping for the dataclass `cls` (dashes in keys read as underscores),
    with `overrides` winning; ValueError for an unreadable file or an unknown setting."""
    import yaml

    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read config file {path}: {e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
    return known_settings(cls, {**{k.replace("-", "_"): v for k, v in values.items()}, **overrides})


def model_fingerprint(directory: str | Path) -> str:
    """sha256 over a checkpoint's config, tokenizer and every weight byte: any retrained, re-exported or
    overwritten weight file changes it. The weights' hashes are cached (see `file_sha256`), so only the
    first run over a checkpoint pays a full read."""
    directory = Path(directory)
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"):
        path = directory / name
        if path.exists():
            h.update(name.encode() + path.read_bytes())
    for path in sorted(directory.glob("*.safetensors")):
        h.update(f"{path.name}\0{file_sha256(path)}\0".encode())
    return h.hexdigest()


def digest_cache_path() -> Path:
    """Where file hashes are cached: $XDG_CACHE_HOME/bloomline (default ~/.cache/bloomline)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "bloomline" / "file-sha256.json"


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes.

    A file in a Hugging Face hub cache is a link to a blob named by its sha256: that name is used as
    is. Otherwise the hash is read from a small per-user cache keyed by (real path, size, mtime_ns,
    ctime_ns, inode), else computed by streaming the file and cached. ctime is in the key because
    `cp -p` or `touch -r` can restore an mtime, but no user call can restore a ctime."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and _HEX64.fullmatch(real.name):
        return real.name
    stat = real.stat()
    key = f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}"
    cache_file = digest_cache_path()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(str(real))
    if isinstance(entry, dict) and entry.get("key") == key:
        return entry["sha256"]
    h, buffer = hashlib.sha256(), bytearray(8 << 20)
    view = memoryview(buffer)
    with open(real, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    digest = h.hexdigest()
    after = real.stat()
    if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns):
        return digest  # written to while we read it: right for these bytes, not worth caching
    cache.pop(str(real), None)
    cache[str(real)] = {"key": key, "sha256": digest}
    cache = dict(list(cache.items())[-_CACHE_ENTRIES:])  # the most recently hashed files
    try:  # replaced whole: concurrent runs may lose each other's entry (a rehash), never corrupt the file
        storage.put(str(cache_file), json.dumps(cache))
    except OSError as e:
        logging.getLogger("bloomline").warning("cannot cache file hashes in %s (%s): weights are hashed every run",
                                               cache_file, e)
    return digest


_HEX64 = re.compile(r"[0-9a-f]{64}")
_CACHE_ENTRIES = 1000
