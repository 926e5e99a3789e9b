"""The labeling job with --output-format delta: the labeled rows are published as one Delta commit
when the run completes; a rerun of a finished job adds none; bad values are refused before Ray."""

import shutil

import pytest

from pipelines.config import LabelConfig
from pipelines.corpus.job import PARTS_DIR, plan_label_job, run_label_job
from tests.jobs.test_label_corpus import load_script
from pipelines import delta
from tests.pipelines.conftest import corpus_rows, moto_server, store, uri, write_corpus


def table(path):
    from deltalake import DeltaTable

    return DeltaTable(str(path))


def test_delta_output_holds_every_row_once_in_one_commit_and_a_rerun_adds_none(ray_cluster, checkpoints, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", corpus_rows(30), files=2)
    out = tmp_path / "labels"
    config = LabelConfig(task="classify", model=str(checkpoints["classify"]), input=[str(corpus)], output=str(out),
                         output_format="delta")
    report = run_label_job(config)
    assert report["status"] == "succeeded" and report["table_version"] == 0
    rows = table(out).to_pyarrow_table()
    assert sorted(rows.column("id").to_pylist()) == [f"r{i:04d}" for i in range(30)]
    assert "label" in rows.column_names
    assert (out / PARTS_DIR / "_run.json").is_file() and not (out / "_run.json").exists()

    planned = plan_label_job(config)  # a rerun: finished without Ray, and no new commit
    assert planned.finished
    assert run_label_job(config, planned)["table_version"] == 0
    assert table(out).version() == 0

    # Killed after its last part but before the commit: the rerun labels nothing and publishes once.
    shutil.rmtree(out / "_delta_log")
    assert not plan_label_job(config).finished
    again = run_label_job(config)
    assert again["rows_labeled_this_run"] == 0 and again["table_version"] == 0
    assert table(out).to_pyarrow_table().num_rows == 30

    # The same output in the other format is refused, naming it.
    with pytest.raises(ValueError, match="Delta table written with --output-format delta"):
        plan_label_job(LabelConfig(task="classify", model=config.model, input=config.input, output=str(out)))


def test_on_s3_the_table_is_published_once(ray_cluster, checkpoints, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", corpus_rows(12), files=1)
    with moto_server() as endpoint:
        store(endpoint).create_dir("labels")
        out = uri(endpoint, "labels/ner")
        config = LabelConfig(task="ner", model=str(checkpoints["ner"]), input=[str(corpus)], output=out,
                             output_format="delta")
        assert run_label_job(config)["table_version"] == 0
        rows = delta.open_table(out).to_pyarrow_table()
        assert sorted(rows.column("id").to_pylist()) == [f"r{i:04d}" for i in range(12)]
        assert plan_label_job(config).finished and delta.open_table(out).version() == 0


def test_a_bad_output_format_is_refused_naming_the_choices(capsys, tmp_path):
    script = load_script()
    assert script.main(["--task", "classify", "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                        "--output-format", "csv"]) == 2
    err = capsys.readouterr().err
    assert "output_format" in err and "parquet" in err and "delta" in err and "csv" in err


def test_embeddings_in_a_delta_output_have_the_tables_type_in_its_files(ray_cluster, checkpoints, tmp_path):
    """Delta has no fixed-size list: the table declares list<float32>, and its data files hold the same
    type (not the parts' fixed_size_list), so every reader gets what the table says."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    corpus = write_corpus(tmp_path / "corpus", corpus_rows(6), files=2)
    out = tmp_path / "labels"
    config = LabelConfig(task="embed", model=str(checkpoints["embed"]), input=[str(corpus)], output=str(out),
                         output_format="delta", dtype="float32")
    assert run_label_job(config)["status"] == "succeeded"
    declared = pa.schema(table(out).schema().to_arrow()).field("embedding").type
    files = [p for p in out.rglob("*.parquet") if not p.relative_to(out).parts[0].startswith("_")]
    assert str(declared) == "list<element: float>"
    assert files and {pq.read_schema(p).field("embedding").type for p in files} == {declared}
    from pipelines.replica import BloomReplica

    rows = corpus_rows(6)
    want = {r["id"]: w["embedding"] for r, w in zip(rows, BloomReplica(config).label_rows(rows))}
    for got in (table(out).to_pyarrow_table(), pl.read_delta(str(out)).to_arrow(),
                pa.Table.from_pylist(ray.data.read_delta(str(out)).take_all())):
        vectors = dict(zip(got.column("id").to_pylist(), got.column("embedding").to_pylist()))
        assert sorted(vectors) == sorted(want) and len(vectors["r0000"]) == 64
        for i, w in want.items():
            assert max(abs(a - b) for a, b in zip(vectors[i], w)) < 1e-5, i
