"""LabelConfig: everything a labeling run needs, from the command line, a YAML file, or code; its
fingerprint; and the model's.

Its fields are the declared settings (`pipelines.tasks.settings`): those that decide what is computed
enter the run's fingerprint; resource knobs decide how (actors, GPUs, token budget) and can change
between a killed run and its resumption.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
from dataclasses import field
from pathlib import Path

from bloom import resolve_dtype
from bloom.quant import check_quantize

from . import adapters, storage
from .tasks import TASKS, settings
from .tasks.settings import SettingError


class _LabelConfigMethods:
    """LabelConfig's methods; its fields come from the declarations (`pipelines.tasks.settings`)."""

    def __post_init__(self):
        if isinstance(self.input, str):
            self.input = [self.input]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError (a `SettingError`, naming the setting at fault) for a setting out of its
        declared bounds, or settings that do not go together."""
        if self.task not in TASKS:
            raise SettingError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}", "task")
        # Each setting this task reads, within its declared bounds (another task's are not its business).
        settings.check({n: v for n, v in dataclasses.asdict(self).items() if settings.SETTINGS[n].reads(self.task)})
        TASKS[self.task].check_settings(self)
        adapters.check(self)
        # "fast" and "auto" resolve when the model loads (on its device); the replica checks them then.
        check_quantize(self.quantize, resolve_dtype(self.dtype) if self.quantize and self.dtype not in ("fast", "auto")
                       else None)
        if self.num_actors is not None and self.num_actors < self.min_actors:
            raise SettingError(f"num_actors ({self.num_actors}) is below min_actors ({self.min_actors})", "num_actors")
        if settings.SETTINGS["stride"].reads(self.task) and not self.stride < self.max_input_tokens // 2:
            raise SettingError(f"stride must be in [0, max_input_tokens / 2), got {self.stride}", "stride")
        if self.prompt_template is not None and "{" not in self.prompt_template:
            raise SettingError("prompt_template must name at least one column, e.g. 'Summarize: {text}'",
                               "prompt_template")

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

    def fingerprint(self, model_fingerprint: str, adapter_fingerprints: dict[str, str] | None = None) -> str:
        """sha256 of the model's identity, the task parameters and the numerics, and of the declared
        adapters' bytes by name (`adapters.fingerprints`; none declared: left out, so that runs written
        before adapters existed still match): a resumed or appended run must match it."""
        values = {"model": model_fingerprint, "params": self.task_params(), "numerics": self.numerics()}
        if adapter_fingerprints:
            values["adapters"] = adapter_fingerprints
        blob = json.dumps(values, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def _label_config() -> type:
    """The LabelConfig dataclass: one field per declared setting, whose default is read from the
    declaration each time a config is made (so a changed declaration is followed at once)."""
    fields = [(name, s.type, field(default_factory=functools.partial(settings.default, name)))
              for name, s in settings.SETTINGS.items()]
    cls = dataclasses.make_dataclass("LabelConfig", fields, bases=(_LabelConfigMethods,))
    cls.__module__ = __name__  # pickled by name (Ray sends configs to its actors)
    cls.__doc__ = ("Everything a labeling run needs, from the command line, a YAML file, or code: one field per "
                   "setting of `pipelines.tasks.settings.SETTINGS`.")
    cls.RESOURCE_FIELDS = settings.resource_names()  # may change between a killed run and its resumption
    return cls


LabelConfig = _label_config()


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
