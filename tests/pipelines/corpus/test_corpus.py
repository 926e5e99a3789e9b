"""The corpus bookkeeping without Ray: units from footers, parts named by their row range, resume and
exactly-once from a listing, one schema across files whose pass-through columns disagree."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import corpus as C


def write(path, n, start=0, row_group_size=10, id_type=pa.string()):
    ids = [f"r{i}" for i in range(start, start + n)] if id_type == pa.string() else list(range(start, start + n))
    pq.write_table(pa.table({"id": pa.array(ids, id_type), "text": [f"t{i}" for i in range(n)]}), path,
                   row_group_size=row_group_size)
    return str(path)


def labeled(source, rows, errored=()):
    """A batch as the replica hands it to the write step."""
    return pa.table({"id": [f"r{r}" for r in rows], "_source": [source] * len(rows), "_row": pa.array(rows, pa.int64()),
                     "label": ["x"] * len(rows), "error": pa.array(["bad" if r in errored else None for r in rows], pa.string()),
                     "input_tokens": pa.array([3] * len(rows), pa.int64())})


def test_write_part_sums_the_engine_counts_and_does_not_write_them(tmp_path):
    batch = labeled("a", [0, 1, 2])
    for k, (column, _, _) in enumerate(C.ENGINE_COUNTS):
        batch = batch.append_column(column, pa.array([7 + k, 0, 1], pa.int64()))
    summary = C.write_part(batch, str(tmp_path)).to_pylist()[0]
    assert (summary["engine_steps"], summary["engine_prompt_tokens"], summary["prefix_tokens_reused"]) == (8, 9, 10)
    (part,) = tmp_path.iterdir()
    assert not {column for column, _, _ in C.ENGINE_COUNTS} & set(pq.read_schema(part).names)


def test_plan_cuts_row_groups_into_units_and_slices(tmp_path, monkeypatch):
    a, b = write(tmp_path / "a.parquet", 25), write(tmp_path / "b.parquet", 7, row_group_size=100)
    corpus = C.plan([a, b], ["id", "text"], ["id"])
    assert [(u["source"], u["row_group"], u["offset"], u["num_rows"]) for u in corpus.units] == \
           [(a, 0, 0, 10), (a, 1, 10, 10), (a, 2, 20, 5), (b, 0, 0, 7)]
    assert corpus.rows == 32 and corpus.casts == {} and corpus.types == {"id": pa.string()}
    monkeypatch.setattr(C, "UNIT_ROWS", 4)
    sliced = C.plan([b], ["id"])
    assert [(u["start"], u["offset"], u["num_rows"]) for u in sliced.units] == [(0, 0, 4), (4, 4, 3)]
    units = C.read_row_groups(pa.Table.from_pylist(sliced.units), ["id", "text"], ["text"], {})
    assert units.column("_row").to_pylist() == list(range(7)) and units.column("id").to_pylist()[4] == "r4"


def test_mixed_id_types_are_unified_or_refused_naming_files(tmp_path):
    ints = write(tmp_path / "ints.parquet", 5, id_type=pa.int64())
    small = write(tmp_path / "small.parquet", 5, id_type=pa.int32())
    strs = write(tmp_path / "strs.parquet", 5, start=299)
    corpus = C.plan([ints, small, strs], ["id"], ["id"])
    assert corpus.casts == {"id": pa.string()}
    rows = C.read_row_groups(pa.Table.from_pylist(corpus.units), ["id", "text"], ["text"], corpus.casts)
    assert rows.schema.field("id").type == pa.string() and "r299" in rows.column("id").to_pylist()
    assert C.plan([ints, small], ["id"], ["id"]).casts == {"id": pa.int64()}
    floats = str(tmp_path / "floats.parquet")
    pq.write_table(pa.table({"id": [1.5], "text": ["x"]}), floats)
    with pytest.raises(ValueError, match=r"column 'id' is .*string in .*strs.parquet.*double in .*floats.parquet"):
        C.plan([strs, floats], ["id"], ["id"])
    assert C.unified_type([pa.null(), pa.int16()]) == pa.int16()
    assert C.unified_type([pa.uint64(), pa.int64()]) is None


def test_write_part_cuts_runs_of_one_file_in_order_and_a_retry_rewrites_the_same_parts(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    batch = pa.concat_tables([labeled("b", [5, 3, 4], errored={4}), labeled("a", [0, 1, 7])])
    summary = C.write_part(batch, str(out)).to_pylist()[0]
    assert summary == {"rows": 6, "errored": 1, "input_tokens": 18, "parts": 3, "generated_tokens": 0,
                       "engine_steps": 0, "engine_prompt_tokens": 0, "prefix_tokens_reused": 0,
                       "reasons": '{"bad": [1, ["None"]]}'}  # no id column: sample ids are None
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([C.part_name("a", 0, 2, 0, 6), C.part_name("a", 7, 1, 0, 3), C.part_name("b", 3, 3, 1, 9)])
    part = pq.read_table(out / C.part_name("b", 3, 3, 1, 9))
    assert part.column("_row").to_pylist() == [3, 4, 5]  # input order within the part
    assert part.schema.metadata[b"bloomline.source"] == b"b"
    C.write_part(batch, str(out))  # a retried task
    assert sorted(p.name for p in out.iterdir()) == names
    with pytest.raises(RuntimeError, match="holds a row twice"):
        C.write_part(labeled("a", [2, 2]), str(out))


def test_resume_and_verification_read_names_only(tmp_path):
    a, b = write(tmp_path / "a.parquet", 25), write(tmp_path / "b.parquet", 7)
    corpus = C.plan([a, b], ["id"])
    out = tmp_path / "out"
    out.mkdir()
    C.write_part(labeled(a, list(range(0, 12))), str(out))
    (out / ".part-x.parquet.1234.tmp").write_bytes(b"half")  # a killed write
    state = C.scan_output(str(out))
    assert not list(out.glob(".*.tmp")) and state.rows == 12 and state.intervals == {C.source_id(a): [[0, 12]]}
    todo = C.pending(corpus.units, state)
    assert [(u["source"], u["offset"], u["done"]) for u in todo] == [(a, 10, "[[10, 12]]"), (a, 20, "[]"), (b, 0, "[]")]
    read = C.read_row_groups(pa.Table.from_pylist(todo), ["id"], [], {})
    assert read.num_rows == 25 + 7 - 12 and 10 not in read.column("_row").to_pylist()
    assert C.verify(corpus, state) == ["20 input rows are missing from the output"]

    C.write_part(labeled(a, list(range(12, 25))), str(out))
    C.write_part(labeled(b, list(range(7))), str(out))
    # Parts are never opened: a part whose bytes are garbage still counts by its name.
    (out / C.part_name(b, 0, 7, 0, 21)).write_bytes(b"not parquet")
    state = C.scan_output(str(out))
    assert C.verify(corpus, state) == [] and C.pending(corpus.units, state) == []
    assert state.intervals[C.source_id(a)] == [[0, 25]] and state.parts == 3

    # A part repeating rows (a write that outlived a killed run), rows of a file not in the input.
    C.write_part(labeled(a, [3, 4]), str(out))
    C.write_part(labeled("gone.parquet", [0]), str(out))
    problems = C.verify(corpus, C.scan_output(str(out)))
    assert "part(s) of" in problems[0] and "repeat rows" in problems[0]
    assert "1 unknown source file(s)" in problems[1]
    (out / "part-0123.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="not named by this version"):
        C.scan_output(str(out))


def test_error_reasons_group_rows_by_their_numbers_but_keep_names_with_digits():
    batch = pa.table({"id": ["a", "b", "c"], "error": [
        "text is not valid UTF-8 (invalid start byte at byte 3)",
        "text is not valid UTF-8 (invalid start byte at byte 17)",
        "text has 5000 tokens, over max_input_tokens=1024 (bloom-560m, int8)"]})
    reasons = C.error_reasons(batch, "id")
    assert reasons == {"text is not valid UTF-8 (invalid start byte at byte N)": [2, ["a", "b"]],
                       "text has N tokens, over max_input_tokens=N (bloom-560m, int8)": [1, ["c"]]}
