"""Which Ray the jobs use, beside another Ray started with `ray start --head` on the same machine: their
own local Ray unless told to join (--address / RAY_ADDRESS), a bounded wait for a cluster that does not
answer, one-line errors, bad input found before Ray starts, and no Ray at all for a finished run."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import bloom
from bloom.tiny import make_tiny_checkpoint
from tests.jobs.test_serve_bloom import classify_serve_config, serve_then_stop
from tests.jobs.test_submit import free_port, ray_head
from tests.pipelines.conftest import corpus_rows, write_corpus

ROOT = Path(__file__).resolve().parents[2]
LABEL, NIGHTLY, SERVE = (str(ROOT / "jobs" / name) for name in ("label_corpus.py", "nightly_annotate.py", "serve_bloom.py"))
RAY_STARTED = "Started a local Ray instance"  # what Ray prints when a process starts one


@pytest.fixture(scope="module")
def beside():
    """The machine of a user who ran `ray start --head` before our job: the head's address recorded in
    $RAY_TMPDIR/ray/ray_current_cluster, where a bare `ray.init()` finds and joins it; RAY_ADDRESS unset.
    Yields (the environment, the head's dashboard address)."""
    root = Path("/tmp") / f"rh-{os.getpid()}-{time.time_ns() % 10**6}"  # short: Ray's socket paths are limited
    with ray_head(root / "ray") as (address, env, _):
        assert (root / "ray" / "ray_current_cluster").is_file()
        yield {**env, "RAY_TMPDIR": str(root), "PYTHONPATH": str(ROOT)}, address
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("clf") / "m", bloom.BloomForSequenceClassification,
                                id2label={0: "neg", 1: "pos"})


def run(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def drivers_seen_by(address: str) -> list:
    from ray.job_submission import JobSubmissionClient

    return [j for j in JobSubmissionClient(address).list_jobs() if str(j.type).endswith("DRIVER")]


def test_the_label_job_labels_on_its_own_ray_and_a_rerun_starts_none(beside, model, tmp_path):
    env, address = beside
    corpus, out = write_corpus(tmp_path / "corpus", corpus_rows(12)), tmp_path / "out"
    args = [LABEL, "--task", "classify", "--model", str(model), "--input", str(corpus), "--output", str(out)]
    done = run(args, env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "started a local Ray of its own" in done.stderr and "classify: 12/12 rows" in done.stdout
    assert drivers_seen_by(address) == []  # the other Ray never saw this job
    again = run(args, env)
    assert again.returncode == 0 and "classify: 12/12 rows" in again.stdout, again.stderr[-3000:]
    assert RAY_STARTED not in again.stdout + again.stderr and "local Ray" not in again.stderr


def test_the_nightly_job_labels_on_its_own_ray_and_a_rerun_starts_none(beside, model, tmp_path):
    env, address = beside
    write_corpus(tmp_path / "corpus" / "date=2026-11-01", corpus_rows(8))
    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump({"corpus": str(tmp_path / "corpus"), "output": str(tmp_path / "out"),
                                      "annotators": [{"name": "s", "task": "classify", "model": str(model)}]}))
    done = run([NIGHTLY, "--config", str(config)], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "started a local Ray of its own" in done.stderr and "labeled 1 new" in done.stdout
    assert drivers_seen_by(address) == []
    again = run([NIGHTLY, "--config", str(config)], env)
    assert again.returncode == 0 and "labeled 0 new and 0 changed" in again.stdout, again.stderr[-3000:]
    assert RAY_STARTED not in again.stdout + again.stderr and "local Ray" not in again.stderr


def test_the_endpoint_serves_on_its_own_ray(beside, model, tmp_path):
    env, address = beside
    serve_env = {k: v for k, v in env.items() if k != "BLOOMLINE_API_KEY"}

    def no_driver_beside():
        assert drivers_seen_by(address) == []

    returncode, out, err = serve_then_stop(classify_serve_config(tmp_path, model), serve_env, signal.SIGTERM,
                                           while_serving=no_driver_beside)
    assert returncode == 0 and "started a local Ray of its own" in err, err[-2000:]


@pytest.mark.parametrize("job", ["label", "nightly", "serve"])
def test_a_cluster_that_does_not_answer_is_one_line_and_exit_2(model, tmp_path, job):
    corpus = write_corpus(tmp_path / "corpus" / "date=2026-11-01", corpus_rows(4))
    config = tmp_path / "job.yaml"
    if job == "label":
        args = [LABEL, "--task", "classify", "--model", str(model), "--input", str(corpus), "--output", str(tmp_path / "o")]
    elif job == "nightly":
        config.write_text(yaml.safe_dump({"corpus": str(tmp_path / "corpus"), "output": str(tmp_path / "o"),
                                          "annotators": [{"name": "s", "task": "classify", "model": str(model)}]}))
        args = [NIGHTLY, "--config", str(config)]
    else:
        serve = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
        serve["applications"][0]["args"]["tasks"] = {"classify": {"model": str(model)}}
        config.write_text(yaml.safe_dump(serve))
        args = [SERVE, "--config", str(config)]
    gone = f"127.0.0.1:{free_port()}"  # nobody listens there: a head that has stopped
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "rt"), "PYTHONPATH": str(ROOT)}
    for how in (["--address", gone], []):  # the flag, or RAY_ADDRESS
        done = run([*args, *how, "--ray-connect-timeout", "2"], {**env, **({} if how else {"RAY_ADDRESS": gone})},
                   timeout=120)
        assert done.returncode == 2, done.stderr[-3000:]
        assert f"the Ray cluster at {gone} cannot be reached" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "rt").exists()  # no Ray was started instead


