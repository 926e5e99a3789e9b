"""The corpus job: this module plans, reads, writes and verifies the parts; `job` runs a task over them on
Ray Data (`run_label_job`).

Reading a Parquet corpus and writing labeled parts, so that a run can be killed and resumed, with
bookkeeping that grows with files and row groups, never with rows.

Every input row is identified by (`_source`, `_row`): its file and its index in that file. The input is
cut into units (a row group, or a fixed slice of a large one); Ray tasks read units and write parts.
A part holds consecutive rows of one file, in input order, and its name says which:

    part-<source id>-<first row>-<rows>-e<errored rows>-t<input tokens>.parquet

(the source id is a hash of the file's URI). So the driver resumes and verifies from a listing of the
output alone, reading no part: the rows written for a file are a set of intervals, exactly once when
they do not overlap and cover the file. The write step checks its own rows' keys (where the data is);
a part is written atomically (`storage.put`), so a part that exists is complete; a retried write produces the same name and replaces
the file rather than adding a copy of its rows.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
import posixpath
import re
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import storage
from ..storage import clean_uri, filesystem  # noqa: F401  (importable from here, as before)

PART_GLOB = "part-*.parquet"
PART_NAME = re.compile(r"part-([0-9a-f]{16})-(\d{12})-(\d+)-e(\d+)-t(\d+)\.parquet")
UNIT_ROWS = 1 << 17  # a row group larger than this is read as slices of this many rows (bounded task memory)
IO_THREADS = storage.IO_THREADS  # concurrent footer reads: object stores answer each after a round trip


# ------------------------------------------------------------------------------------------- paths

def source_id(uri: str) -> str:
    """A file's id in part names: 16 hex digits of a hash of its URI (the query left out)."""
    return hashlib.sha1(clean_uri(uri).encode()).hexdigest()[:16]


def check_output(output: str) -> None:
    """Before any work: an object-store output's bucket exists and answers with these credentials."""
    storage.check_bucket(output, "output")


def list_input_files(inputs: list[str]) -> list[str]:
    """Expand files, directories (recursively, *.parquet not starting with '_' or '.') and globs."""
    files = []
    for spec in inputs:
        try:
            if storage.is_pattern(spec):
                found = [e.uri for e in storage.glob(spec)]
            else:
                entry = storage.stat(spec)
                if entry.is_dir:
                    found = [e.uri for e in storage.list_files(spec, recursive=True)
                             if e.name.endswith(".parquet") and not e.name.startswith(("_", "."))]
                else:
                    found = [entry.uri]
        except FileNotFoundError:
            raise FileNotFoundError(f"input {spec} does not exist") from None
        except OSError as e:
            raise storage.store_error(f"input {clean_uri(spec)}", e) from None
        if not found:
            raise FileNotFoundError(f"input {spec} matches no Parquet file")
        files += found
    return list(dict.fromkeys(files))


# -------------------------------------------------------------------------------------------- plan

@dataclass
class CorpusPlan:
    """What a run reads: its units and the types every part gets for the pass-through columns.

    units: {uri, source, row_group, offset (file row of the unit's first row), start (its row in the
    row group), num_rows}, one per row group or slice of one; file_rows: source → rows of that file;
    casts: column → the type all files are cast to (only the columns whose files disagree)."""

    units: list[dict]
    file_rows: dict[str, int]
    types: dict[str, pa.DataType] = field(default_factory=dict)
    casts: dict[str, pa.DataType] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(self.file_rows.values())


def _footer(uri: str, required: list[str], passthrough: list[str]) -> tuple[str | None, dict, list[int]]:
    """From one file's footer: why it cannot be read (None: it can), the types of the pass-through
    columns, the rows of each row group. Only these small values are kept: thousands of footers' Arrow
    schemas held at once would cost the driver memory in proportion to files."""
    meta = storage.read_footer(uri)
    schema = meta.schema.to_arrow_schema()
    groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    missing = [c for c in required if c not in schema.names]
    if missing:
        return (f"{clean_uri(uri)} has no column {', '.join(map(repr, missing))} (it has: {', '.join(schema.names)})",
                {}, [])
    return None, {c: schema.field(c).type for c in passthrough}, groups


def unified_type(types: list[pa.DataType]) -> pa.DataType | None:
    """One type that holds every value of all `types` without loss, or None. Integers widen to int64,
    integers and floats to float64 (floats only), integers and strings to string (ids like 17 and
    "l299" mixed across files), null to anything."""
    kinds = {t for t in types if not pa.types.is_null(t)}
    if len(kinds) <= 1:
        return next(iter(kinds), pa.null())
    text = {t for t in kinds if pa.types.is_string(t) or pa.types.is_large_string(t)}
    ints = {t for t in kinds if pa.types.is_integer(t)}
    floats = {t for t in kinds if pa.types.is_floating(t)}
    if kinds == ints and pa.uint64() not in ints:
        return pa.int64()
    if kinds == floats:
        return pa.float64()
    if kinds == text | ints and text:
        return pa.large_string() if pa.large_string() in text else pa.string()
    return None


