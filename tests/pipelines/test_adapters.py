"""LoRA adapters in the labeling job: per row (--adapter-column) or for the whole job (--use-adapter), for
generate, zero-shot classify and a head; each row equals its adapter alone; the adapters' bytes enter the
run's fingerprint; an unknown adapter is one row's error."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import bloom
from bloom.engine import Engine
from bloom.lora import AdapterBank
from jobs.label_corpus import parse_args
from pipelines import adapters as adapters_mod
from pipelines.config import LabelConfig
from pipelines.corpus.job import check_job, plan_label_job, run_label_job
from pipelines.replica import BloomReplica
from pipelines.tasks import TASKS
from tests.pipelines.conftest import SAMPLE_TEXT

peft = pytest.importorskip("peft")
from tests.bloom.test_lora import ALL, write_adapter  # noqa: E402  (needs peft)

ROW_ADAPTERS = ["fr", None, "legal", "", "fr", "nope", "legal", None]


def lora(base, root, seed: int, **kw):
    """Two LoRA adapters of `base` that differ in rank, alpha, rslora and targets, written by PEFT."""
    return {"fr": write_adapter(base, root / "fr", seed, r=4, lora_alpha=8, target_modules=ALL, **kw),
            "legal": write_adapter(base, root / "legal", seed + 1, r=8, lora_alpha=16, use_rslora=True,
                                   target_modules=["query_key_value", "dense_4h_to_h"], **kw)}


@pytest.fixture(scope="module")
def gen_adapters(checkpoints, tmp_path_factory):
    return lora(checkpoints["generate"], tmp_path_factory.mktemp("gen-lora"), 1)


def declare(paths: dict) -> list[str]:
    return [f"{name}={path}" for name, path in paths.items()]


def rows(n: int = len(ROW_ADAPTERS)) -> list[dict]:
    return [{"id": f"r{i}", "text": SAMPLE_TEXT[i % len(SAMPLE_TEXT)], "adapter": ROW_ADAPTERS[i % len(ROW_ADAPTERS)]}
            for i in range(n)]


def engine_alone(config: LabelConfig, paths: dict, text: str, adapter: str | None) -> str:
    """The reference: a plain bloom Engine with only this adapter declared, generating this row alone."""
    model = bloom.BloomForCausalLM.from_pretrained(config.model, dtype="float32")
    tokenizer = bloom.BloomTokenizerFast.from_pretrained(config.model)
    bank = AdapterBank(model)
    if adapter:
        bank.add(adapter, paths[adapter])
    engine = Engine(model, tokenizer, cache_tokens=512, max_seq_len=256, adapters=bank)
    params = dataclasses.replace(TASKS["generate"].generation_params(config, text), adapter=adapter or None)
    (seq,) = engine.generate([tokenizer.encode(text)], [params])
    return tokenizer.decode(seq.output_ids, skip_special_tokens=True)


def test_flags_declare_adapters_and_choose_them(tmp_path):
    config, _ = parse_args(["--adapter", "fr=/a/fr", "--adapter", "legal=s3://b/legal", "--use-adapter", "fr",
                            "--adapter-column", "lang"])
    assert (config.adapters, config.adapter, config.adapter_column) == (["fr=/a/fr", "legal=s3://b/legal"], "fr", "lang")
    with pytest.raises(ValueError, match="adapter 'de' is not declared"):
        LabelConfig(adapters=["fr=/a/fr"], adapter="de")
    with pytest.raises(ValueError, match="not NAME=PATH"):
        LabelConfig(adapters=["/a/fr"])
    with pytest.raises(ValueError, match="declared twice"):
        LabelConfig(adapters=["fr=/a", "fr=/b"])
    with pytest.raises(ValueError, match="no adapter is declared"):
        LabelConfig(adapter_column="lang")
    # Replicas run in other working directories: relative local paths become absolute, others stay.
    assert adapters_mod.absolute(["fr=a/fr", "legal=s3://b/legal", "x=/abs/x"], "/base") == \
        ["fr=/base/a/fr", "legal=s3://b/legal", "x=/abs/x"]


def test_declared_adapters_that_no_row_uses_are_refused(checkpoints, gen_adapters, tmp_path):
    with pytest.raises(ValueError, match="no row uses one"):
        check_job(LabelConfig(model=str(checkpoints["generate"]), output=str(tmp_path), adapters=declare(gen_adapters)))
    with pytest.raises(ValueError, match="adapter_dir is the endpoint's"):
        check_job(LabelConfig(model=str(checkpoints["generate"]), output=str(tmp_path), adapter_dir=str(tmp_path)))


def test_a_refused_or_missing_adapter_is_one_line_before_ray(checkpoints, corpus, gen_adapters, tmp_path):
    dora = shutil.copytree(gen_adapters["fr"], tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    common = dict(model=str(checkpoints["generate"]), input=[str(corpus)], output=str(tmp_path / "out"), adapter="fr")
    with pytest.raises(ValueError, match=r"adapter 'fr' .*use_dora = True is not supported"):
        plan_label_job(LabelConfig(**common, adapters=[f"fr={dora}"]))
    with pytest.raises(FileNotFoundError, match=r"adapter 'fr' .*does not exist"):
        plan_label_job(LabelConfig(**common, adapters=[f"fr={tmp_path / 'nowhere'}"]))
    other = shutil.copytree(gen_adapters["fr"], tmp_path / "other")
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/bloom-7b1"}))
    with pytest.raises(ValueError, match="trained on base model 'org/bloom-7b1'"):
        plan_label_job(LabelConfig(**common, adapters=[f"fr={other}"]))


def test_job_rows_with_adapters_equal_each_adapter_alone(ray_cluster, checkpoints, gen_adapters, tmp_path):
    """Rows of 2 adapters and of the base model, mixed in one engine by --adapter-column, each equal to a
    plain engine running that adapter alone (float32, greedy); an unknown name errs that row only."""
    fr = shutil.copytree(gen_adapters["fr"], tmp_path / "fr")  # its bytes change below
    paths = {"fr": fr, "legal": gen_adapters["legal"]}
    data = rows()
    (tmp_path / "in").mkdir()
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "in" / "part.parquet")
    config = LabelConfig(task="generate", model=str(checkpoints["generate"]), input=[str(tmp_path / "in")],
                         output=str(tmp_path / "out"), dtype="float32", max_new_tokens=6, adapters=declare(paths),
                         adapter_column="adapter", num_actors=1, min_actors=1, max_errored_fraction=0.5)
    report = run_label_job(config)
    assert report["errored_rows"] == 1
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    differs = 0
    for row in data:
        got = out[row["id"]]
        if row["adapter"] == "nope":
            assert "unknown adapter 'nope'" in got["error"] and got["generated_text"] is None
            continue
        assert got["error"] is None
        expected = engine_alone(config, paths, row["text"], row["adapter"] or None)
        assert got["generated_text"] == expected, row
        differs += bool(row["adapter"]) and expected != engine_alone(config, paths, row["text"], None)
    assert differs >= 2  # the adapters change what is generated: the comparison can tell them apart

    # The same run resumes (nothing to do); with other bytes in adapter fr it is refused, naming it.
    assert plan_label_job(config).finished
    before = plan_label_job(config).fingerprint
    write_adapter(checkpoints["generate"], fr, 99, r=4, lora_alpha=8, target_modules=ALL)
    planned = plan_label_job(config)
    assert planned.fingerprint != before and not planned.finished
    with pytest.raises(ValueError, match="adapter 'fr': other bytes"):
        run_label_job(config, planned)


def replica_rows(replica: BloomReplica, data: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(each row labeled in one mixed batch, each row alone with its adapter as the job's --use-adapter,
    each row alone on the base model)."""
    mixed = replica.label_rows(data)
    alone = [replica.label_rows([{**r, "adapter": None}], [{"adapter": r["adapter"] or None}])[0] for r in data]
    base = [replica.label_rows([{**r, "adapter": None}])[0] for r in data]
    return mixed, alone, base


