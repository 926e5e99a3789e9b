"""Reading a Parquet corpus and writing labeled parts, so that a run can be killed and resumed.

Every input row is identified by (`_source`, `_row`): its file and its index in that file. Output parts
carry these two columns; a part is written under a temporary name and renamed into place (object stores
write objects atomically), so a part that exists is complete. Resuming reads the keys of the parts
that exist and skips those rows: the output holds every input row exactly once.
"""

from __future__ import annotations

import fnmatch
import hashlib
import posixpath
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

PART_GLOB = "part-*.parquet"


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path within it, for local paths and s3://, gs://, hdfs:// URIs."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), posixpath.abspath(uri)


def _uri(fs: pafs.FileSystem, path: str) -> str:
    return path if isinstance(fs, pafs.LocalFileSystem) else f"{fs.type_name}://{path}"


def list_input_files(inputs: list[str]) -> list[str]:
    """Expand files, directories (recursively, *.parquet not starting with '_' or '.') and globs."""
    files = []
    for spec in inputs:
        fs, path = filesystem(spec)
        if any(ch in path for ch in "*?["):
            base = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0] or "/"
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
            found = [i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path)]
        else:
            info = fs.get_file_info(path)
            if info.type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"input {spec} does not exist")
            if info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
                found = [i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                         and not posixpath.basename(i.path).startswith(("_", "."))]
            else:
                found = [path]
        if not found:
            raise FileNotFoundError(f"input {spec} matches no Parquet file")
        files += [_uri(fs, p) for p in sorted(found)]
    return list(dict.fromkeys(files))


def plan(files: list[str], required: list[str]) -> list[dict]:
    """Row groups of every input file, as read tasks: {source, row_group, offset, num_rows}.

    Opens each file's footer only (no data), so an unreadable file or a missing column is one clear
    error before any work starts."""
    tasks = []
    for uri in files:
        fs, path = filesystem(uri)
        try:
            with fs.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"cannot read Parquet file {uri}: {e}") from e
        missing = [c for c in required if c not in schema.names]
        if missing:
            raise ValueError(f"{uri} has no column {', '.join(map(repr, missing))} (it has: {', '.join(schema.names)})")
        offset = 0
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            tasks.append({"source": uri, "row_group": rg, "offset": offset, "num_rows": n})
            offset += n
    return tasks


def normalise_text(table: pa.Table, text_columns: list[str]) -> pa.Table:
    """Make every text column `string`, whatever each file stored, so that batches from different files
    share one schema. Values that are not text (numbers, invalid UTF-8 bytes) become null and their
    row gets `_input_error` naming the problem; the replica reports it as that row's error."""
    errors: list[str | None] = [None] * table.num_rows
    for name in text_columns:
        column = table.column(name)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            values = column.cast(pa.string())
        elif pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            decoded = []
            for i, raw in enumerate(column.to_pylist()):
                try:
                    decoded.append(None if raw is None else raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    decoded.append(None)
                    errors[i] = errors[i] or f"{name} is not valid UTF-8 ({e.reason} at byte {e.start})"
            values = pa.array(decoded, pa.string())
        else:
            for i, valid in enumerate(column.is_valid().to_pylist()):
                if valid:
                    errors[i] = errors[i] or f"{name} is not a string (got {column.type})"
            values = pa.nulls(table.num_rows, pa.string())
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table.append_column("_input_error", pa.array(errors, pa.string()))


def read_row_groups(tasks: pa.Table, columns: list[str], text_columns: list[str], done: dict) -> pa.Table:
    """Ray Data read step: the rows of the given row groups, with `_source` and `_row` and text columns
    normalised (`normalise_text`), minus rows already in the output (`done`: source → set of row indices)."""
    tables = []
    for t in tasks.to_pylist():
        fs, path = filesystem(t["source"])
        with fs.open_input_file(path) as f:
            table = normalise_text(pq.ParquetFile(f).read_row_group(t["row_group"], columns=columns), text_columns)
        rows = pa.array(range(t["offset"], t["offset"] + table.num_rows), pa.int64())
        table = table.append_column("_source", pa.array([t["source"]] * table.num_rows, pa.string()))
        table = table.append_column("_row", rows)
        skip = done.get(t["source"])
        if skip:
            table = table.filter(pc.invert(pc.is_in(rows, pa.array(sorted(skip), pa.int64()))))
        tables.append(table)
    return pa.concat_tables(tables) if tables else pa.table({})


def write_part(batch: pa.Table, output: str) -> pa.Table:
    """Ray Data write step: one complete part file per batch; returns a one-row summary.

    The part's name is a hash of its row keys, so a retried task rewrites the same file rather than
    adding a second copy of its rows."""
    if batch.num_rows == 0:
        return pa.table({"rows": [0], "errored": [0], "input_tokens": [0]})
    keys = hashlib.sha1()
    for source, row in zip(batch.column("_source").to_pylist(), batch.column("_row").to_pylist()):
        keys.update(f"{source}\x00{row}\n".encode())
    fs, root = filesystem(output)
    name = f"part-{keys.hexdigest()[:24]}.parquet"
    final = f"{root}/{name}"
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{root}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        pq.write_table(batch, tmp, filesystem=fs)
        fs.move(tmp, final)
    else:
        pq.write_table(batch, final, filesystem=fs)
    errored = batch.num_rows - batch.column("error").null_count
    tokens = pc.sum(batch.column("input_tokens")).as_py() or 0
    return pa.table({"rows": [batch.num_rows], "errored": [errored], "input_tokens": [tokens]})


def scan_output(output: str) -> tuple[dict, pa.Table | None]:
    """The keys already written (source → set of rows) and the parts' counting columns; removes the
    temporary files of writes that a killed run left unfinished."""
    fs, root = filesystem(output)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return {}, None
    done, tables = {}, []
    for item in fs.get_file_info(pafs.FileSelector(root)):
        base = posixpath.basename(item.path)
        if base.startswith(".") and base.endswith(".tmp"):
            fs.delete_file(item.path)
        elif fnmatch.fnmatch(base, PART_GLOB):
            t = pq.read_table(item.path, filesystem=fs, columns=["_source", "_row", "error", "input_tokens"])
            tables.append(t)
    if not tables:
        return {}, None
    table = pa.concat_tables(tables)
    for group in table.group_by("_source").aggregate([("_row", "list")]).to_pylist():
        done[group["_source"]] = set(group["_row_list"])
    return done, table


def list_parts(output: str) -> list[str]:
    fs, root = filesystem(output)
    return [i.path for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
            if fnmatch.fnmatch(posixpath.basename(i.path), PART_GLOB)]
