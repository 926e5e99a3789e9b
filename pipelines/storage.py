"""One storage layer for every file the pipelines read or write: local paths and object stores.

A location is a string: a local path, or a URI such as

    s3://bucket/prefix?endpoint_override=host:port&scheme=http&region=us-east-1
    gs://bucket/prefix

whose query carries the client's options (pyarrow's names); every URI this module hands back for a
file under a location carries the same query, so it can be passed straight back in. The client for a
bucket is resolved here and nowhere else.

Stores differ in one way that matters to a writer: a local file system renames, an object store does
not but makes an object visible only when its upload completes. `put` uses each: a temporary file
renamed into place locally, one upload of the complete bytes on an object store. Either way a reader
never sees half a file, and a writer that fails leaves no file behind.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import io
import json
import os
import posixpath
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, Callable, Iterator, NamedTuple
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

IO_THREADS = 32  # concurrent deletes: an object store answers each after a round trip
OBJECT_SCHEMES = ("s3", "gs", "gcs")


# ------------------------------------------------------------------------------------------ names

@functools.lru_cache(maxsize=64)
def _store(scheme: str, bucket: str, query: str, credentials: tuple) -> pafs.FileSystem:
    # One client per bucket, options and credentials: building an S3 client per file costs more than
    # reading a footer.
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}/" + (f"?{query}" if query else ""))[0]


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a location and the path within it: local paths, s3://, gs:// (and
    whatever else pyarrow resolves, e.g. hdfs://), options in the URI's query."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), posixpath.abspath(uri)
    parts = urlsplit(uri)
    if parts.scheme in OBJECT_SCHEMES:
        credentials = tuple(os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS"))
        return _store(parts.scheme, parts.netloc, parts.query, credentials), f"{parts.netloc}{parts.path}".rstrip("/")
    return pafs.FileSystem.from_uri(uri)


def is_local(uri: str) -> bool:
    """Whether a location is on this machine's file system (where files can be renamed)."""
    return "://" not in uri or uri.startswith("file://")


def clean_uri(uri: str) -> str:
    """The URI without its query (endpoint and client options): what names a file to a reader."""
    return uri.split("?", 1)[0]


def join(uri: str, *names: str) -> str:
    """The location of `names` under `uri`, keeping the URI's query: join("s3://b/out?x=1", "a") is
    "s3://b/out/a?x=1"."""
    base, sep, query = uri.partition("?")
    return posixpath.join(base, *names) + sep + query


def relative(uri: str, root: str) -> str:
    """The path of `uri` under `root` ("a/b.parquet"), queries left out."""
    return posixpath.relpath(clean_uri(filesystem(uri)[1]), clean_uri(filesystem(root)[1]))


def _to_uri(fs: pafs.FileSystem, path: str, query: str) -> str:
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    return f"{fs.type_name}://{path}" + (f"?{query}" if query else "")


def _query(uri: str) -> str:
    return urlsplit(uri).query if "://" in uri else ""


def store_error(what: str, e: Exception) -> Exception:
    """One clear line for what an object store answers to bad credentials (ValueError) or a missing
    bucket or key (FileNotFoundError); `what` names the location, e.g. "output s3://b/out"."""
    text = str(e)
    if any(s in text for s in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "AccessDenied",
                               "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")):
        return ValueError(f"{what}: the object store refused access (check credentials and endpoint): "
                          f"{text.splitlines()[0]}")
    return FileNotFoundError(f"{what}: {text.splitlines()[0]}")


def check_bucket(uri: str, what: str) -> None:
    """For an object-store location: its bucket exists and answers with these credentials (a local path
    passes). Raises `store_error`'s errors, naming `what` (e.g. "output")."""
    if is_local(uri):
        return
    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise store_error(f"{what} {clean_uri(uri)}", e) from None
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{what} {clean_uri(uri)}: bucket {bucket!r} does not exist")


# ---------------------------------------------------------------------------------------- listing

class Entry(NamedTuple):  # a tuple: listings of 100,000s of parts build one per file
    """A file or directory found by `list_entries`: its URI (query kept), base name, size in bytes and
    modification time in ns (None where not asked for or not known), and whether it is a directory."""

    uri: str
    name: str
    size: int | None
    mtime_ns: int | None
    is_dir: bool


def list_entries(uri: str, recursive: bool = False, stat: bool = True) -> Iterator[Entry]:
    """The files and directories under a location (nothing if it does not exist), in no set order.

    A local directory listed without `recursive` is streamed (no list of every entry held at once),
    and without `stat` its entries' size and mtime are left None (a stat per entry saved). Object
    stores answer with the whole listing, sizes included."""
    fs, root = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem) and not recursive:
        try:
            scan = os.scandir(root)
        except (FileNotFoundError, NotADirectoryError):
            return
        with scan as entries:
            for e in entries:
                is_dir = e.is_dir()
                try:
                    s = e.stat() if stat and not is_dir else None
                except FileNotFoundError:  # deleted since the directory was read
                    continue
                yield Entry(f"{root}/{e.name}", e.name, s and s.st_size, s and s.st_mtime_ns, is_dir)
        return
    query = _query(uri)
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=recursive, allow_not_found=True)):
        is_dir = info.type == pafs.FileType.Directory
        yield Entry(_to_uri(fs, info.path, query), info.base_name, None if is_dir else info.size,
                    info.mtime_ns, is_dir)


