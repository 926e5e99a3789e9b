"""LoRA adapters over real HTTP: OpenAI's model "generate:<adapter>", the REST parameter `adapter`,
/v1/models listing them, adapters found in adapter_dir on first use, and 404 for an unknown one."""

from __future__ import annotations

import json

import pytest
import requests

from pipelines.config import LabelConfig
from pipelines.replica import BloomReplica
from tests.pipelines.conftest import corpus_rows

peft = pytest.importorskip("peft")
from tests.bloom.test_lora import ALL, write_adapter  # noqa: E402  (needs peft)
from tests.pipelines.serve import endpoint

LABELS = ["sports", "politics", "science news"]
CHAT = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the prompt is the message's text


@pytest.fixture(scope="module")
def lora(checkpoints, tmp_path_factory):
    """fr and legal declared; ondisk only in the adapter directory (all written by PEFT)."""
    root, base = tmp_path_factory.mktemp("serve-lora"), checkpoints["generate"]
    broken = write_adapter(base, root / "dir" / "broken", 14, r=2, lora_alpha=4, target_modules=ALL)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))  # refused by bloom.lora
    return {"fr": write_adapter(base, root / "fr", 11, r=4, lora_alpha=8, target_modules=ALL),
            "legal": write_adapter(base, root / "legal", 12, r=8, lora_alpha=16, target_modules=ALL),
            "ondisk": write_adapter(base, root / "dir" / "ondisk", 13, r=2, lora_alpha=4, target_modules=ALL)}


@pytest.fixture(scope="module")
def server(ray_cluster, checkpoints, lora):
    common = {"model": str(checkpoints["generate"]), "dtype": "float32", "max_input_tokens": 200,
              "adapters": [f"{n}={lora[n]}" for n in ("fr", "legal")], "adapter_dir": str(lora["ondisk"].parent)}
    tasks = {"generate": {**common, "max_new_tokens": 6, "chat_template": CHAT},
             "classify": {**common, "candidate_labels": LABELS}}
    with endpoint("bloomline-lora", tasks, max_new_tokens_cap=64) as url:
        yield url, tasks


def offline(server, lora, task: str, adapter: str | None, rows: list[dict]) -> list[dict]:
    """What the labeling job writes for these rows with this adapter (--use-adapter)."""
    settings = {k: v for k, v in server[1][task].items() if k != "chat_template"} | {"adapter_dir": ""}
    if adapter == "ondisk":
        settings["adapters"] = [*settings["adapters"], f"ondisk={lora['ondisk']}"]
    return BloomReplica(LabelConfig(task=task, **settings, adapter=adapter), device="cpu").label_rows(rows)


def test_openai_model_names_the_adapter(server, lora):
    import openai

    client = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused")
    rows = corpus_rows(3)
    for adapter in ("fr", "ondisk", None):  # declared, found in adapter_dir on first use, the base model
        model = f"generate:{adapter}" if adapter else "generate"
        done = client.completions.create(model=model, prompt=[r["text"] for r in rows], max_tokens=6, temperature=0)
        assert done.model == model
        texts = [c.text for c in sorted(done.choices, key=lambda c: c.index)]
        assert texts == [r["generated_text"] for r in offline(server, lora, "generate", adapter, rows)]
        if adapter is None:
            base = texts
    fr = [r["generated_text"] for r in offline(server, lora, "generate", "fr", rows)]
    assert fr != base  # the adapter changes the text: the comparison tells adapters apart
    ids = [m.id for m in client.models.list().data]
    assert ids == ["generate", "generate:broken", "generate:fr", "generate:legal", "generate:ondisk",
                   "classify", "classify:broken", "classify:fr", "classify:legal", "classify:ondisk"]
    assert client.models.retrieve("generate:legal").id == "generate:legal"


def test_streams_and_chat_take_the_adapter_too(server, lora):
    import openai

    client = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused")
    row = corpus_rows(1)[0]
    want = offline(server, lora, "generate", "legal", [row])[0]["generated_text"]
    chunks = client.completions.create(model="generate:legal", prompt=row["text"], max_tokens=6, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == want
    chat = client.chat.completions.create(model="generate:legal", messages=[{"role": "user", "content": row["text"]}],
                                          max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == want and chat.model == "generate:legal"


def test_rest_parameter_adapter_for_generate_and_classify(server, lora):
    rows = corpus_rows(2)
    got = requests.post(server[0] + "/v1/generate", json={"inputs": [r["text"] for r in rows],
                                                          "parameters": {"adapter": "legal"}}, timeout=60)
    assert got.status_code == 200, got.text
    want = offline(server, lora, "generate", "legal", rows)
    assert [r["generated_text"] for r in got.json()["results"]] == [r["generated_text"] for r in want]
    # Routed by Serve's multiplexing header to a replica that holds the adapter; the body still decides.
    got = requests.post(server[0] + "/v1/classify", json={"inputs": rows[0]["text"], "parameters": {"adapter": "fr"}},
                        headers={"serve_multiplexed_model_id": "classify:fr"}, timeout=60)
    assert got.status_code == 200, got.text
    want = offline(server, lora, "classify", "fr", rows[:1])[0]
    assert got.json()["label"] == want["label"]
    assert [s["score"] for s in got.json()["scores"]] == pytest.approx([s["score"] for s in want["scores"]], abs=1e-5)


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"model": "generate:nope", "prompt": "Hello", "max_tokens": 2}, "model"),
    ("/v1/completions", {"model": "generate:", "prompt": "Hello", "max_tokens": 2}, "model"),
    ("/v1/generate", {"inputs": "Hello", "parameters": {"adapter": "nope"}}, "adapter"),
    ("/v1/classify", {"inputs": "Hello", "parameters": {"adapter": "../fr"}}, "adapter"),
])
def test_an_unknown_adapter_is_404_in_the_one_error_shape(server, route, body, param):
    got = requests.post(server[0] + route, json=body, timeout=60)
    assert got.status_code == 404, got.text
    error = got.json()["error"]
    assert error["param"] == param and ("not served" in error["message"] or "unknown adapter" in error["message"])
    assert set(error) == {"message", "type", "param", "code"}
    missing = requests.get(server[0] + "/v1/models/generate:nope", timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_an_adapter_that_cannot_load_is_one_request_s_error(server):
    """An adapter_dir entry that bloom.lora refuses (DoRA) fails its request before the engine, naming the
    adapter but no server path; the endpoint keeps serving."""
    got = requests.post(server[0] + "/v1/completions",
                        json={"model": "generate:broken", "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert got.status_code == 500 and "'broken' cannot be loaded" in got.json()["error"]["message"]
    assert "/" not in got.json()["error"]["message"]
    ok = requests.post(server[0] + "/v1/completions", json={"model": "generate:fr", "prompt": "Hi", "max_tokens": 2},
                       timeout=60)
    assert ok.status_code == 200, ok.text
