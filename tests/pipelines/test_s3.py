"""The labeling job on an object store: an S3-compatible server (moto) on loopback, started here and
stopped after. s3:// input and output, a driver killed and the job resumed, and bad credentials or a
missing bucket refused with one clear error before any work."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from pipelines.config import LabelConfig
from pipelines.corpus.job import run_label_job
from tests.pipelines.conftest import S3_CREDENTIALS, corpus_rows, moto_server, store, uri, write_corpus

ROOT = Path(__file__).resolve().parents[2]


def upload(fs, local: Path, bucket_path: str):
    fs.create_dir(bucket_path.split("/")[0])
    pafs.copy_files(str(local), bucket_path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@pytest.fixture(scope="module")
def s3():
    """An S3 server that takes any credentials (Ray's workers hold the session's S3_CREDENTIALS)."""
    with moto_server() as endpoint:
        yield endpoint


def test_s3_input_and_output_driver_killed_and_resumed(ray_cluster, checkpoints, s3, tmp_path):
    fs = store(s3)
    upload(fs, write_corpus(tmp_path / "c", corpus_rows(120), files=3, row_group_size=5), "corpus/in")
    src, out = uri(s3, "corpus/in"), uri(s3, "labels/run1")
    fs.create_dir("labels")
    args = [sys.executable, str(ROOT / "jobs" / "label_corpus.py"), "--task", "generate", "--model",
            str(checkpoints["generate"]), "--input", src, "--output", out, "--max-new-tokens", "24",
            "--rows-per-batch", "5"]
    proc = subprocess.Popen(args, env={**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_USAGE_STATS_ENABLED": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = lambda: [i for i in fs.get_file_info(pafs.FileSelector("labels/run1", allow_not_found=True))  # noqa: E731
                     if i.base_name.startswith("part-")]
    deadline = time.time() + 120
    while time.time() < deadline and len(parts()) < 3 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the job finished before it could be killed; make it slower"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = pads.dataset("labels/run1", filesystem=fs, format="parquet").count_rows()
    assert 0 < written < 120

    cfg = LabelConfig(task="generate", model=str(checkpoints["generate"]), input=[src], output=out,
                      max_new_tokens=24, rows_per_batch=5)
    report = run_label_job(cfg)
    assert report["rows_labeled_this_run"] == 120 - written and report["rows_out"] == 120
    table = pads.dataset("labels/run1", filesystem=fs, format="parquet").to_table()
    keys = list(zip(table.column("_source").to_pylist(), table.column("_row").to_pylist()))
    assert len(keys) == len(set(keys)) == 120
    assert {s for s, _ in keys} == {f"s3://corpus/in/in-{k}.parquet" for k in range(3)}  # no endpoint in the data
    with fs.open_input_stream("labels/run1/_report.json") as f:
        assert json.loads(f.read())["status"] == "succeeded"


@pytest.fixture(scope="module")
def s3_checked():
    """An S3 server that checks credentials: (endpoint, access key, secret) of its one user."""
    import boto3

    # moto answers the first three requests unchecked (creating the user and its key), then checks all.
    with moto_server(INITIAL_NO_AUTH_ACTION_COUNT="3") as endpoint:
        iam = boto3.client("iam", endpoint_url=f"http://{endpoint}", **{
            "region_name": "us-east-1", "aws_access_key_id": "setup", "aws_secret_access_key": "setup"})
        iam.create_user(UserName="labeler")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="labeler", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="labeler")["AccessKey"]
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]


def test_bad_credentials_and_missing_buckets_are_one_clear_error_before_any_work(ray_cluster, checkpoints, s3_checked,
                                                                                 tmp_path, monkeypatch):
    endpoint, key, secret = s3_checked
    fs = store(endpoint, key, secret)
    upload(fs, write_corpus(tmp_path / "c", corpus_rows(10), files=1), "corpus/in")
    fs.create_dir("labels")
    job = lambda src, out: LabelConfig(task="classify", model=str(checkpoints["classify"]),  # noqa: E731
                                       input=[uri(endpoint, src)], output=uri(endpoint, out))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises(FileNotFoundError, match=r"output s3://nobucket/out: bucket 'nobucket' does not exist"):
        run_label_job(job("corpus/in", "nobucket/out"))
    with pytest.raises(FileNotFoundError, match=r"input s3://nobucket/in.* does not exist"):
        run_label_job(job("nobucket/in", "labels/out"))

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAUSER")
    with pytest.raises(ValueError, match=r"input s3://corpus/in: the object store refused access"):
        run_label_job(job("corpus/in", "labels/out"))
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "label_corpus.py"), "--task", "classify", "--model",
                           str(checkpoints["classify"]), "--input", uri(endpoint, "corpus/in"), "--output",
                           uri(endpoint, "labels/out")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 2 and "refused access" in done.stderr and "Traceback" not in done.stderr
    assert [i.path for i in fs.get_file_info(pafs.FileSelector("labels", recursive=True))] == []  # nothing written


def test_nightly_job_reads_its_corpus_from_an_object_store(ray_cluster, checkpoints, s3, tmp_path):
    """The nightly job's partitions, fingerprints and input files go through the storage layer, so
    its corpus may be a bucket (its output stays a POSIX directory: partitions are published by rename)."""
    from pipelines.nightly import NightlyConfig, run_nightly

    fs = store(s3)
    rows = [dict(r, id=f"d1-{r['id']}") for r in corpus_rows(12)]
    upload(fs, write_corpus(tmp_path / "c", rows, files=2, row_group_size=5), "nightly/corpus/date=2026-11-01")
    config = NightlyConfig(corpus=uri(s3, "nightly/corpus"), output=str(tmp_path / "out"),
                           annotators=[{"name": "topic", "task": "classify", "model": str(checkpoints["classify"])}])
    first = run_nightly(config)
    assert first["status"] == "succeeded" and first["new"] == ["date=2026-11-01"] and first["rows_labeled"] == 12
    table = pads.dataset(str(tmp_path / "out" / "date=2026-11-01"), format="parquet").to_table()
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in rows)
    assert table.column("topic_error").null_count == 12
    assert run_nightly(config)["unchanged"] == ["date=2026-11-01"]  # the listing's sizes and times fingerprint it