def log_scores(scored: list) -> torch.Tensor:
    # In log space: the tiny model's zero-shot probabilities are near 0 and 1.
    return torch.tensor([s["score"] for s in scored], dtype=torch.float64).clamp_min(1e-30).log()


def assert_scores_close(a: list, b: list):
    torch.testing.assert_close(log_scores(a), log_scores(b), atol=1e-4, rtol=1e-4)


def test_zero_shot_classify_mixes_adapters_per_row(checkpoints, gen_adapters):
    config = LabelConfig(task="classify", model=str(checkpoints["generate"]), dtype="float32",
                         candidate_labels=["sports", "politics", "science news"], adapters=declare(gen_adapters),
                         adapter_column="adapter")
    replica = BloomReplica(config, device="cpu")
    data = [r for r in rows() if r["adapter"] != "nope"]
    mixed, alone, base = replica_rows(replica, data)
    for m, a, b, r in zip(mixed, alone, base, data):
        assert m.get("error") is None
        assert_scores_close(m["scores"], a["scores"])
        if r["adapter"]:
            assert (log_scores(m["scores"]) - log_scores(b["scores"])).abs().max() > 0.1
    bad = replica.label_rows(rows())[ROW_ADAPTERS.index("nope")]
    assert bad["error_code"] == "unknown_adapter" and "nope" in bad["error"]



