"""LoRA adapters of a labeling run or an endpoint: their declaration (NAME=PATH), their bytes' digest (for
the run's fingerprint), fetching from an object store into a local cache, and the replica's AdapterBank.

An adapter is a PEFT directory (`adapter_config.json` + `adapter_model.safetensors`) on a local disk or
under an s3:// (any `storage`) prefix. bloom never downloads: the bank's `fetch` is `fetch` here, which
copies the two files into a cache directory named by their digest, so a changed adapter is never read
from a stale copy.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from bloom.lora import CONFIG_FILE, NAME, WEIGHTS_FILE, AdapterBank, UnknownAdapter, read_config, same_base

from . import storage
from .tasks.settings import SettingError

FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what bloom.lora reads of an adapter directory

__all__ = ["AdapterBank", "UnknownAdapter", "absolute", "available", "bank", "check", "declared", "digest", "fetch",
           "fingerprints", "known", "row_adapter"]


def declared(entries: list[str]) -> dict[str, str]:
    """["NAME=PATH", ...] (the --adapter flags) → {name: path}; SettingError naming a malformed entry or a
    repeated name."""
    out: dict[str, str] = {}
    for entry in entries:
        name, sep, path = str(entry).partition("=")
        if not sep or not path or not NAME.fullmatch(name):
            raise SettingError(f"adapters: {entry!r} is not NAME=PATH (a name of letters, digits, '.', '_', '-', "
                               "then a PEFT adapter directory, local or s3://)", "adapters")
        if name in out:
            raise SettingError(f"adapters: {name!r} is declared twice", "adapters")
        out[name] = path
    return out


def absolute(entries: list[str], base: str | Path | None = None) -> list[str]:
    """The NAME=PATH entries with each relative local path made absolute under `base` (default: the working
    directory), since replicas run in other processes and working directories."""
    out = []
    for name, path in declared(entries).items():
        if "://" not in path and not Path(path).expanduser().is_absolute():
            path = str((Path(base or Path.cwd()) / Path(path).expanduser()).resolve())
        out.append(f"{name}={path}")
    return out


def check(c) -> None:
    """SettingError unless the config's adapter settings go together: entries well formed, the default
    adapter (c.adapter) among them (or left to the replica to find in c.adapter_dir), and adapters declared
    when one is asked for."""
    names = declared(c.adapters)
    if c.adapter is not None and c.adapter not in names and not c.adapter_dir:
        raise SettingError(f"adapter {c.adapter!r} is not declared (declared: {', '.join(names) or 'none'}; "
                           "declare it with --adapter NAME=PATH)", "adapter")
    if c.adapter_column and not names and not c.adapter_dir:
        raise SettingError("adapter_column names each row's adapter, but no adapter is declared (--adapter NAME=PATH)",
                           "adapter_column")


def _cache_root(cache: str | None) -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) if cache else Path(root) / "bloomline" / "adapters"


def _read(source: str) -> dict[str, bytes]:
    """The adapter's files' bytes; FileNotFoundError naming a missing one."""
    return {name: storage.read_bytes(storage.join(source, name)) for name in FILES}


def digest(files: dict[str, bytes]) -> str:
    """sha256 over the adapter's file names and bytes."""
    h = hashlib.sha256()
    for name in FILES:
        h.update(f"{name}\0{len(files[name])}\0".encode() + files[name])
    return h.hexdigest()


def fingerprints(c) -> dict[str, str]:
    """{name: digest of its bytes} of every adapter the config declares (read in full: adapters are small
    next to the model), each checked on the way as far as it can be without the model: its config
    (`bloom.lora.read_config` refuses what is not a plain LoRA, naming the field) and its base model's name
    against c.model. FileNotFoundError / ValueError naming the adapter."""
    out = {}
    for name, source in declared(c.adapters).items():
        try:
            directory = fetch(source, c.adapter_cache or None)
            base = read_config(directory).get("base_model_name_or_path")
            if not same_base(base, c.model):
                raise ValueError(f"it was trained on base model {base!r}, this run's model is {c.model!r}")
            out[name] = digest({n: (directory / n).read_bytes() for n in FILES})
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"adapter {name!r} ({source}): {e}") from None
    return out


def fetch(source: str, cache: str | None = None) -> Path:
    """A local directory holding the adapter at `source`: a local directory as it is, else its files
    copied into <cache>/<digest>/ (default cache: $XDG_CACHE_HOME/bloomline/adapters)."""
    if storage.is_local(source) and Path(source).is_dir():
        return Path(source)
    files = _read(source)
    directory = _cache_root(cache) / digest(files)
    for name, data in files.items():
        if not (directory / name).is_file():
            storage.put(str(directory / name), data)
    return directory


def bank(c, model) -> AdapterBank | None:
    """The AdapterBank of a replica's model with every adapter the config declares (loaded on first use),
    or None when it declares none and has no adapter_dir."""
    sources = declared(c.adapters)
    if not sources and not c.adapter_dir:
        return None
    out = AdapterBank(model, max_adapters=c.max_adapters, fetch=lambda s: fetch(s, c.adapter_cache or None),
                      base_name=c.model)
    for name, source in sources.items():
        out.add(name, source)
    return out


def known(adapters: AdapterBank | None, name: str, c) -> None:
    """UnknownAdapter unless `name` is in the bank, declaring it first when c.adapter_dir has a subdirectory
    of that name holding an adapter (the endpoint's adapters loaded on first use)."""
    if adapters is not None and name not in adapters and c.adapter_dir and NAME.fullmatch(name):
        source = storage.join(c.adapter_dir, name)
        if storage.kind(storage.join(source, CONFIG_FILE)) == "file":
            adapters.add(name, source)
    if adapters is None:
        raise UnknownAdapter(f"unknown adapter {name!r} (this model serves none)")
    adapters.check(name)


def available(adapters: AdapterBank | None, c) -> list[str]:
    """Every adapter name a request may use: the declared ones and the subdirectories of c.adapter_dir
    that hold an adapter, sorted."""
    names = set(adapters.names()) if adapters is not None else set()
    if c.adapter_dir:
        names |= {e.name for e in storage.list_entries(c.adapter_dir, stat=False) if e.is_dir and NAME.fullmatch(e.name)
                  and storage.kind(storage.join(c.adapter_dir, e.name, CONFIG_FILE)) == "file"}
    return sorted(names)


def row_adapter(row: dict, c) -> str | None:
    """The adapter a row uses: its adapter_column's value when set and not empty, else c.adapter (None:
    the base model). ValueError when the column holds something other than a name."""
    if c.adapter_column:
        value = row.get(c.adapter_column)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{c.adapter_column} is not a string (got {type(value).__name__})")
        if value and value.strip():
            return value.strip()
    return c.adapter
