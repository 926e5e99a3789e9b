"""What the model fingerprint costs: hashing a checkpoint's weights the first time, and again (cached).

    python benchmarks/bench_fingerprint.py [--gib 2]

Writes a file of random bytes of that size in a temporary directory beside --dir, then times
`file_sha256` on it three ways: read from disk (its pages dropped from the page cache first), read
from the page cache, and the cached hash (a stat and a small JSON read). Prints MB/s and the
projection for a 350 GB checkpoint (bloom-176b in bf16), naming the machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import describe, machine

from pipelines.config import file_sha256


def drop_from_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=2.0, help="size of the test file (default 2 GiB)")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where to write it (the disk to measure)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        os.environ["XDG_CACHE_HOME"] = str(Path(tmp) / "cache")
        path = Path(tmp) / "model.safetensors"
        size = int(args.gib * 2**30)
        with open(path, "wb") as f:
            block = os.urandom(64 << 20)
            for offset in range(0, size, len(block)):
                f.write(block[: size - offset])
            f.flush()
            os.fsync(f.fileno())
        mb = size / 1e6

        def first_hash():  # no cache entry
            (Path(tmp) / "cache" / "bloomline" / "file-sha256.json").unlink(missing_ok=True)
            file_sha256(path)

        drop_from_page_cache(path)
        disk = timed(first_hash)
        cached_pages = min(timed(first_hash) for _ in range(3))
        cached_hash = min(timed(lambda: file_sha256(path)) for _ in range(20))
    print(f"machine: {describe(machine())}")
    print(f"file: {mb:.0f} MB in {args.dir}")
    print(f"first run, read from disk:        {mb / disk:8.0f} MB/s ({disk:.2f} s)")
    print(f"first run, from the page cache:   {mb / cached_pages:8.0f} MB/s ({cached_pages:.2f} s)")
    print(f"later runs (cached hash):         {cached_hash * 1e3:8.2f} ms per file")
    for label, secs in (("disk", disk), ("page cache", cached_pages)):
        print(f"350 GB checkpoint, first run at the {label} rate: {350e3 / (mb / secs) / 60:.1f} min")


if __name__ == "__main__":
    main()
