"""The Serve endpoint over real HTTP on 127.0.0.1: every route, answers equal to the offline replica's,
the openai client, limits, auth, and batching of concurrent clients."""

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from pipelines.config import LabelConfig
from pipelines.replica import BloomReplica
from tests.pipelines.conftest import corpus_rows
from tests.pipelines.serve import endpoint

ROOT = Path(__file__).resolve().parents[3]
KEY = "test-key-123"
TASK_SETTINGS = {"generate": {"max_new_tokens": 6, "dtype": "float32"}, "classify": {}, "ner": {}, "qa": {}}


@pytest.fixture(scope="module")
def server(ray_cluster, checkpoints):
    tasks = {t: {"model": str(checkpoints[t]), "max_input_tokens": 200, **TASK_SETTINGS[t]} for t in TASK_SETTINGS}
    with endpoint("bloomline", tasks, KEY, max_body_bytes=20_000, max_new_tokens_cap=64) as url:
        yield url, tasks


def post(server, route, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(server[0] + route, json=body, headers=headers, timeout=60, **kw)


@pytest.mark.parametrize("task", ["generate", "classify", "ner"])
def test_text_routes_equal_the_offline_replica(server, task):
    rows = corpus_rows(4)
    answer = post(server, f"/v1/{task}", {"inputs": [r["text"] for r in rows]})
    assert answer.status_code == 200, answer.text
    offline = BloomReplica(LabelConfig(task=task, **server[1][task])).label_rows(rows)
    for got, want in zip(answer.json()["results"], offline):
        for key, value in got.items():
            if isinstance(value, float):
                assert value == pytest.approx(want.get(key), abs=1e-4), key
            elif key in ("scores", "entities"):
                assert len(value) == len(want[key])
            else:
                assert value == want.get(key), key
    single = post(server, f"/v1/{task}", {"inputs": rows[0]["text"]}).json()  # one item in, one object out
    first = answer.json()["results"][0]
    assert single.keys() == first.keys()
    assert all(single[k] == pytest.approx(v, abs=1e-4) if isinstance(v, float) else True for k, v in first.items())


def test_qa_route_and_per_request_parameters(server):
    item = {"question": "Who is named?", "context": corpus_rows(1)[0]["context"]}
    answer = post(server, "/v1/qa", {"inputs": item, "parameters": {"max_answer_len": 3}})
    assert answer.status_code == 200, answer.text
    offline = BloomReplica(LabelConfig(task="qa", **server[1]["qa"], max_answer_len=3)).label_rows([item])[0]
    assert (answer.json()["start"], answer.json()["end"]) == (offline["start"], offline["end"])
    ner = post(server, "/v1/ner", {"inputs": "Ada Obi lives in Lima.", "parameters": {"aggregation_strategy": "none"}})
    assert ner.status_code == 200 and all(e["word"] for e in ner.json()["entities"])


def test_openai_client_completions(server):
    import openai

    client = openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY)
    done = client.completions.create(model="generate", prompt="The quick brown fox", max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens <= 5
    offline = BloomReplica(LabelConfig(task="generate", **{**server[1]["generate"], "max_new_tokens": 5}))
    assert done.choices[0].text == offline.label_rows([{"text": "The quick brown fox"}])[0]["generated_text"]
    chunks = list(client.completions.create(model="generate", prompt="The quick brown fox", max_tokens=5,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    assert sum(1 for c in chunks if c.choices[0].text) > 1  # token by token, not one block
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason
    too_long = post(server, "/v1/completions", {"prompt": "word " * 300, "max_tokens": 2, "stream": True})
    assert too_long.status_code == 400 and "limit of 200" in too_long.json()["error"]["message"]
    assert [m.id for m in client.models.list().data] == list(server[1])


def _by_choice(chunks):
    """A stream's chunks → {index: (text, logprobs joined, finish_reason)}."""
    out = {}
    for chunk in chunks:
        for c in chunk.choices:
            text, logprobs, _ = out.get(c.index, ("", None, None))
            if c.logprobs is not None:
                piece = c.logprobs.model_dump()
                logprobs = piece if logprobs is None else {k: logprobs[k] + piece[k] for k in logprobs}
            out[c.index] = (text + c.text, logprobs, c.finish_reason)
    return out


def test_openai_client_n_logprobs_and_echo_streamed_and_not(server):
    """n choices per prompt (indexed i * n + j), logprobs of the chosen and top tokens with their text
    offsets, the prompt echoed with its own logprobs; the stream carries the same, and usage counts each
    prompt once."""
    import openai

    client = openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY)
    prompts = ["The quick brown fox", "Ada Obi flew to Lima and"]
    # The client's no-op values of what we do not implement are accepted.
    ask = dict(model="generate", prompt=prompts, max_tokens=6, temperature=0, n=3, logprobs=2, echo=True,
               frequency_penalty=0, presence_penalty=0, best_of=None, logit_bias={}, suffix=None)
    done = client.completions.create(**ask)
    assert [c.index for c in done.choices] == list(range(6))
    replica = BloomReplica(LabelConfig(task="generate", **{**server[1]["generate"], "max_new_tokens": 6}))
    prompt_tokens = [len(replica.tokenizer.encode(p)) for p in prompts]
    for i, prompt in enumerate(prompts):
        group = done.choices[3 * i : 3 * i + 3]
        assert len({c.text for c in group}) == 1  # greedy: the n choices are equal
        generated = replica.label_rows([{"text": prompt}])[0]["generated_text"]
        assert group[0].text == prompt + generated  # echo: the prompt, then what it generates alone
        lp = group[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the prompt's first token
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        for token, offset in zip(lp.tokens, lp.text_offset):
            if not token.startswith("bytes:") and offset < len(group[0].text):  # not a piece of a character
                assert group[0].text.startswith(token, offset)
        for k in range(prompt_tokens[i], len(lp.tokens)):  # greedy picks the most likely token
            top = lp.top_logprobs[k]
            assert 2 <= len(top) <= 3 and lp.token_logprobs[k] == pytest.approx(max(top.values()))
        assert all(lp.token_logprobs[k] <= 0 for k in range(1, len(lp.tokens)))
    completion = sum(len(c.logprobs.tokens) for c in done.choices) - 3 * sum(prompt_tokens)
    assert done.usage.prompt_tokens == sum(prompt_tokens)  # once per prompt, not per choice
    assert done.usage.completion_tokens == completion and done.usage.total_tokens == sum(prompt_tokens) + completion

    chunks = list(client.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    streamed = _by_choice(chunks)
    assert sorted(streamed) == list(range(6))
    for c in done.choices:
        text, logprobs, reason = streamed[c.index]
        assert (text, reason) == (c.text, c.finish_reason)
        want = c.logprobs.model_dump()
        assert logprobs["tokens"] == want["tokens"] and logprobs["text_offset"] == want["text_offset"]
        assert logprobs["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-5)
    assert chunks[-1].choices == [] and chunks[-1].usage == done.usage
    assert sum(1 for c in chunks if c.choices and c.choices[0].index == 4) > 2  # token by token

    # Sampled choices differ from each other, and a seed makes them reproducible.
    sampled = dict(model="generate", prompt=prompts[0], max_tokens=8, temperature=1.0, n=3, seed=7)
    first = [c.text for c in client.completions.create(**sampled).choices]
    assert len(set(first)) == 3 and [c.text for c in client.completions.create(**sampled).choices] == first
    # Each token's text is a key of its top_logprobs, also for pieces of a multi-byte character.
    varied = client.completions.create(model="generate", prompt=[prompts[0], "Hello there"], max_tokens=24, n=3,
                                       logprobs=2, temperature=0.8, seed=1)
    for c in varied.choices:
        assert all(t in top for t, top in zip(c.logprobs.tokens, c.logprobs.top_logprobs)), c.logprobs
    # echo with max_tokens 0 scores the prompt without generating.
    scored = client.completions.create(model="generate", prompt=prompts[1], max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].text == prompts[1] and scored.usage.completion_tokens == 0
    assert len(scored.choices[0].logprobs.tokens) == prompt_tokens[1]
    assert [len(t) for t in scored.choices[0].logprobs.top_logprobs[1:]] == [1] * (prompt_tokens[1] - 1)


def _client(server, base=None):
    import openai

    return openai.OpenAI(base_url=(base or server[0]) + "/v1", api_key=KEY, max_retries=0)


def _tokenizer(server):
    import bloom

    return bloom.BloomTokenizerFast.from_pretrained(server[1]["generate"]["model"])


def test_null_means_the_default_as_the_official_client_sends_it(server):
    """OpenAI's spec allows null for every optional field, and the client sends an explicit None as null
    (each was a 422 "Input should be a valid integer")."""
    client, prompt = _client(server), "The quick brown fox"
    nulls = dict(model=None, max_tokens=None, temperature=None, top_p=None, n=None, echo=None, logprobs=None,
                 stop=None, seed=None, stream=None, stream_options=None, best_of=None, logit_bias=None,
                 frequency_penalty=None, presence_penalty=None, suffix=None, user=None)
    default = client.completions.create(model="generate", prompt=prompt, temperature=0)
    assert default.usage.completion_tokens <= 16
    greedy = client.completions.create(prompt=prompt, **{**nulls, "temperature": 0})
    assert [(c.text, c.logprobs) for c in greedy.choices] == [(default.choices[0].text, None)]
    assert greedy.usage == default.usage
    sampled = client.completions.create(prompt=prompt, **nulls)  # temperature null: 1, sampled
    assert len(sampled.choices) == 1 and 0 < sampled.usage.completion_tokens <= 16
    raw = post(server, "/v1/completions", {"prompt": prompt, **{k: None for k in nulls}, "min_tokens": None})
    assert raw.status_code == 200, raw.text


def test_errors_reach_the_official_client_as_its_exceptions(server):
    import openai

    client = _client(server)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="generate", prompt="x", logprobs=6)
    assert (e.value.status_code, e.value.type, e.value.param) == (400, "invalid_request_error", "logprobs")
    with pytest.raises(openai.BadRequestError, match="stream_options: only with stream: true"):
        client.completions.create(model="generate", prompt="x", stream_options={"include_usage": True})
    with pytest.raises(openai.BadRequestError, match="surprise"):
        client.completions.create(model="generate", prompt="x", extra_body={"surprise": 1})
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert (e.value.type, e.value.param) == ("not_found_error", "model")
    with pytest.raises(openai.AuthenticationError):
        _client(server).with_options(api_key="wrong").models.list()
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="generate", prompt="word " * 5000)
    assert e.value.status_code == 413 and "over the limit of 20000" in e.value.message


def test_token_id_prompts_answer_as_their_text_and_are_checked(server):
    """A prompt as token ids, or a list of such lists: answered as the text they stand for, echoed
    decoded, counted in usage; an id outside the vocabulary is a 400 naming its index."""
    import openai

    client, tokenizer = _client(server), _tokenizer(server)
    texts = ["The quick brown fox", "Ada Obi flew to Lima and"]
    ids = [tokenizer.encode(t) for t in texts]
    by_text = client.completions.create(model="generate", prompt=texts, max_tokens=5, temperature=0)
    by_ids = client.completions.create(model="generate", prompt=ids, max_tokens=5, temperature=0, echo=True)
    assert [c.text for c in by_ids.choices] == [t + c.text for t, c in zip(texts, by_text.choices)]
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == sum(map(len, ids))
    one = client.completions.create(model="generate", prompt=ids[1], max_tokens=5, temperature=0)
    assert one.choices[0].text == by_text.choices[1].text and one.usage.prompt_tokens == len(ids[1])
    chunks = list(client.completions.create(model="generate", prompt=ids[1], max_tokens=5, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == one.choices[0].text
    with pytest.raises(openai.BadRequestError, match=r"prompt\[1\]\[2\]: token id 512 is not in the vocabulary"):
        client.completions.create(model="generate", prompt=[ids[0], [5, 6, 512]], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match=r"prompt\[1\]: token id -1 is not in the vocabulary"):
        client.completions.create(model="generate", prompt=[5, -1], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="input has 201 tokens, over the limit of 200"):
        client.completions.create(model="generate", prompt=[5] * 201, max_tokens=2)


def test_logit_bias_steers_the_choice_per_request(server):
    client, tokenizer = _client(server), _tokenizer(server)
    allowed = tokenizer.encode(" fox brown")
    texts = {tokenizer.decode([t]) for t in allowed}
    ask = dict(model="generate", prompt="The quick brown fox", max_tokens=6, temperature=0, logprobs=0)
    plain = client.completions.create(**ask)
    forced = client.completions.create(**ask, logit_bias={str(t): 100 for t in allowed})
    assert len(forced.choices[0].logprobs.tokens) == 6 and set(forced.choices[0].logprobs.tokens) <= texts
    # The logprobs stay the model's own: a +100 bias would have made them ~0.
    assert max(forced.choices[0].logprobs.token_logprobs) < -1e-3
    only = allowed[0]  # every other token banned
    banned = client.completions.create(**ask, logit_bias={str(t): -100 for t in range(512) if t != only})
    assert banned.choices[0].logprobs.tokens == [tokenizer.decode([only])] * 6
    assert client.completions.create(**ask).choices[0].text == plain.choices[0].text  # nothing left behind
    sampled = client.completions.create(**{**ask, "temperature": 1.0, "seed": 3}, logit_bias={str(t): 100 for t in allowed})
    assert set(sampled.choices[0].logprobs.tokens) <= texts


def test_best_of_answers_the_n_most_likely_of_its_samples(server):
    client = _client(server)
    ask = dict(model="generate", prompt="The quick brown fox", max_tokens=8, temperature=1.0, seed=11)
    four = client.completions.create(**ask, n=4, logprobs=0)  # the same 4 samples (seeds 11 .. 14)
    ranked = sorted(four.choices, key=lambda c: -sum(c.logprobs.token_logprobs))
    best = client.completions.create(**ask, n=2, best_of=4)
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]] and [c.index for c in best.choices] == [0, 1]
    assert all(c.logprobs is None for c in best.choices)  # ranked by logprobs, shown only when asked for
    assert best.usage.completion_tokens == four.usage.completion_tokens  # every sample counts


def test_penalties_and_min_tokens_are_taken(server):
    done = _client(server).completions.create(model="generate", prompt="The quick brown fox", max_tokens=4,
                                              temperature=0, frequency_penalty=0.5, presence_penalty=-0.5,
                                              extra_body={"min_tokens": 2})
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens >= 1


def test_models_are_ids_never_server_paths(server):
    import openai

    client = _client(server)
    assert [m.id for m in client.models.list().data] == list(server[1])
    listing = requests.get(server[0] + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    assert "root" not in listing and not any(s["model"] in listing for s in server[1].values())
    assert client.models.retrieve("generate").id == "generate"
    with pytest.raises(openai.NotFoundError, match="model 'nope' is not served here"):
        client.models.retrieve("nope")


def test_chat_completions_render_the_checkpoints_chat_template(server, tmp_path):
    """/v1/chat/completions renders the messages with the checkpoint's chat_template as transformers
    does, then answers as the completions route does for those tokens, streamed or not, with the same
    limits; a checkpoint without a template answers 404 saying so."""
    import openai
    import transformers
    from ray import serve

    from tests.pipelines.serve.test_chat import JSONISH, MESSAGES, TAGGED, with_template

    with pytest.raises(openai.NotFoundError, match="chat template"):
        _client(server).chat.completions.create(model="generate", messages=MESSAGES)
    ckpt = with_template(Path(server[1]["generate"]["model"]), tmp_path, TAGGED)
    base = _deploy(server, "chat", {"autoscaling_config": None, "num_replicas": 1,
                                    "ray_actor_options": {"num_cpus": 0.25}},
                   args={"tasks": {"generate": {**server[1]["generate"], "model": str(ckpt)}}, "max_new_tokens_cap": 64})
    try:
        client = _client(server, base)
        ids = transformers.AutoTokenizer.from_pretrained(ckpt).apply_chat_template(MESSAGES, add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        want = client.completions.create(model="generate", prompt=ids, max_tokens=6, temperature=0)
        done = client.chat.completions.create(model="generate", messages=MESSAGES, max_tokens=6, temperature=0,
                                              top_p=None, n=None, stop=None, seed=None, logprobs=None)
        assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
        assert done.choices[0].message.content == want.choices[0].text
        assert done.choices[0].finish_reason == want.choices[0].finish_reason
        assert done.usage.prompt_tokens == len(ids) == want.usage.prompt_tokens
        chunks = list(client.chat.completions.create(model="generate", messages=MESSAGES, max_tokens=6, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.choices[0].text
        assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == done.choices[0].finish_reason
        assert chunks[-1].usage == done.usage
        scored = client.chat.completions.create(model="generate", messages=MESSAGES, max_tokens=6, temperature=0,
                                                logprobs=True, top_logprobs=2)
        content = scored.choices[0].logprobs.content
        assert len(content) == scored.usage.completion_tokens
        for token in content:
            assert len(token.top_logprobs) == 2 and token.logprob == pytest.approx(token.top_logprobs[0].logprob)
        n2 = client.chat.completions.create(model="generate", messages=MESSAGES, max_tokens=4, n=2, seed=5)
        assert [c.index for c in n2.choices] == [0, 1]
        with pytest.raises(openai.BadRequestError, match="max_tokens 100 is over the limit of 64"):
            client.chat.completions.create(model="generate", messages=MESSAGES, max_tokens=100)
        with pytest.raises(openai.BadRequestError, match="unknown role tool"):
            client.chat.completions.create(model="generate", messages=[{"role": "tool", "content": "x",
                                                                        "tool_call_id": "1"}])
        with pytest.raises(openai.BadRequestError, match="top_logprobs: only with logprobs"):
            client.chat.completions.create(model="generate", messages=MESSAGES, top_logprobs=2)
        # The generate task's chat_template setting wins over the checkpoint's.
        _deploy(server, "chat", {"autoscaling_config": None, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
                args={"tasks": {"generate": {**server[1]["generate"], "model": str(ckpt), "chat_template": JSONISH}}})
        ids = transformers.AutoTokenizer.from_pretrained(with_template(ckpt, tmp_path / "b", JSONISH)).apply_chat_template(
            MESSAGES, add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        done = client.chat.completions.create(model="generate", messages=MESSAGES, max_tokens=6, temperature=0)
        assert done.usage.prompt_tokens == len(ids)
        want = client.completions.create(model="generate", prompt=ids, max_tokens=6, temperature=0)
        assert done.choices[0].message.content == want.choices[0].text
    finally:
        serve.delete("chat")


def test_health_and_readiness(server):
    assert requests.get(server[0] + "/healthz", timeout=10).json() == {"status": "ok"}
    assert requests.get(server[0] + "/readyz", timeout=10).json()["ready"] is True


@pytest.mark.parametrize("body, status, message", [
    ('{"inputs": "x",', 400, "invalid"),
    ('{"inputs": "x", "surprise": 1}', 400, "surprise"),
    ('{"inputs": "x", "parameters": {"max_new_tokens": 1000}}', 400, "over the limit of 64"),
    ('{"inputs": "x", "parameters": {"temperature": -1}}', 400, "temperature"),
    (json.dumps({"inputs": "word " * 5000}), 413, "over the limit of 20000"),
    (json.dumps({"inputs": "word " * 300}), 400, "limit of 200"),
])
def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(server, body, status, message):
    answer = requests.post(server[0] + "/v1/generate", data=body, timeout=60,
                           headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert answer.status_code == status, answer.text
    assert message in answer.json()["error"]["message"]
    assert "Traceback" not in answer.text
    assert post(server, "/v1/classify", {"inputs": "still fine"}).status_code == 200


@pytest.mark.parametrize("route, body, status, message, param", [
    ("/v1/completions", {"prompt": "", "max_tokens": 2}, 400, "prompt: text is empty", "prompt"),
    ("/v1/completions", {"prompt": ["fine", "   "], "max_tokens": 2}, 400, "prompt[1]: text is empty", "prompt"),
    ("/v1/completions", {"prompt": " ", "max_tokens": 2, "stream": True}, 400, "prompt: text is empty", "prompt"),
    ("/v1/completions", {"prompt": [], "max_tokens": 2}, 400, "prompt is empty", "prompt"),
    ("/v1/completions", {"prompt": [[5, 6], []]}, 400, "prompt[1] is empty", "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100}, 400, "max_tokens 100 is over the limit of 64", "max_tokens"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model 'gpt-4' is not served", "model"),
    ("/v1/completions", {"prompt": "x", "n": 9}, 400, "n 9 is over the limit of 8", "n"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n: Input should be greater than or equal to 1", "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs 6 is over the limit of 5", "logprobs"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 2.5}, 400, "frequency_penalty", "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": -3}, 400, "presence_penalty", "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens 5 is over max_tokens (4)",
     "min_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, 400, "best_of 2 must be at least n (3)", "best_of"),
    ("/v1/completions", {"prompt": "x", "best_of": 9}, 400, "best_of 9 is over the limit of 8", "best_of"),
    ("/v1/completions", {"prompt": "x", "best_of": 2, "stream": True}, 400, "best_of: not with stream", "best_of"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"x5": 10}}, 400, "logit_bias: key 'x5' is not a token id",
     "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "outside [-100, 100]", "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, 400, "not a token id in [0, 512)", "logit_bias"),
    ("/v1/completions", {"prompt": "x", "suffix": "end"}, 400, "suffix 'end' is not supported", "suffix"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options",
     "stream_options"),
    ("/v1/completions", {"prompt": "x", "functions": []}, 400, "functions", "functions"),
    ("/v1/generate", {"inputs": "x", "parameters": {"temperature": -1}}, 400, "temperature",
     "parameters.temperature"),
    ("/v1/generate", {"inputs": "x", "parameters": {"max_new_tokens": 65}}, 400, "over the limit of 64",
     "max_new_tokens"),
    ("/v1/classify", {"inputs": ["fine", ""]}, 400, "inputs[1]: text is empty", "inputs"),
    ("/v1/classify", {"inputs": "x" * 100_001}, 413, "over the limit", None),
    ("/v1/nothing", {"inputs": "x"}, 404, "no route /v1/nothing", None),
    ("/nowhere", {}, 404, "no route /nowhere", None),
])
def test_every_error_has_one_shape(server, route, body, status, message, param):
    """OpenAI's error object on every route: {"error": {"message", "type", "param", "code"}}, with 400 for
    every invalid request (once 422) and param naming the field at fault."""
    answer = post(server, route, body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error.keys() == {"message", "type", "param", "code"}
    assert error["code"] == status and message in error["message"] and error["param"] == param
    assert error["type"] == {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error"}[status]
    wrong_method = requests.get(server[0] + "/v1/classify", timeout=10)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == 405
    unknown = requests.get(server[0] + "/v1/nope", timeout=10)  # no such route, whatever the method
    assert unknown.status_code == 404 and unknown.json()["error"] == {
        "message": "no route /v1/nope", "type": "not_found_error", "param": None, "code": 404}


@pytest.mark.parametrize("key", [None, "wrong"])
def test_api_key_is_required(server, key):
    answer = post(server, "/v1/classify", {"inputs": "hello"}, key=key)
    assert answer.status_code == 401 and "API key" in answer.json()["error"]["message"]
    assert answer.json()["error"]["type"] == "authentication_error"


def test_concurrent_clients_are_batched(server):
    texts = [r["text"] for r in corpus_rows(32)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda t: post(server, "/v1/classify", {"inputs": t}), texts))
    assert all(a.status_code == 200 for a in answers)
    sizes = requests.get(server[0] + "/v1/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert max(sizes["batch_sizes"]) > 1


def test_a_classify_does_not_wait_behind_a_running_ner_batch(server):
    # max_batch_tokens 1: each NER item is a batch of its own, so a 128-item request keeps NER busy for
    # 128 batches in a row. A classify sent once they have started must answer before the NER request.
    # With one batch queue for every task, it queued behind all of them.
    from ray import serve

    tasks = {t: server[1][t] for t in ("classify", "ner")}
    base = _deploy(server, "queues", {"autoscaling_config": None, "num_replicas": 1,
                                      "ray_actor_options": {"num_cpus": 0.25}}, {"max_batch_tokens": 1},
                   args={"tasks": tasks})
    auth = {"Authorization": f"Bearer {KEY}"}
    texts = [r["text"] for r in corpus_rows(128)]
    finished = {}

    def timed(name, route, body):
        answer = requests.post(base + route, json=body, headers=auth, timeout=120)
        finished[name] = time.monotonic()
        return answer

    try:
        with ThreadPoolExecutor(2) as pool:
            ner = pool.submit(timed, "ner", "/v1/ner", {"inputs": texts})
            deadline = time.monotonic() + 60
            while not requests.get(base + "/v1/stats", headers=auth, timeout=10).json()["batch_sizes"]:
                assert time.monotonic() < deadline and not ner.done(), "the NER batches never started"
                time.sleep(0.02)
            classify = pool.submit(timed, "classify", "/v1/classify", {"inputs": texts[0]})
            assert ner.result().status_code == 200 and classify.result().status_code == 200
        assert finished["classify"] < finished["ner"]
    finally:
        serve.delete("queues")


def test_a_client_that_leaves_a_stream_frees_its_slot(server, tmp_path):
    # A generation that would run 4,000 tokens; the client reads its first chunk and hangs up. The
    # sequence must end as aborted (not run to its length), and the engine hold nothing after.
    # The checkpoint's eos embedding is zeroed (its logit is 0, never the greedy argmax of this random
    # model), so the sequence cannot end on its own first.
    import shutil

    import bloom
    from ray import serve

    ckpt = tmp_path / "no-eos"
    shutil.copytree(server[1]["generate"]["model"], ckpt)
    model = bloom.BloomForCausalLM.from_pretrained(ckpt)
    with torch.no_grad():
        model.transformer.word_embeddings.weight[model.config.eos_token_id] = 0
    model.save_pretrained(ckpt)
    base = _deploy(server, "leave", {"autoscaling_config": None, "num_replicas": 1,
                                     "ray_actor_options": {"num_cpus": 0.25}},
                   args={"max_new_tokens_cap": 4000, "tasks": {"generate": {
                       "model": str(ckpt), "max_input_tokens": 32, "dtype": "float32"}}})
    auth = {"Authorization": f"Bearer {KEY}"}

    def engine():
        return requests.get(base + "/v1/stats", headers=auth, timeout=10).json()["engine"]

    body = {"prompt": "The quick brown fox", "max_tokens": 4000, "temperature": 0, "stream": True}
    try:
        with requests.post(base + "/v1/completions", json=body, headers=auth, stream=True, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # kept open: a closed iterator would close the connection here
            assert [next(lines) for _ in range(6)][0].startswith(b"data: {")
            assert engine()["running"] == 1
        deadline = time.monotonic() + 30  # the client has gone (the connection is closed)
        while (stats := engine())["running"] or stats["slots_used"]:
            assert time.monotonic() < deadline, f"the stream's sequence still runs: {stats}"
            time.sleep(0.05)
        assert stats["ended"] == {"abort": 1}
    finally:
        serve.delete("leave")


def _deploy(server, name, overrides, user_config=None, args=None):
    """Another application from serve_config.yaml on the same Serve instance, under /<name>."""
    import yaml
    from ray import serve

    from pipelines.serve import app_from_config

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    application = config["applications"][0]
    application.update(name=name, route_prefix=f"/{name}")
    application["args"]["tasks"] = {"generate": server[1]["generate"], "classify": server[1]["classify"]}
    application["args"].update(args or {})
    deployment = application["deployments"][0]
    deployment.update(overrides)
    if user_config is not None:
        deployment["user_config"] = user_config
    app, app_name, prefix, _ = app_from_config(config)
    serve.run(app, name=app_name, route_prefix=prefix)
    return f"{server[0]}/{name}"


def test_serve_config_is_valid_for_ray():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    deployment = config.applications[0].deployments[0]
    assert deployment.max_queued_requests > 0 and deployment.autoscaling_config["max_replicas"] > 1
    assert config.http_options.host == "127.0.0.1"
    assert config.logging_config.encoding == "JSON" and config.logging_config.enable_access_log is False


def test_replicas_log_json_lines_as_serve_config_says_and_no_batch_size_warning(server):
    import ray
    from ray import serve

    from pipelines.serve import BloomEndpoint

    # `serve run serve_config.yaml` applies the file's logging_config only to deployments that set none in code.
    assert BloomEndpoint._deployment_config.logging_config is None
    base = _deploy(server, "jsonlogs", {"autoscaling_config": None, "num_replicas": 1,
                                        "ray_actor_options": {"num_cpus": 0.25}})  # as jobs/serve_bloom.py does
    try:
        answer = requests.post(base + "/v1/generate", json={"inputs": ""}, headers={"Authorization": f"Bearer {KEY}"},
                               timeout=60)
        assert answer.status_code in (200, 400)
        logs = list((Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve").glob(
            "replica_jsonlogs_BloomEndpoint_*.log"))
        lines = [line for path in logs for line in path.read_text().splitlines() if line.strip()]
        assert lines
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        assert all("message" in r for r in records)
        assert not [r for r in records if "max_ongoing_requests" in r["message"]]
    finally:
        serve.delete("jsonlogs")


def test_batching_is_retuned_without_a_redeploy(server):
    from ray import serve

    base = _deploy(server, "tuned", {"autoscaling_config": None, "num_replicas": 1,
                                     "ray_actor_options": {"num_cpus": 0.25}}, {"max_batch_tokens": 1})
    auth = {"Authorization": f"Bearer {KEY}"}
    texts = [r["text"] for r in corpus_rows(12)]

    def flood():
        with ThreadPoolExecutor(12) as pool:
            assert all(a.status_code == 200 for a in pool.map(
                lambda t: requests.post(base + "/v1/classify", json={"inputs": t}, headers=auth, timeout=60), texts))
        return requests.get(base + "/v1/stats", headers=auth, timeout=10).json()

    try:
        one = flood()
        assert one["max_batch_tokens"] == 1 and max(one["batch_sizes"]) == 1
        _deploy(server, "tuned", {"autoscaling_config": None, "num_replicas": 1,
                                  "ray_actor_options": {"num_cpus": 0.25}}, {"max_batch_tokens": 8192})
        # serve.run can return before the running replica's reconfigure (which clears the seen sizes):
        # wait until the replica reports the new setting, then flood.
        deadline = time.monotonic() + 60
        while requests.get(base + "/v1/stats", headers=auth, timeout=10).json()["max_batch_tokens"] != 8192:
            assert time.monotonic() < deadline, "the replica never applied the new user_config"
            time.sleep(0.2)
        many = flood()
        assert many["max_batch_tokens"] == 8192 and max(many["batch_sizes"]) > 1
    finally:
        serve.delete("tuned")


def test_overload_answers_503_fast_and_recovers(server):
    from ray import serve

    base = _deploy(server, "small", {"autoscaling_config": None, "num_replicas": 1, "max_ongoing_requests": 1,
                                     "max_queued_requests": 1, "ray_actor_options": {"num_cpus": 0.25}})
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 48}}
    try:
        with ThreadPoolExecutor(24) as pool:
            codes = list(pool.map(lambda _: requests.post(base + "/v1/generate", json=body, headers=auth,
                                                          timeout=60).status_code, range(24)))
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
        assert requests.post(base + "/v1/generate", json=body, headers=auth, timeout=60).status_code == 200
    finally:
        serve.delete("small")


def test_the_app_sheds_load_with_a_503_in_its_error_shape(server):
    from ray import serve

    base = _deploy(server, "shedding", {"autoscaling_config": None, "num_replicas": 1,
                                        "ray_actor_options": {"num_cpus": 0.25}}, args={"max_requests": 2})
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 48}}
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda _: requests.post(base + "/v1/generate", json=body, headers=auth,
                                                            timeout=60), range(16)))
        busy = [a for a in answers if a.status_code == 503]
        assert busy and {a.status_code for a in answers} <= {200, 503}
        assert all(a.json()["error"]["code"] == 503 and "max_requests" in a.json()["error"]["message"] for a in busy)
        assert requests.post(base + "/v1/generate", json=body, headers=auth, timeout=60).status_code == 200
    finally:
        serve.delete("shedding")


def test_autoscaling_goes_to_two_replicas_under_load_and_back(server):
    import threading

    from ray import serve

    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
                   "downscale_delay_s": 2, "metrics_interval_s": 0.5, "look_back_period_s": 1}
    base = _deploy(server, "scaled", {"autoscaling_config": autoscaling, "ray_actor_options": {"num_cpus": 0.25}})
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"inputs": "The quick brown fox", "parameters": {"max_new_tokens": 32}}

    def running() -> int:
        status = serve.status().applications["scaled"].deployments["BloomEndpoint"]
        return status.replica_states.get("RUNNING", 0)

    stop, peak = threading.Event(), [1]

    def load():
        while not stop.is_set():
            requests.post(base + "/v1/generate", json=body, headers=auth, timeout=60)

    try:
        assert running() == 1
        workers = [threading.Thread(target=load) for _ in range(6)]
        for w in workers:
            w.start()
        deadline = time.time() + 60
        while time.time() < deadline and peak[0] < 2:
            peak[0] = max(peak[0], running())
            time.sleep(0.5)
        stop.set()
        for w in workers:
            w.join()
        assert peak[0] == 2, "no second replica under load"
        deadline = time.time() + 60
        while time.time() < deadline and running() != 1:
            time.sleep(0.5)
        assert running() == 1, "did not scale back to one replica"
    finally:
        stop.set()
        serve.delete("scaled")


def _answer(server, route, body):
    """A request's answer as one comparable value; a stream's chunks are joined into text and reason."""
    if not body.get("stream"):
        answer = post(server, route, body)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        if route == "/v1/completions":
            return [(c["text"], c["finish_reason"]) for c in body["choices"]]
        return body.get("results", [body])
    with post(server, route, body, stream=True) as answer:
        assert answer.status_code == 200, answer.text
        events = [json.loads(line[6:]) for line in answer.iter_lines(decode_unicode=True)
                  if line.startswith("data: ") and line != "data: [DONE]"]
    return [("".join(e["choices"][0]["text"] for e in events), events[-1]["choices"][0]["finish_reason"])]


def test_concurrent_requests_with_different_parameters_each_get_their_answer_alone(server):
    """Batches and streams run on several threads of one replica: a request's parameters must never
    reach another request (stop strings, penalties and lengths once leaked between them)."""
    texts = [r["text"][:80] for r in corpus_rows(4)]
    cases = [("/v1/generate", {"inputs": texts[0]}),
             ("/v1/generate", {"inputs": texts[1], "parameters": {"max_new_tokens": 20, "repetition_penalty": 1.6}}),
             ("/v1/generate", {"inputs": [texts[2], texts[0]], "parameters": {"max_new_tokens": 16, "stop": ["e"]}}),
             ("/v1/completions", {"prompt": texts[3], "max_tokens": 18, "temperature": 0}),
             ("/v1/completions", {"prompt": texts[0], "max_tokens": 24, "temperature": 0, "stop": ["a"], "stream": True}),
             ("/v1/completions", {"prompt": texts[1], "max_tokens": 3, "temperature": 0, "stream": True}),
             ("/v1/classify", {"inputs": texts[2]}),
             ("/v1/ner", {"inputs": texts[3], "parameters": {"aggregation_strategy": "none"}})]
    alone = [_answer(server, *case) for case in cases]
    order = [i for _ in range(4) for i in range(len(cases))]
    random.Random(1).shuffle(order)
    with ThreadPoolExecutor(len(order)) as pool:
        together = list(pool.map(lambda i: _answer(server, *cases[i]), order))
    for i, got in zip(order, together):
        if cases[i][0] in ("/v1/classify", "/v1/ner"):  # bf16 here: scores may move with the batch's shape
            assert len(got) == len(alone[i]) and [r.get("label") for r in got] == [r.get("label") for r in alone[i]]
        else:  # float32 generation: token for token
            assert got == alone[i], cases[i]



def test_a_repeated_prompt_reuses_its_cached_prefix_and_the_stats_say_so(server):
    """The endpoint's engine keeps prompt blocks: the same long prompt sent twice is partly copied from
    the prefix cache the second time, with the same greedy text, and /v1/stats shows the reuse."""
    base, auth = server[0], {"Authorization": f"Bearer {KEY}"}

    def engine():
        return requests.get(base + "/v1/stats", headers=auth, timeout=10).json()["engine"]

    prompt = "Ada Obi flew to Lima on a Tuesday, and the weather was fine all week. " * 3
    before = engine()["prefix_tokens_reused"]
    texts = [requests.post(base + "/v1/completions", headers=auth, timeout=60,
                           json={"prompt": prompt, "max_tokens": 4, "temperature": 0}).json()["choices"][0]["text"]
             for _ in range(2)]
    stats = engine()
    assert texts[0] == texts[1]
    assert stats["prefix_tokens_reused"] > before and 0 < stats["prefix_hit_rate"] <= 1
