"""The nightly job's Delta Lake output (delta-rs): the labeled partitions as one table with snapshots,
on a local path or an object store, with no rename, no flock and no JVM.

    <output>/_delta_log/, <output>/date=.../part-*.parquet   the table: id, kept and <annotator>_<field>
                                                            columns, source_file / source_row, and the
                                                            corpus's partition columns
    <output>/_nightly_ledger/   a small Delta table beside it: one row per published partition (its
                                ledger entry as JSON), and in each commit's metadata the run that holds
                                the output (the claim) and the table version the ledger matches

Why two tables: commit metadata is the only thing that commits with the data in one step, but the full
ledger in every commit would make each commit grow with the partitions. So each data commit carries
the entries of the partitions it wrote (`META`), and the ledger table is brought up to date after it;
a run killed in between is repaired by the next run from the data commits newer than the ledger
(`read_ledger`), which is at most one commit.

Concurrency comes from Delta's own commit protocol: a commit is the creation of the log file for
version N+1, which the store makes only if it is absent (a local link, or a conditional PUT with
If-None-Match on S3/GCS). A run claims the output by committing to the ledger table from the version
in which it saw no live claim; of two runs that race, one creates the file and the other's commit
fails, re-reads, and finds the claim held. A claim ends with the run's last commit, or is taken over
when its holder's process is gone (same host) or it is older than `claim_hours` (another host).
"""

from __future__ import annotations

import json
import os
import socket
import time
from urllib.parse import parse_qsl, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

META = "bloomline.nightly"  # commit-metadata key on the data table: {"run_id", "entries": {key: entry}}
CLAIM = "bloomline.claim"  # commit-metadata key on the ledger table: claim + bookkeeping state
LEDGER_TABLE = "_nightly_ledger"
SOURCE_COLUMNS = ("source_file", "source_row")  # a row's input file (under its partition) and row number
LEDGER_SCHEMA = pa.schema([("partition", pa.string()), ("entry", pa.string())])


class ClaimHeld(RuntimeError):
    """Another run holds the output (its claim commit is live)."""


# ------------------------------------------------------------------------------------ locations

def table_location(uri: str) -> tuple[str, dict[str, str]]:
    """Our location string (a local path, or s3:// / gs:// with pyarrow's options in the query) ->
    the URI and storage options delta-rs takes. On S3 the log is committed with conditional PUTs
    (If-None-Match), so no locking service is needed; ValueError naming an option delta-rs lacks."""
    if "://" not in uri:
        return os.path.abspath(uri), {}
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    base = f"{parts.scheme}://{parts.netloc}{parts.path}".rstrip("/")
    if parts.scheme != "s3":
        if query:
            raise ValueError(f"output {storage.clean_uri(uri)}: options {sorted(query)} are only mapped for s3:// Delta outputs")
        return base, {}
    options = {"conditional_put": "etag"}
    scheme = query.pop("scheme", "https")
    if "endpoint_override" in query:
        options["AWS_ENDPOINT_URL"] = f"{scheme}://{query.pop('endpoint_override')}"
    if scheme == "http":
        options["AWS_ALLOW_HTTP"] = "true"
    if "region" in query:
        options["AWS_REGION"] = query.pop("region")
    if query:
        raise ValueError(f"output {storage.clean_uri(uri)}: options {sorted(query)} are not mapped to delta-rs's")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(name):
            options[name] = os.environ[name]
    return base, options


def open_table(uri: str, version: int | None = None):
    """The Delta table at our location (at `version`), or None when there is none yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    location, options = table_location(uri)
    try:
        return DeltaTable(location, version=version, storage_options=options)
    except TableNotFoundError:
        return None


def partition_values(key: str) -> dict[str, str]:
    """"year=2026/month=11" -> {"year": "2026", "month": "11"}; ValueError for a key not in hive form,
    which a Delta table cannot partition by."""
    out = {}
    for level in key.split("/"):
        name, sep, value = level.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"partition {key!r}: a Delta output needs partition directories named column=value")
        out[name] = value
    return out


def partition_predicate(keys: list[str]) -> str:
    """A SQL predicate selecting exactly the partitions `keys` (string partition columns)."""
    def quote(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"
    return " OR ".join("(" + " AND ".join(f'"{c}" = {quote(v)}' for c, v in partition_values(k).items()) + ")"
                       for k in keys)


# ----------------------------------------------------------------------------- ledger and claim

def _commit_properties(metadata: dict, retries: int | None = 0):
    from deltalake import CommitProperties

    return CommitProperties(custom_metadata={k: json.dumps(v, sort_keys=True) for k, v in metadata.items()},
                            max_commit_retries=retries)


def _state(ledger_table) -> dict:
    """The bookkeeping state in the ledger table's newest commit (every commit we make carries it)."""
    if ledger_table is None:
        return {"claim": None, "data_version": -1, "upkeep_version": -1, "runs": 0}
    last = ledger_table.history(1)[0]
    return json.loads(last.get(CLAIM, "null")) or {"claim": None, "data_version": -1, "upkeep_version": -1, "runs": 0}


