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