def _threads(uri: str, tasks: int, threads: int | None) -> int:
    # Threads hide object-store round trips; on a local disk reading footers one by one in this thread
    # is as fast and measured 30 MiB lighter at 2,000 files (benchmarks/bench_scale.py).
    return max(1, min(tasks, threads or (1 if "://" not in uri else IO_THREADS)))


def plan(files: list[str], required: list[str], passthrough: list[str] = (), threads: int | None = None) -> CorpusPlan:
    """The units of every input file, from footers read concurrently on object stores (no data);
    `threads` overrides how many.

    An unreadable file, a missing column or a pass-through column whose types across files cannot be
    unified is one clear error, naming the files, before any work starts."""
    n = _threads(files[0] if files else "", len(files), threads)
    with ThreadPoolExecutor(n) if n > 1 else contextlib.nullcontext() as pool:
        footers = (pool.map if pool else map)(functools.partial(_footer, required=required, passthrough=passthrough), files)
        units, file_rows = [], {}
        seen: dict[str, dict[pa.DataType, list[str]]] = {c: {} for c in passthrough}  # column → type → files
        ids: dict[str, str] = {}
        for uri, (problem, column_types, groups) in zip(files, footers):
            if problem:
                raise ValueError(problem)
            source = clean_uri(uri)
            other = ids.setdefault(source_id(uri), source)
            if other != source:
                raise ValueError(f"input files {other} and {source} have the same source id; rename one")
            for c, type_ in column_types.items():
                names = seen[c].setdefault(type_, [])
                if len(names) < 3:  # a few examples per type are enough for the message
                    names.append(source)
            offset = 0
            for rg, n in enumerate(groups):
                for start in range(0, n, UNIT_ROWS):
                    units.append({"uri": uri, "source": source, "row_group": rg, "offset": offset + start,
                                  "start": start, "num_rows": min(UNIT_ROWS, n - start)})
                offset += n
            file_rows[source] = offset
    types, casts, clashes = {}, {}, []
    for c, by_type in seen.items():
        unified = unified_type(list(by_type))
        if unified is None:
            clashes.append(f"column {c!r} is " + "; ".join(f"{t} in {', '.join(names)}" for t, names in by_type.items()))
            continue
        types[c] = unified
        if len(by_type) > 1:
            casts[c] = unified
    if clashes:
        raise ValueError("input files disagree on the types of pass-through columns, which would give parts of "
                         "different schemas: " + ". ".join(clashes))
    return CorpusPlan(units, file_rows, types, casts)


# ------------------------------------------------------------------------------ reading and writing

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


def _covered(rows: np.ndarray, done: list) -> np.ndarray:
    """Mask of `rows` inside any of the [first, end) intervals `done`."""
    mask = np.zeros(len(rows), dtype=bool)
    for first, end in done:
        mask |= (rows >= first) & (rows < end)
    return mask


def read_row_groups(units: pa.Table, columns: list[str], text_columns: list[str], casts: dict) -> pa.Table:
    """Ray Data read step: the rows of the given units, with `_source` and `_row`, text columns
    normalised (`normalise_text`) and pass-through columns cast to the corpus's types (`casts`), minus
    the rows a unit's `done` intervals say are already in the output."""
    tables = []
    for u in units.to_pylist():
        with storage.open_input(u["uri"]) as f:
            table = pq.ParquetFile(f).read_row_group(u["row_group"], columns=columns)
        table = normalise_text(table.slice(u["start"], u["num_rows"]), text_columns)
        for name, type_ in casts.items():
            if name not in text_columns:
                table = table.set_column(table.schema.get_field_index(name), name, table.column(name).cast(type_))
        rows = np.arange(u["offset"], u["offset"] + table.num_rows, dtype=np.int64)
        table = table.append_column("_source", pa.array([u["source"]] * table.num_rows, pa.string()))
        table = table.append_column("_row", pa.array(rows))
        done = json.loads(u.get("done") or "[]")
        if done:
            table = table.filter(pa.array(~_covered(rows, done)))
        tables.append(table)
    return pa.concat_tables(tables) if tables else pa.table({})


def part_name(source: str, first: int, rows: int, errored: int, tokens: int) -> str:
    return f"part-{source_id(source)}-{first:012d}-{rows}-e{errored}-t{tokens}.parquet"


# A number standing alone (sizes, positions, limits), not one inside a name such as UTF-8, int8 or bloom-560m.
_NUMBER = re.compile(r"(?<![\w.])(?<!\w-)\d+(?:\.\d+)?(?![\w.-]*\w)")


