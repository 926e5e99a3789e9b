"""The storage layer on a local directory and on an S3 server (moto) on loopback: listing with sizes,
atomic put (a reader sees the old file or the new one, a writer that fails leaves nothing), reads,
Parquet footers, deletes; and the nightly job's partition discovery going through it."""

import functools
import hashlib
import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import storage
from pipelines.nightly import NightlyConfig, find_partitions, input_fingerprint
from tests.pipelines.conftest import S3_CREDENTIALS, moto_server, store, uri


@pytest.fixture(scope="module")
def s3():
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path, monkeypatch):
    """A fresh, empty location: a local directory, or a prefix in a new bucket of the S3 server."""
    if request.param == "local":
        return str(tmp_path / "root")
    for k, v in S3_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    endpoint = request.getfixturevalue("s3")
    bucket = f"b{uuid.uuid4().hex[:12]}"
    store(endpoint).create_dir(bucket)
    return uri(endpoint, f"{bucket}/root")


def names(location, recursive=False):
    return sorted(storage.relative(e.uri, location) for e in storage.list_files(location, recursive))


def test_put_read_list_delete(root):
    a, b = storage.join(root, "a.json"), storage.join(root, "sub", "b.bin")
    assert "?" not in root or a.endswith(root.split("?", 1)[1])  # the client options ride along
    assert names(root) == [] and storage.kind(root) is None and not storage.exists(a)
    storage.put_json(a, {"x": 1})
    storage.put(b, b"\x00" * 10)
    assert storage.read_json(a) == {"x": 1} and storage.read_bytes(b) == b"\x00" * 10
    assert storage.kind(a) == "file" and storage.kind(storage.join(root, "sub")) == "directory"
    assert names(root) == ["a.json"]  # files directly under it
    listed = {storage.relative(e.uri, root): e.size for e in storage.list_files(root, recursive=True)}
    assert listed == {"a.json": len(storage.read_bytes(a)), "sub/b.bin": 10}
    assert storage.stat(b).size == 10 and storage.stat(b).mtime_ns
    storage.put(a, "replaced")  # put over an existing file replaces it
    assert storage.read_text(a) == "replaced"
    storage.delete([a, b, storage.join(root, "never-written")])  # a missing file counts as deleted
    assert names(root, recursive=True) == [] and not storage.exists(a)
    with pytest.raises(FileNotFoundError, match=r"a\.json does not exist") as missing:
        storage.read_bytes(a)
    assert "endpoint_override" not in str(missing.value)  # errors name the file, not the client options


def test_a_reader_never_sees_a_partial_file_and_a_failed_write_leaves_none(root):
    target = storage.join(root, "report.json")
    storage.put(target, b"old, complete")
    seen = []

    def writer(f):
        f.write(b"new, ")  # half written: what does a reader of the target see now?
        seen.append(storage.read_bytes(target))
        seen.append(sorted(e.name for e in storage.list_entries(root) if not storage.is_temporary(e.name)))
        f.write(b"complete")

    storage.put(target, writer)
    assert seen == [b"old, complete", ["report.json"]] and storage.read_bytes(target) == b"new, complete"

    def crash(f):
        f.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        storage.put(target, crash)
    assert storage.read_bytes(target) == b"new, complete"  # the old file is untouched
    fresh = storage.join(root, "fresh.parquet")
    with pytest.raises(RuntimeError):
        storage.put(fresh, crash)
    assert not storage.exists(fresh)
    assert [e.name for e in storage.list_entries(root)] == ["report.json"]  # no temporary file left either


def test_footer_reads_and_parquet_through_put(root):
    part = storage.join(root, "part.parquet")
    table = pa.table({"id": list(range(25)), "text": [f"t{i}" for i in range(25)]})
    storage.put(part, functools.partial(pq.write_table, table, row_group_size=10))
    footer = storage.read_footer(part)
    assert footer.num_rows == 25 and [footer.row_group(i).num_rows for i in range(footer.num_row_groups)] == [10, 10, 5]
    assert footer.schema.to_arrow_schema().names == ["id", "text"]
    with storage.open_input(part) as f:
        assert pq.ParquetFile(f).read_row_group(2).column("id").to_pylist() == [20, 21, 22, 23, 24]
    garbage = storage.join(root, "garbage.parquet")
    storage.put(garbage, b"not parquet")
    with pytest.raises(ValueError, match=r"cannot read Parquet file .*garbage\.parquet"):
        storage.read_footer(garbage)
    assert [e.uri for e in storage.glob(storage.join(root, "*.parquet"))] == [garbage, part]


def test_an_object_store_bucket_is_checked_before_any_work(s3, monkeypatch):
    for k, v in S3_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    storage.check_bucket("/any/local/path", "output")  # nothing to check
    with pytest.raises(FileNotFoundError, match="output s3://no-such-bucket/out: bucket 'no-such-bucket' does not exist"):
        storage.check_bucket(uri(s3, "no-such-bucket/out"), "output")


def test_nightly_partition_discovery_reads_the_corpus_through_the_layer(root, tmp_path):
    for day, rows in ((1, 3), (2, 4)):
        table = pa.table({"id": [f"{day}-{i}" for i in range(rows)], "text": ["x"] * rows})
        storage.put(storage.join(root, f"date={day}", "f.parquet"), functools.partial(pq.write_table, table))
    storage.put(storage.join(root, "date=2", "_SUCCESS"), b"")
    storage.put(storage.join(root, "_tmp", "f.parquet"), b"skipped: starts with _")
    config = NightlyConfig(corpus=root, output=str(tmp_path / "out"), ready_marker="_SUCCESS",
                           annotators=[{"name": "topic", "task": "classify", "model": "any"}])
    found = find_partitions(config)
    assert list(found) == ["date=2"]
    files = [storage.join(found["date=2"], "f.parquet")]
    assert input_fingerprint(found["date=2"], files, "stat") != input_fingerprint(found["date=2"], files, "content")


def test_input_fingerprints_of_local_files_are_what_earlier_versions_wrote(tmp_path):
    """A ledger written before the storage layer must not see every partition as changed."""
    (tmp_path / "sub").mkdir()
    files = [str(tmp_path / "a.parquet"), str(tmp_path / "sub" / "b.parquet")]
    for i, path in enumerate(files):
        with open(path, "wb") as f:
            f.write(b"x" * (i + 3))
    h = hashlib.sha256()  # the formula of earlier versions, from os.stat
    for path in files:
        stat = os.stat(path)
        h.update(f"{os.path.relpath(path, tmp_path)}\0{stat.st_size}\0".encode())
        h.update(str(stat.st_mtime_ns).encode())
    assert input_fingerprint(str(tmp_path), files, "stat") == h.hexdigest()