def _live(claim: dict | None, claim_hours: float) -> bool:
    if not claim or claim.get("released"):
        return False
    if time.time() - claim["since"] > claim_hours * 3600:
        return False
    if claim["host"] == socket.gethostname():
        try:
            os.kill(claim["pid"], 0)
        except ProcessLookupError:
            return False  # its process is gone: killed
        except PermissionError:
            pass
    return True


def _commit_ledger(uri: str, table, rows: pa.Table, keys: list[str], state: dict) -> None:
    """One commit to the ledger table from `table`'s version (None: create it): the rows of `keys`
    replaced by `rows`, `state` in its metadata. CommitFailedError when another commit came first."""
    from deltalake import write_deltalake

    location, options = table_location(storage.join(uri, LEDGER_TABLE))
    properties = _commit_properties({CLAIM: state})
    if table is None:
        write_deltalake(location, rows, mode="error", storage_options=options, commit_properties=properties)
    elif keys:
        write_deltalake(table, rows, mode="overwrite", predicate=" OR ".join(
            "partition = '" + k.replace("'", "''") + "'" for k in keys), commit_properties=properties)
    else:
        write_deltalake(table, rows, mode="append", commit_properties=properties)


def claim(uri: str, run_id: str, wait: float, claim_hours: float) -> dict:
    """Claim the output for this run by a commit to its ledger table; returns the bookkeeping state.
    Waits up to `wait` seconds for a live claim to end, then raises ClaimHeld naming its holder."""
    from deltalake.exceptions import CommitFailedError

    deadline = time.monotonic() + wait
    mine = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    while True:
        table = open_table(storage.join(uri, LEDGER_TABLE))
        state = _state(table)
        if not _live(state["claim"], claim_hours):
            state = {**state, "claim": mine}
            try:
                _commit_ledger(uri, table, LEDGER_SCHEMA.empty_table(), [], state)
                return state
            except CommitFailedError:
                continue  # another run committed first: look again
        if time.monotonic() >= deadline:
            holder = state["claim"]
            raise ClaimHeld(f"another nightly run holds {storage.clean_uri(uri)} (run {holder['run_id']}, "
                            f"pid {holder['pid']} on {holder['host']})")
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


def release(uri: str, state: dict) -> None:
    """End this run's claim (a commit to the ledger table)."""
    table = open_table(storage.join(uri, LEDGER_TABLE))
    _commit_ledger(uri, table, LEDGER_SCHEMA.empty_table(), [], {**state, "claim": {**state["claim"], "released": True}})


def read_ledger(uri: str, state: dict) -> tuple[dict, list[str]]:
    """The ledger ({"partitions": {key: entry}}) from the ledger table, brought up to date from the data
    commits newer than it (a run killed between its data commit and its ledger commit). Returns it and
    notes for the report; `state["data_version"]` is advanced to what it now matches."""
    ledger_table = open_table(storage.join(uri, LEDGER_TABLE))
    rows = ledger_table.to_pyarrow_table().to_pylist() if ledger_table is not None else []
    ledger = {"partitions": {r["partition"]: json.loads(r["entry"]) for r in rows}}
    notes = []
    data = open_table(uri)
    if data is not None and data.version() > state["data_version"]:
        newer = data.version() - state["data_version"]
        for commit in sorted(data.history(newer), key=lambda c: c["version"]):
            if META in commit:
                meta = json.loads(commit[META])
                for key, entry in meta["entries"].items():
                    if entry is None:
                        ledger["partitions"].pop(key, None)
                    else:
                        ledger["partitions"][key] = entry
                    notes.append(f"{key}: ledger updated from table version {commit['version']} "
                                 "(a run was killed after its commit)")
        state["data_version"] = data.version()
    return ledger, notes