def reason(error: str) -> str:
    """An error's text with the numbers that vary from row to row as N, so that rows failing the same
    way share one reason: "text is 5000 tokens, over 1024" -> "text is N tokens, over N"."""
    return _NUMBER.sub("N", error)


def error_reasons(batch: pa.Table, id_column: str | None, samples: int = 3) -> dict:
    """Errored rows of a batch by reason (the error's text with its numbers as N): {reason: [rows, [ids]]}."""
    out: dict[str, list] = {}
    errors = batch.column("error").to_pylist()
    ids = batch.column(id_column).to_pylist() if id_column in batch.column_names else [None] * len(errors)
    for error, row_id in zip(errors, ids):
        if error is not None:
            entry = out.setdefault(reason(error), [0, []])
            entry[0] += 1
            if len(entry[1]) < samples:
                entry[1].append(str(row_id))
    return out


def merge_reasons(total: dict, more: dict, samples: int = 3) -> dict:
    for reason, (rows, ids) in more.items():
        entry = total.setdefault(reason, [0, []])
        entry[0] += rows
        entry[1] = (entry[1] + ids)[:samples]
    return total


ENGINE_STEPS = "_engine_steps"  # generate: a batch's engine steps, from the replica to the write step (not written)
# The generation engine's counters that a batch advanced, each a column from the replica to the write step (on
# the batch's first row; summed there and not written): (column, the write summary's name, the engine's
# attribute). Steps give the report's mean batch occupancy, the prompt tokens its prefix cache hit rate.
ENGINE_COUNTS = [(ENGINE_STEPS, "engine_steps", "steps"),
                 ("_engine_prompt_tokens", "engine_prompt_tokens", "prompt_tokens"),
                 ("_engine_prefix_tokens_reused", "prefix_tokens_reused", "prompt_tokens_reused")]


def write_part(batch: pa.Table, output: str, id_column: str | None = None) -> pa.Table:
    """Ray Data write step: the batch's rows sorted by key and cut into runs of consecutive rows of one
    file, one part per run (named by `part_name`); returns a one-row summary.

    Checks its own keys: a row twice in one batch is an error here, where the data is, so the driver
    only compares intervals. Same rows, same name: a retried write replaces its part."""
    summary = {"rows": [batch.num_rows], "errored": [0], "input_tokens": [0], "parts": [0], "reasons": ["{}"],
               "generated_tokens": [0], **{name: [0] for _, name, _ in ENGINE_COUNTS}}
    for column, name, _ in ENGINE_COUNTS:  # the generation engine's counters, from the replica; not written
        if column in batch.column_names:
            summary[name] = [int(pc.sum(batch.column(column)).as_py() or 0)]
            batch = batch.drop_columns([column])
    if batch.num_rows == 0:
        return pa.table(summary)
    summary["reasons"] = [json.dumps(error_reasons(batch, id_column))]
    if "completion_tokens" in batch.column_names:
        summary["generated_tokens"] = [int(pc.sum(batch.column("completion_tokens")).as_py() or 0)]
    batch = batch.sort_by([("_source", "ascending"), ("_row", "ascending")])
    sources = batch.column("_source").to_numpy(zero_copy_only=False)
    rows = batch.column("_row").to_numpy()
    same = sources[1:] == sources[:-1]
    if np.any(same & (rows[1:] == rows[:-1])):
        raise RuntimeError("a write batch holds a row twice; refusing to write it")
    cuts = np.flatnonzero(~same | (rows[1:] != rows[:-1] + 1)) + 1
    errors, tokens = batch.column("error").is_valid().to_numpy(zero_copy_only=False), batch.column("input_tokens")
    for begin, end in zip([0, *cuts], [*cuts, batch.num_rows]):
        part = batch.slice(begin, end - begin)
        n_err = int(errors[begin:end].sum())
        n_tok = int(pc.sum(tokens.slice(begin, end - begin)).as_py() or 0)
        name = part_name(str(sources[begin]), int(rows[begin]), end - begin, n_err, n_tok)
        part = part.replace_schema_metadata({**(part.schema.metadata or {}), b"bloomline.source": str(sources[begin]),
                                             b"bloomline.first_row": str(rows[begin])})
        storage.put(storage.join(output, name), functools.partial(pq.write_table, part))
        summary["errored"][0] += n_err
        summary["input_tokens"][0] += n_tok
        summary["parts"][0] += 1
    return pa.table(summary)


# ------------------------------------------------------------------------- the output, from names

@dataclass
class OutputState:
    """What the output holds, from its listing: per source id, the merged [first, end) intervals of the
    rows written, and totals. `overlaps`: source id → part paths whose rows another part also holds."""

    intervals: dict[str, list[list[int]]] = field(default_factory=dict)
    rows: int = 0
    errored: int = 0
    tokens: int = 0
    parts: int = 0
    overlaps: dict[str, list[str]] = field(default_factory=dict)


