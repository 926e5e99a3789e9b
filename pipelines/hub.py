"""Where a model comes from: a local checkpoint directory, or a Hugging Face hub id fetched once into
the local cache. Apart from the job modules: where a model comes from is not part of labeling."""

from __future__ import annotations

from pathlib import Path


def resolve_model(name: str) -> str:
    """A local checkpoint directory, or a Hugging Face hub id ("org/name") fetched once into the local cache.

    The local path is checked first. A missing name that reads as a path (it starts with "/", "." or
    "~", has no slash or more than one, or its first part exists here) is never sent to the hub, and
    the error names the first part of the path that is missing."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise FileNotFoundError(f"model {name!r} is a file: give the checkpoint's directory (config.json, "
                                "*.safetensors, tokenizer.json)")
    missing = next(p for p in [*reversed(path.parents), path] if not p.exists())
    where = f"{missing.absolute()} does not exist"
    if not path.is_absolute():
        # Under `ray job submit --working-dir .` the job runs in an uploaded copy of that directory,
        # without its gitignored files (demo/, checkpoints): a relative path there is often missing.
        where += (f" (a relative path is taken from the working directory, {Path.cwd()}; give checkpoints "
                  "as absolute paths that every node sees)")
    if name.startswith(("/", ".", "~")) or name.count("/") != 1 or Path(name.split("/")[0]).exists():
        raise FileNotFoundError(f"model directory {name!r} not found: {where}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"model {name!r} is not a local directory ({where}), and huggingface_hub is not "
                                "installed to fetch it from the hub (pip install huggingface_hub)") from None
    try:
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])
    except Exception as e:  # network errors, unknown repos, auth: all mean "cannot fetch"
        raise FileNotFoundError(f"model {name!r} is not a local directory ({where}) and could not be fetched "
                                f"from the hub as a model id: {type(e).__name__}: {e}") from None