def test_ray_num_cpus_with_a_cluster_to_join_is_refused_in_one_line(model, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", corpus_rows(4))
    done = run([LABEL, "--task", "classify", "--model", str(model), "--input", str(corpus), "--output",
                str(tmp_path / "o"), "--address", "127.0.0.1:1", "--ray-num-cpus", "2"],
               {**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 2 and "--ray-num-cpus sizes a local Ray" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_a_local_ray_that_fails_to_start_is_one_line_saying_what_to_try(model, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", corpus_rows(4))
    temp = Path("/tmp") / ("bloomline-" + "x" * 100)  # Ray's socket paths under it are too long: its start fails
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        done = run([LABEL, "--task", "classify", "--model", str(model), "--input", str(corpus), "--output",
                    str(tmp_path / "o")], {**env, "RAY_TMPDIR": str(temp), "PYTHONPATH": str(ROOT)}, timeout=180)
    finally:
        subprocess.run(["rm", "-rf", str(temp)])
    assert done.returncode == 2, done.stderr[-3000:]
    line = [l for l in done.stderr.splitlines() if l.startswith("label_corpus:")]
    assert line and "could not start a local Ray" in line[0] and "try again" in line[0]
    assert "Traceback" not in done.stderr


def test_bad_input_is_found_before_ray_starts(model, tmp_path):
    corpus = write_corpus(tmp_path / "corpus", corpus_rows(4))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.parquet").write_bytes(b"PAR1 this is not parquet")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=str(tmp_path / "rt"), PYTHONPATH=str(ROOT))
    base = [LABEL, "--task", "classify", "--model", str(model), "--output", str(tmp_path / "o")]
    for extra, why in ((["--input", str(corpus), "--text-column", "body"], "has no column 'body'"),
                       (["--input", str(broken)], "cannot read Parquet file"),
                       (["--input", str(tmp_path / "missing")], "does not exist")):
        done = run([*base, *extra], env, timeout=120)
        assert done.returncode == 2 and why in done.stderr, done.stderr[-3000:]
        assert len(done.stderr.strip().splitlines()) == 1 and RAY_STARTED not in done.stdout + done.stderr
    assert not (tmp_path / "rt").exists() and not (tmp_path / "o").exists()


def test_the_cluster_to_join_is_the_users_choice(monkeypatch):
    from pipelines import RayUnavailable, cluster_address, wait_reachable

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(None) is None and cluster_address(None, 2) is None  # a local Ray of its own
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster_address(None) == "10.0.0.1:6379" and cluster_address("10.0.0.2:6379") == "10.0.0.2:6379"
    assert cluster_address("local") is None  # the flag wins over the environment
    with pytest.raises(ValueError, match="--ray-num-cpus sizes a local Ray"):
        cluster_address(None, 2)
    with pytest.raises(RayUnavailable, match="dashboard address"):
        wait_reachable("http://127.0.0.1:8265", 1)