def test_zero_shot_prefix_reuse_runs_the_shared_prefix_under_the_rows_adapter(checkpoints, gen_adapters):
    # Every row under one few-shot template and one adapter: the template runs once, with the adapter.
    template = "Examples: the match ended late; a vote was held; a new cell was found. Text: {text}\nTopic:"
    scores = {}
    for reuse in (True, False):
        config = LabelConfig(task="classify", model=str(checkpoints["generate"]), dtype="float32",
                             candidate_labels=["sports", "politics", "science news"], adapters=declare(gen_adapters),
                             adapter="fr", prompt_template=template, prefix_cache=reuse)
        scores[reuse] = [r["scores"] for r in BloomReplica(config, device="cpu").label_rows(rows(6))]
    base = LabelConfig(task="classify", model=str(checkpoints["generate"]), dtype="float32",
                       candidate_labels=["sports", "politics", "science news"], prompt_template=template)
    plain = [r["scores"] for r in BloomReplica(base, device="cpu").label_rows(rows(6))]
    for on, off, b in zip(scores[True], scores[False], plain):
        assert_scores_close(on, off)
        assert (log_scores(on) - log_scores(b)).abs().max() > 0.1  # the adapter did run

def test_a_token_classification_checkpoint_takes_adapters_of_its_body(checkpoints, tmp_path):
    paths = lora(checkpoints["ner"], tmp_path, 5, cls_name="BloomForTokenClassification", task_type=None)
    config = LabelConfig(task="ner", model=str(checkpoints["ner"]), dtype="float32", adapters=declare(paths),
                         adapter_column="adapter", ignore_labels=[])
    replica = BloomReplica(config, device="cpu")
    data = [r for r in rows() if r["adapter"] != "nope"]
    mixed, alone, base = replica_rows(replica, data)
    changed = 0
    for m, a, b, r in zip(mixed, alone, base, data):
        assert m.get("error") is None and m["entities"]
        assert [e["entity_group"] for e in m["entities"]] == [e["entity_group"] for e in a["entities"]]
        assert_scores_close(m["entities"], a["entities"])
        changed += bool(r["adapter"]) and [e["score"] for e in m["entities"]] != [e["score"] for e in b["entities"]]
    assert changed >= 2


def test_adapters_on_s3_are_fetched_by_digest_and_label_as_local_ones(checkpoints, gen_adapters, tmp_path,
                                                                         monkeypatch):
    """An s3:// adapter (a real S3 server on loopback) is hashed for the fingerprint from the store and read
    through pipelines.storage into <adapter_cache>/<digest>/; rows labeled with it equal the local copy's."""
    import pyarrow.fs as pafs

    from tests.pipelines.conftest import S3_CREDENTIALS, moto_server, store, uri

    for k, v in S3_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    with moto_server() as endpoint:
        fs = store(endpoint)
        fs.create_dir("adapters")
        pafs.copy_files(str(gen_adapters["fr"]), "adapters/fr", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        common = dict(task="classify", model=str(checkpoints["generate"]), dtype="float32",
                      candidate_labels=["sports", "politics"], adapter="fr", adapter_cache=str(tmp_path / "cache"))
        remote = LabelConfig(**common, adapters=[f"fr={uri(endpoint, 'adapters/fr')}"])
        local = LabelConfig(**common, adapters=[f"fr={gen_adapters['fr']}"])
        assert adapters_mod.fingerprints(remote) == adapters_mod.fingerprints(local)
        data = [{"text": t} for t in SAMPLE_TEXT[:3]]
        got = BloomReplica(remote, device="cpu").label_rows(data)
        (cached,) = (tmp_path / "cache").iterdir()
        assert cached.name == adapters_mod.fingerprints(local)["fr"]
        assert (cached / "adapter_model.safetensors").read_bytes() == \
            (gen_adapters["fr"] / "adapter_model.safetensors").read_bytes()
    for a, b in zip(got, BloomReplica(local, device="cpu").label_rows(data)):
        assert_scores_close(a["scores"], b["scores"])