def list_files(uri: str, recursive: bool = False) -> list[Entry]:
    """The files (not directories) under a location, sorted by URI, with sizes."""
    return sorted((e for e in list_entries(uri, recursive) if not e.is_dir), key=lambda e: e.uri)


def kind(uri: str) -> str | None:
    """"file", "directory" or None (nothing there)."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "directory"}.get(info.type)


def exists(uri: str) -> bool:
    return kind(uri) is not None


def stat(uri: str) -> Entry:
    """The entry of one file or directory (its URI in the form listings give); FileNotFoundError naming
    it when there is nothing there."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{clean_uri(uri)} does not exist")
    is_dir = info.type == pafs.FileType.Directory
    return Entry(_to_uri(fs, path, _query(uri)), info.base_name, None if is_dir else info.size, info.mtime_ns, is_dir)


def is_pattern(uri: str) -> bool:
    """Whether a location's path holds a wildcard (*, ? or [...]) for `glob`."""
    return any(ch in filesystem(uri)[1] for ch in "*?[")


def glob(uri: str) -> list[Entry]:
    """The files whose path matches a location's pattern (fnmatch's rules, so * also crosses "/"),
    sorted by URI: the directory before the first wildcard is listed recursively."""
    fs, pattern = filesystem(uri)
    base = pattern[: min(pattern.index(ch) for ch in "*?[" if ch in pattern)].rsplit("/", 1)[0] or "/"
    query = _query(uri)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted((Entry(_to_uri(fs, i.path, query), i.base_name, i.size, i.mtime_ns, False) for i in infos
                   if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, pattern)), key=lambda e: e.uri)


# ---------------------------------------------------------------------------------------- reading

@contextlib.contextmanager
def open_input(uri: str) -> Iterator[pa.NativeFile]:
    """A random-access reader of one file (what Parquet needs), closed on leaving the block."""
    fs, path = filesystem(uri)
    try:
        f = fs.open_input_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{clean_uri(uri)} does not exist") from None
    with f:
        yield f


def read_bytes(uri: str) -> bytes:
    """A whole file's bytes; FileNotFoundError naming it when there is none."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{clean_uri(uri)} does not exist") from None


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str):
    """A JSON file's value; FileNotFoundError when missing, ValueError naming the file when not JSON."""
    text = read_text(uri)
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"{clean_uri(uri)} is not valid JSON ({e})") from None


def read_footer(uri: str) -> pq.FileMetaData:
    """A Parquet file's footer (schema, row groups), reading no data; ValueError naming the file when it
    cannot be read as Parquet."""
    try:
        with open_input(uri) as f:
            return pq.read_metadata(f)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"cannot read Parquet file {clean_uri(uri)}: {e}") from e


# ---------------------------------------------------------------------------------------- writing

def temporary_name(name: str) -> str:
    """The name a local write of `name` goes under before its rename: hidden, unique per writer."""
    return f".{name}.{uuid.uuid4().hex[:8]}.tmp"


def is_temporary(name: str) -> bool:
    """Whether a file name is a `put` that a killed process left unfinished (safe to delete)."""
    return name.startswith(".") and name.endswith(".tmp")


def put(uri: str, data: bytes | str | Callable[[BinaryIO], object]) -> None:
    """Write a whole file atomically: `data` (text is written as UTF-8), or what the callable writes to
    the binary file it is given (e.g. `lambda f: pq.write_table(table, f)`).

    Local: into a temporary file beside the target (`temporary_name`), synced to disk, then renamed
    over it; parent directories are made. Object store: the callable writes into memory and the
    complete bytes are sent in one upload, which the store makes visible whole. If the callable
    raises, nothing is written (a local temporary file is removed) and the error propagates."""
    write = data if callable(data) else (lambda f: f.write(data.encode("utf-8") if isinstance(data, str) else data))
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        parent, name = posixpath.split(path)
        os.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/{temporary_name(name)}"
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())  # else a power cut after the rename can leave an empty file
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    buffer = io.BytesIO()
    write(buffer)  # a failure here has sent nothing
    with fs.open_output_stream(path) as f:
        f.write(buffer.getbuffer())


def put_json(uri: str, value, sort_keys: bool = False) -> None:
    """`put` a value as indented JSON (values JSON cannot hold written with str)."""
    put(uri, json.dumps(value, indent=2, sort_keys=sort_keys, default=str) + "\n")


def make_dirs(uri: str) -> None:
    """Create a directory and its parents (on an object store, an empty marker under the prefix)."""
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def delete(uris: list[str]) -> None:
    """Delete files (a missing one counts as deleted); on object stores several at once, since each
    answers after a round trip."""
    def one(uri: str) -> None:
        fs, path = filesystem(uri)
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass

    if len(uris) > 1 and not is_local(uris[0]):
        with ThreadPoolExecutor(min(IO_THREADS, len(uris))) as pool:
            list(pool.map(one, uris))
    else:
        for uri in uris:
            one(uri)


def delete_tree(uri: str) -> None:
    """Delete a directory and everything under it (nothing if it does not exist)."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        return
    delete([e.uri for e in list_files(uri, recursive=True)])
