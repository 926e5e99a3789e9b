"""The embed task: its vectors equal transformers' BloomModel hidden states pooled by SGPT-BLOOM's rule
(and mean and last), alone or in padded batches; the job writes them as a fixed-size list<float32>."""

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

from pipelines.config import LabelConfig
from pipelines.corpus.job import run_label_job
from pipelines.replica import BloomReplica
from tests.pipelines.conftest import corpus_rows


def reference_embedding(model, ids: list[int], pooling: str, normalize: bool) -> np.ndarray:
    """transformers' BloomModel on one unpadded row, pooled literally: weightedmean weighs token t of n
    by t / (1 + ... + n) (SGPT-BLOOM), mean by 1/n, last takes the last token's state."""
    with torch.no_grad():
        h = model(torch.tensor([ids])).last_hidden_state[0].double()  # (n, C)
    n = len(ids)
    if pooling == "weightedmean":
        w = torch.arange(1, n + 1, dtype=torch.float64)
        out = (h * w[:, None]).sum(0) / w.sum()
    elif pooling == "mean":
        out = h.mean(0)
    else:
        out = h[-1]
    return (out / out.norm() if normalize else out).numpy()


@pytest.fixture(scope="module")
def reference(checkpoints):
    import transformers

    # The causal LM's checkpoint: its body loads into the bare model (the LM head is left out).
    return transformers.BloomModel.from_pretrained(checkpoints["generate"], torch_dtype=torch.float32).eval()


@pytest.mark.parametrize("pooling, normalize", [("weightedmean", False), ("mean", False), ("last", False),
                                                ("weightedmean", True)])
def test_embeddings_equal_transformers_hidden_states_pooled_by_the_same_rule(checkpoints, reference, pooling,
                                                                             normalize):
    rep = BloomReplica(LabelConfig(task="embed", model=str(checkpoints["generate"]), dtype="float32",
                                   pooling=pooling, normalize=normalize))
    rep.runtime.length_spread = float("inf")  # one padded batch of every length, by the token budget alone
    rows = corpus_rows(8)
    ids = [rep.tokenizer.encode(r["text"]) for r in rows]
    assert len({len(i) for i in ids}) >= 4  # rows of different lengths, left-padded together
    batched = rep.label_rows(rows)
    alone = [rep.label_rows([row])[0] for row in rows[:3]]
    for row_ids, got in zip(ids, batched):
        assert not got.get("error")
        want = reference_embedding(reference, row_ids, pooling, normalize)
        assert got["input_tokens"] == len(row_ids) and len(got["embedding"]) == reference.config.hidden_size
        np.testing.assert_allclose(np.float32(got["embedding"]), want, atol=1e-5, rtol=0)
    for one, many in zip(alone, batched):  # padding changes nothing
        np.testing.assert_allclose(one["embedding"], many["embedding"], atol=1e-5, rtol=0)
    if normalize:
        assert all(abs(np.linalg.norm(r["embedding"]) - 1) < 1e-5 for r in batched)


def test_the_poolings_differ_and_token_ids_embed_as_their_text(checkpoints):
    reps = {p: BloomReplica(LabelConfig(task="embed", model=str(checkpoints["generate"]), dtype="float32", pooling=p))
            for p in ("weightedmean", "mean", "last")}
    row = corpus_rows(1)[0]
    vectors = {p: np.array(r.label_rows([row])[0]["embedding"]) for p, r in reps.items()}
    assert not np.allclose(vectors["weightedmean"], vectors["mean"], atol=1e-4)
    assert not np.allclose(vectors["mean"], vectors["last"], atol=1e-4)
    rep = reps["mean"]
    ids = rep.tokenizer.encode(row["text"])
    by_ids, empty, outside = rep.label_rows([{"text": ids}, {"text": []}, {"text": [5, 10**6]}])
    np.testing.assert_allclose(by_ids["embedding"], vectors["mean"], atol=1e-6)
    assert empty["error"] == "input has no tokens" and empty.get("embedding") is None
    assert outside["error"] == "token id 1000000 at 1 is not in the vocabulary [0, 512)"


def test_long_rows_are_errors_or_truncated_as_too_long_says(checkpoints):
    long = {"text": " ".join(r["text"] for r in corpus_rows(6))}
    err = BloomReplica(LabelConfig(task="embed", model=str(checkpoints["generate"]), max_input_tokens=16))
    (out,) = err.label_rows([long])
    assert out["error"].endswith("over the limit of 16") and out["error_code"] == "too_long"
    cut = BloomReplica(LabelConfig(task="embed", model=str(checkpoints["generate"]), max_input_tokens=16,
                                   too_long="truncate", dtype="float32"))
    (out,) = cut.label_rows([long])
    first16 = cut.tokenizer.encode(long["text"])[:16]
    assert out["truncated"] and out["embedding"] == cut.label_rows([{"text": first16}])[0]["embedding"]


def test_the_job_writes_a_fixed_size_float32_embedding_column(ray_cluster, checkpoints, corpus, tmp_path):
    import pyarrow as pa

    cfg = LabelConfig(task="embed", model=str(checkpoints["generate"]), input=[str(corpus)],
                      output=str(tmp_path / "out"), rows_per_batch=16, normalize=True)
    report = run_label_job(cfg)
    out = pads.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert report["status"] == "succeeded" and out.num_rows == 60
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert out.column("error").null_count == 60
    vectors = np.stack(out.column("embedding").to_numpy(zero_copy_only=False))
    assert vectors.shape == (60, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    # the settings that decide the vectors enter the fingerprint
    m = "model"
    assert LabelConfig(task="embed", pooling="mean").fingerprint(m) != LabelConfig(task="embed").fingerprint(m)
    assert LabelConfig(task="embed", normalize=True).fingerprint(m) != LabelConfig(task="embed").fingerprint(m)
