"""On a CUDA GPU (skipped without one): the replica, a one-GPU Ray Data pool, the endpoint with num_gpus."""

import socket

import pytest
import requests
import torch

from pipelines.config import LabelConfig
from pipelines.corpus.job import run_label_job
from pipelines.replica import BloomReplica
from tests.pipelines.conftest import corpus_rows

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_replica_on_gpu_labels_as_on_cpu(checkpoints):
    rows = corpus_rows(6)
    for task in ("generate", "classify", "ner"):
        config = LabelConfig(task=task, model=str(checkpoints[task]), dtype="float32", max_new_tokens=6)
        gpu, cpu = BloomReplica(config, device="cuda"), BloomReplica(config, device="cpu")
        assert gpu.model.device.type == "cuda"
        for a, b in zip(gpu.label_rows(rows), cpu.label_rows(rows)):
            assert a.get("error") is None and a.get("label") == b.get("label")
            assert a.get("generated_text") == b.get("generated_text")


def test_the_gpu_replica_sizes_its_cache_against_the_gpus_free_memory(checkpoints):
    from bloom.engine import fit_cache_tokens, free_memory

    config = LabelConfig(task="generate", model=str(checkpoints["generate"]), dtype="float32", max_new_tokens=6)
    rep = BloomReplica(config, device="cuda")
    cache = rep.engine.cache
    assert cache.keys[0].device.type == "cuda" and cache.num_slots == 64  # a tiny model: 64 fit easily
    # no more than half of what was free before the cache was allocated
    assert cache.nbytes <= 0.5 * (free_memory(torch.device("cuda")) + cache.nbytes)
    # Where half the GPU's free memory holds fewer than 64, fewer are taken.
    per_slot = cache.nbytes // cache.num_slots
    assert fit_cache_tokens(rep.model, cache.max_seq_len, free=lambda d: 2 * 3 * per_slot) == 3 * cache.max_seq_len


def test_a_one_gpu_actor_pool_labels_the_corpus(ray_cluster, checkpoints, corpus, tmp_path):
    import ray

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the test session's Ray sees no GPU")
    report = run_label_job(LabelConfig(task="classify", model=str(checkpoints["classify"]), input=[str(corpus)],
                                       output=str(tmp_path / "out"), num_gpus_per_actor=1))
    assert report["pool"]["num_gpus"] == 1 and report["rows_out"] == report["rows_in"] == 60


def test_the_endpoint_on_a_gpu_replica(ray_cluster, checkpoints):
    import ray
    from ray import serve

    from pipelines.serve import BloomEndpoint

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the test session's Ray sees no GPU")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    tasks = {t: {"model": str(checkpoints[t])} for t in ("generate", "classify")}
    serve.run(BloomEndpoint.options(ray_actor_options={"num_cpus": 0.5, "num_gpus": 1}).bind(tasks=tasks),
              name="gpu", route_prefix="/")
    try:
        base = f"http://127.0.0.1:{port}"
        assert requests.post(base + "/v1/classify", json={"inputs": "hello"}, timeout=120).status_code == 200
        done = requests.post(base + "/v1/completions", json={"prompt": "hello", "max_tokens": 4}, timeout=120)
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] <= 4
    finally:
        serve.delete("gpu")
        serve.shutdown()