def list_parts(output: str) -> list[str]:
    """The URIs of the output's parts."""
    return [e.uri for e in storage.list_entries(output, stat=False) if fnmatch.fnmatch(e.name, PART_GLOB)]


def parts_by_source(output: str) -> dict[str, list[str]]:
    """source id → the URIs of its parts (from the listing), to read one input file's labels."""
    out: dict[str, list[str]] = {}
    for uri in list_parts(output):
        m = PART_NAME.fullmatch(posixpath.basename(storage.clean_uri(uri)))
        if m:
            out.setdefault(m[1], []).append(uri)
    return out


def _parse(output: str, name: str) -> tuple[str, int, int, int, int]:
    m = PART_NAME.fullmatch(name)
    if m is None:
        raise ValueError(f"output {output} holds {name}, a part not named by this version of the job "
                         "(no row range in its name); write to another output or use --overwrite")
    return m[1], int(m[2]), int(m[3]), int(m[4]), int(m[5])


def scan_output(output: str, clean: bool = True) -> OutputState:
    """The output's state from one listing (no part is opened). With `clean`, removes the temporary
    files of writes that a killed run left unfinished. A part named otherwise than `part_name` is an
    error (written by an older version of this job)."""
    state = OutputState()
    found: dict[str, array] = {}  # source id → first row, rows, first row, rows, ... (16 bytes a part)
    stale = []
    for entry in storage.list_entries(output, stat=False):  # streamed from a local directory
        name = entry.name
        if storage.is_temporary(name):
            stale.append(entry.uri)
        elif fnmatch.fnmatch(name, PART_GLOB):
            sid, first, rows, errored, tokens = _parse(output, name)
            found.setdefault(sid, array("q")).extend((first, rows))
            state.rows += rows
            state.errored += errored
            state.tokens += tokens
            state.parts += 1
    if clean:
        storage.delete(stale)
    repeated = set()
    for sid, flat in found.items():
        merged: list[list[int]] = []
        for first, rows in sorted(zip(flat[::2], flat[1::2])):
            if merged and first < merged[-1][1]:
                repeated.add((sid, first, rows))
            if merged and first <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], first + rows)
            else:
                merged.append([first, first + rows])
        state.intervals[sid] = merged
    if repeated:  # rare (a write that outlived a killed run): a second listing finds their paths
        for entry in storage.list_entries(output, stat=False):
            if fnmatch.fnmatch(entry.name, PART_GLOB) and _parse(output, entry.name)[:3] in repeated:
                state.overlaps.setdefault(_parse(output, entry.name)[0], []).append(entry.uri)
    return state


def pending(units: list[dict], state: OutputState) -> list[dict]:
    """The units with rows not yet written, each with `done`: the [first, end) intervals of its rows
    already written, as JSON (a few per unit, so read tasks skip those rows)."""
    out = []
    for u in units:
        lo, hi = u["offset"], u["offset"] + u["num_rows"]
        done = [[max(a, lo), min(b, hi)] for a, b in state.intervals.get(source_id(u["source"]), ()) if a < hi and b > lo]
        if sum(b - a for a, b in done) < u["num_rows"]:
            # JSON: every unit's value has one Arrow type (string), whether it has intervals or not.
            out.append({**u, "done": json.dumps(done)})
    return out


def verify(corpus: CorpusPlan, state: OutputState) -> list[str]:
    """Problems with exactly-once, from intervals: each input file's rows covered once, nothing else.

    Each part's rows are distinct and consecutive (checked by the write step), so parts that do not
    overlap and whose rows add up to the file's rows hold every row of the file exactly once."""
    problems, expected = [], {source_id(s): (s, n) for s, n in corpus.file_rows.items()}
    for sid, paths in state.overlaps.items():
        name = expected.get(sid, (sid,))[0]
        problems.append(f"{len(paths)} part(s) of {name} repeat rows another part holds (e.g. {clean_uri(paths[0])})")
    missing = 0
    for sid, (source, n) in expected.items():
        covered = state.intervals.get(sid, [])
        missing += n - sum(min(b, n) - a for a, b in covered if a < n)
    extra = [sid for sid in state.intervals if sid not in expected]
    beyond = sum(max(0, b - max(a, expected[sid][1])) for sid, iv in state.intervals.items() if sid in expected
                 for a, b in iv)
    if missing:
        problems.append(f"{missing} input rows are missing from the output")
    if extra or beyond:
        problems.append(f"the output holds rows that are not in the input ({len(extra)} unknown source file(s), "
                        f"{beyond} rows past the end of input files)")
    return problems