def save_ledger(uri: str, ledger: dict, keys: list[str], state: dict) -> None:
    """Write the ledger rows of `keys` (those gone from the ledger are deleted) in one ledger commit."""
    table = open_table(storage.join(uri, LEDGER_TABLE))
    rows = pa.table({"partition": [k for k in keys if k in ledger["partitions"]],
                     "entry": [json.dumps(ledger["partitions"][k], sort_keys=True) for k in keys if k in ledger["partitions"]]},
                    schema=LEDGER_SCHEMA)
    _commit_ledger(uri, table, rows, keys, state)


# ---------------------------------------------------------------------------------------- commits

def table_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` as a Delta table holds it: Delta has no fixed-size list, so a fixed_size_list<T>[n]
    column (the embed task's `embedding`) becomes list<T>. The data files are written with this schema
    too, so that they hold the type the table declares (Polars refuses a file whose type differs)."""
    def plain(t: pa.DataType) -> pa.DataType:
        return pa.list_(t.value_field.with_type(plain(t.value_type))) if pa.types.is_fixed_size_list(t) else t
    return pa.schema([f.with_type(plain(f.type)) for f in schema], metadata=schema.metadata)


def _staged_batches(staged: dict[str, str], schema: pa.Schema):
    for key, directory in staged.items():
        values = partition_values(key)
        for entry in sorted(storage.list_files(directory, recursive=True), key=lambda e: e.uri):
            if not entry.name.endswith(".parquet"):
                continue
            rel = storage.relative(entry.uri, directory)
            with storage.open_input(entry.uri) as f:
                table = pq.read_table(f)
            n = table.num_rows
            for c, v in values.items():
                table = table.append_column(c, pa.array([v] * n, pa.string()))
            table = table.append_column(SOURCE_COLUMNS[0], pa.array([rel] * n, pa.string()))
            table = table.append_column(SOURCE_COLUMNS[1], pa.array(range(n), pa.int64()))
            yield from table.select(schema.names).cast(schema).to_batches()


def table_configuration(retention_hours: float) -> dict[str, str]:
    """A new table's properties: log files and removed data files are kept for the retention (upkeep's
    vacuum and log cleanup drop what is older), so time travel within it always works."""
    interval = f"interval {max(1, int(retention_hours))} hours"
    return {"delta.logRetentionDuration": interval, "delta.deletedFileRetentionDuration": interval}


def commit_partitions(uri: str, staged: dict[str, str], deleted: list[str], entries: dict[str, dict | None],
                      run_id: str, retention_hours: float = 168.0) -> int:
    """Replace the partitions `staged` (key -> directory of the assembled Parquet files) and delete the
    partitions `deleted`, in ONE commit with a predicate overwrite: a reader sees every partition of
    the run old or every one new. New columns are added (schema evolution), columns the new files lack
    are kept (null there). `entries` (key -> ledger entry, None for deleted) go in the commit's
    metadata. Returns the new table version. A new table keeps its log for `retention_hours`. CommitFailedError when another writer committed first."""
    from deltalake import write_deltalake

    table = open_table(uri)
    keys = sorted(staged) + sorted(deleted)
    properties = _commit_properties({META: {"run_id": run_id, "entries": entries}})
    location, options = table_location(uri)
    if staged:
        first_key = next(iter(staged))
        first = next(e.uri for e in sorted(storage.list_files(staged[first_key], recursive=True), key=lambda e: e.uri)
                     if e.name.endswith(".parquet"))
        columns = list(partition_values(first_key))
        base = table_schema(storage.read_footer(first).schema.to_arrow_schema())
        schema = pa.schema([*base, *(pa.field(c, pa.string()) for c in columns),
                            pa.field(SOURCE_COLUMNS[0], pa.string()), pa.field(SOURCE_COLUMNS[1], pa.int64())])
        if table is not None and table.metadata().partition_columns != columns:
            raise ValueError(f"the Delta table at {storage.clean_uri(uri)} is partitioned by "
                             f"{table.metadata().partition_columns}, the corpus's partitions by {columns}")
        reader = pa.RecordBatchReader.from_batches(schema, _staged_batches(staged, schema))
        if table is None:
            write_deltalake(location, reader, partition_by=columns, mode="error", storage_options=options,
                            commit_properties=properties, configuration=table_configuration(retention_hours))
        else:
            write_deltalake(table, reader, partition_by=columns, mode="overwrite", predicate=partition_predicate(keys),
                            schema_mode="merge", commit_properties=properties)
    elif deleted and table is not None:
        table.delete(partition_predicate(keys), commit_properties=properties)
    return open_table(uri).version()


def drop_columns(uri: str, columns: list[str], run_id: str) -> int:
    """Rewrite the table without `columns` (--prune of a dropped annotator): one overwrite commit of the
    whole table with its schema replaced. Returns the new version."""
    from deltalake import write_deltalake

    table = open_table(uri)
    data = table.to_pyarrow_table()
    write_deltalake(table, data.drop_columns([c for c in columns if c in data.column_names]), mode="overwrite",
                    schema_mode="overwrite", partition_by=table.metadata().partition_columns,
                    commit_properties=_commit_properties({META: {"run_id": run_id, "entries": {}}}))
    return open_table(uri).version()


def read_reused(uri: str, key: str):
    """A reader of partition `key`'s published columns for one input file: (file under the partition,
    columns) -> those columns in input row order, as `assemble` takes it."""
    table = open_table(uri)
    values = partition_values(key)

    def read(rel: str, columns: list[str]) -> pa.Table:
        filters = [(c, "=", v) for c, v in values.items()] + [(SOURCE_COLUMNS[0], "=", rel)]
        return table.to_pyarrow_table(columns=[*columns, SOURCE_COLUMNS[1]], filters=filters) \
            .sort_by(SOURCE_COLUMNS[1]).select(columns)
    return read


def upkeep(uri: str, retention_hours: float, state: dict) -> dict:
    """Compact small files, remove files no snapshot younger than `retention_hours` reads (vacuum),
    checkpoint the log and drop log files past the retention, on the data and the ledger tables.
    Readers can time travel to any version younger than the retention. `state` goes in the metadata of
    the ledger table's commits (its newest commit must always carry it)."""
    out = {}
    for name, location in (("table", uri), ("ledger", storage.join(uri, LEDGER_TABLE))):
        table = open_table(location)
        if table is None:
            continue
        properties = _commit_properties({CLAIM: state} if name == "ledger" else {}, retries=None)
        compacted = table.optimize.compact(commit_properties=properties)
        vacuumed = table.vacuum(retention_hours=int(retention_hours), dry_run=False, enforce_retention_duration=False,
                                commit_properties=properties)
        table = open_table(location)
        table.create_checkpoint()
        table.cleanup_metadata()
        out[name] = {"files_removed": compacted["numFilesRemoved"], "files_added": compacted["numFilesAdded"],
                     "vacuumed": len(vacuumed)}
    return out


# ------------------------------------------------------------------------ the labeling job's table

LABELS = "bloomline.labels"  # commit-metadata key of a labeling job's publish commit: {"fingerprint", "rows"}


def published_fingerprint(uri: str) -> str | None:
    """The run fingerprint in the newest commit of the labeling job's table at `uri` (None: no table,
    or its newest commit was not a publish of the labeling job)."""
    table = open_table(uri)
    if table is None:
        return None
    meta = json.loads(table.history(1)[0].get(LABELS, "null"))
    return meta.get("fingerprint") if isinstance(meta, dict) else None


def publish_parts(uri: str, parts: list[str], metadata: dict) -> int:
    """Replace the table at `uri` by the rows of the Parquet files `parts`, in ONE overwrite commit with
    `metadata` under LABELS: readers see the previous version or all of these rows, never some. The
    files are streamed (one at a time in memory), cast to the union of their footers' schemas; the
    table's schema is replaced (an --overwrite with another task). Returns the new table version."""
    from deltalake import write_deltalake

    parts = sorted(parts)
    schema = table_schema(pa.unify_schemas([storage.read_footer(p).schema.to_arrow_schema() for p in parts])
                          if parts else pa.schema([]))

    def batches():
        for part in parts:
            with storage.open_input(part) as f:
                table = pq.read_table(f)
            for name in schema.names:  # a part may lack a column another has (all null there)
                if name not in table.column_names:
                    table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
            yield from table.select(schema.names).cast(schema).to_batches()

    location, options = table_location(uri)
    write_deltalake(location, pa.RecordBatchReader.from_batches(schema, batches()), mode="overwrite",
                    schema_mode="overwrite", storage_options=options,
                    commit_properties=_commit_properties({LABELS: metadata}))
    return open_table(uri).version()
