"""Constrained output online, over real HTTP with the official openai client: OpenAI's response_format and
vLLM's structured_outputs on /v1/completions and /v1/chat/completions, streamed and not, and the same
settings as /v1/generate parameters; every output parses and validates (a random-weight model)."""

import json
import re

import jsonschema
import pytest
import requests

from tests.pipelines.serve.test_chat import MESSAGES, TAGGED
from tests.pipelines.serve import endpoint

KEY = "structured-key"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                           "rank": {"type": "integer", "minimum": 1, "maximum": 9},
                                           "tags": {"type": "array", "items": {"enum": ["big", "old"]}, "maxItems": 2}},
          "required": ["city", "rank", "tags"], "additionalProperties": False}
REGEX = r"[A-Z][a-z]{2,5} [0-9]{3}"
GRAMMAR = 'start: "sum(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,3}/'
PROMPT = "Name a city:"


@pytest.fixture(scope="module")
def base(ray_cluster, checkpoints):
    tasks = {"generate": {"model": str(checkpoints["generate"]), "max_input_tokens": 200, "max_new_tokens": 6,
                          "dtype": "float32", "chat_template": TAGGED}}
    with endpoint("structured", tasks, KEY, max_new_tokens_cap=128) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    import openai

    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)


def schema_valid(text: str) -> bool:
    jsonschema.validate(json.loads(text), SCHEMA)
    return True


FORMATS = [  # (extra request fields, a check of the output)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}}, schema_valid),
    ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
    ({"structured_outputs": {"json": SCHEMA}}, schema_valid),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, schema_valid),
    ({"structured_outputs": {"regex": REGEX}}, lambda t: re.fullmatch(REGEX, t) is not None),
    ({"structured_outputs": {"choice": ["Lima", "Oslo", "Quito"]}}, lambda t: t in ("Lima", "Oslo", "Quito")),
    ({"structured_outputs": {"grammar": GRAMMAR}}, lambda t: re.fullmatch(r"sum\([0-9]{1,3}(,[0-9]{1,3})*\)", t)),
]
IDS = ["response_format-json_schema", "response_format-json_object", "json", "json-text", "regex", "choice", "grammar"]


@pytest.mark.parametrize("extra, valid", FORMATS, ids=IDS)
def test_completions_streamed_and_not_follow_the_constraint(client, extra, valid):
    kw = dict(model="generate", prompt=PROMPT, max_tokens=100, temperature=0, extra_body=extra)
    done = client.completions.create(**kw)
    (choice,) = done.choices
    if "json_object" in json.dumps(extra) and choice.finish_reason == "length":
        return  # any object: a random model may write keys until max_tokens, and the answer says so
    assert choice.finish_reason == "stop" and valid(choice.text), choice
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text  # the same greedy tokens, streamed
    assert chunks[-1].choices[0].finish_reason == "stop"
    sampled = client.completions.create(**{**kw, "temperature": 1.0, "seed": 7, "n": 3})
    assert all(c.finish_reason == "length" or valid(c.text) for c in sampled.choices)


def test_chat_completions_take_response_format_as_the_client_sends_it(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    done = client.chat.completions.create(model="generate", messages=MESSAGES, max_tokens=100, temperature=0,
                                          response_format=fmt)
    assert done.choices[0].finish_reason == "stop" and schema_valid(done.choices[0].message.content)
    chunks = list(client.chat.completions.create(model="generate", messages=MESSAGES, max_tokens=100, temperature=0,
                                                 response_format=fmt, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == done.choices[0].message.content
    text = client.chat.completions.create(model="generate", messages=MESSAGES, max_tokens=6, temperature=0,
                                          response_format={"type": "text"})
    assert text.choices[0].finish_reason == "length"  # free text, as without it


def test_a_cut_structure_answers_finish_reason_length(client):
    done = client.completions.create(model="generate", prompt=PROMPT, max_tokens=3, temperature=0,
                                     extra_body={"structured_outputs": {"json": SCHEMA}})
    assert done.choices[0].finish_reason == "length" and done.choices[0].text.startswith("{")


def test_generate_route_takes_the_settings_as_parameters(base):
    def generate(parameters):
        return requests.post(base + "/v1/generate", json={"inputs": [PROMPT, "Another one:"], "parameters": parameters},
                             headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    schema = generate({"json_schema": SCHEMA, "max_new_tokens": 100}).json()["results"]
    assert all(schema_valid(r["parsed"]) and r["parsed"] == r["generated_text"] for r in schema)
    regex = generate({"regex": REGEX, "max_new_tokens": 100}).json()["results"]
    assert all(re.fullmatch(REGEX, r["generated_text"]) and "parsed" not in r for r in regex)  # a JSON constraint's
    choice = generate({"choice": ["yes", "no"]}).json()["results"]
    assert all(r["generated_text"] in ("yes", "no") for r in choice)
    cut = generate({"json_schema": SCHEMA, "max_new_tokens": 3})  # never a silently invalid answer
    assert cut.status_code == 400 and "incomplete structure" in cut.json()["error"]["message"]
    bad = generate({"json_schema": {"type": "objekt"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "json_schema"
    assert "cannot compile the json_schema constraint" in bad.json()["error"]["message"]


@pytest.mark.parametrize("extra, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format", "response_format: cannot compile the json_schema constraint .*objekt"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "structured_outputs: cannot compile the regex"),
    ({"structured_outputs": {"regex": "a+", "choice": ["a"]}}, "structured_outputs", "one constraint at a time"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a+"}}, "structured_outputs",
     "response_format.json_object, structured_outputs.regex"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs a json_schema object"),
    ({"response_format": {"type": "xml"}}, "response_format", "response_format.type"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs", "structural_tag"),
    ({"structured_outputs": {"regex": "a+"}, "min_tokens": 2}, "min_tokens", "min_tokens cannot go with regex"),
])
def test_a_constraint_that_cannot_compile_is_a_400_in_the_one_error_shape(client, extra, param, message):
    import openai

    with pytest.raises(openai.BadRequestError, match=message) as e:
        client.completions.create(model="generate", prompt=PROMPT, extra_body=extra)
    assert (e.value.status_code, e.value.type, e.value.param) == (400, "invalid_request_error", param)
    with pytest.raises(openai.BadRequestError, match=message):  # streamed: refused before the stream begins
        client.completions.create(model="generate", prompt=PROMPT, extra_body=extra, stream=True)
