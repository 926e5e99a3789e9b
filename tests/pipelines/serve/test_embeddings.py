"""/v1/embeddings over real HTTP with the official openai client: the vectors the offline replica
computes, as floats or base64, for texts and token ids; dimensions other than the model's refused."""

import base64

import numpy as np
import pytest
import requests

from pipelines.config import LabelConfig
from pipelines.replica import BloomReplica
from tests.pipelines.conftest import corpus_rows
from tests.pipelines.serve import endpoint

SETTINGS = {"dtype": "float32", "max_input_tokens": 128}


@pytest.fixture(scope="module")
def server(ray_cluster, checkpoints):
    tasks = {"embed": {"model": str(checkpoints["generate"]), **SETTINGS},
             "classify": {"model": str(checkpoints["classify"])}}
    with endpoint("bloomline-embed", tasks) as url:
        yield url


@pytest.fixture(scope="module")
def offline(checkpoints):
    return BloomReplica(LabelConfig(task="embed", model=str(checkpoints["generate"]), **SETTINGS))


def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)


def test_the_openai_client_gets_the_offline_vectors_as_floats_and_base64(server, offline):
    texts = [r["text"] for r in corpus_rows(3)]
    want = [r["embedding"] for r in offline.label_rows([{"text": t} for t in texts])]
    # The client asks for base64 unless told otherwise, and decodes it itself.
    default = client(server).embeddings.create(model="embed", input=texts)
    floats = client(server).embeddings.create(model="embed", input=texts, encoding_format="float")
    for answer in (default, floats):
        assert [d.index for d in answer.data] == [0, 1, 2] and answer.model == "embed"
        for d, w in zip(answer.data, want):
            np.testing.assert_allclose(d.embedding, w, atol=1e-6, rtol=0)
    tokens = sum(len(offline.tokenizer.encode(t)) for t in texts)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens
    # Over plain HTTP: base64 is the float32 little-endian bytes of exactly the float answer.
    raw = requests.post(server + "/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"}).json()
    plain = requests.post(server + "/v1/embeddings", json={"input": texts[0]}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == np.float32(plain["data"][0]["embedding"]).tolist() and len(decoded) == 64


def test_token_id_inputs_embed_as_their_text(server, offline):
    texts = [r["text"] for r in corpus_rows(2)]
    ids = [offline.tokenizer.encode(t) for t in texts]
    by_text = client(server).embeddings.create(model="embed", input=texts, encoding_format="float")
    by_ids = client(server).embeddings.create(model="embed", input=ids, encoding_format="float")
    one = client(server).embeddings.create(model="embed", input=ids[1], encoding_format="float")
    for a, b in zip(by_text.data, by_ids.data):
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-6)
    np.testing.assert_allclose(one.data[0].embedding, by_text.data[1].embedding, atol=1e-6)
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))


@pytest.mark.parametrize("body, status, param, message", [
    ({"input": "x", "dimensions": 32}, 400, "dimensions", "dimensions 32 is not supported: this model's embeddings "
                                                           "have 64"),
    ({"input": ["fine", "word " * 300]}, 400, "input", "tokens, over the limit of 128"),
    ({"input": [[1, 2], [3, 10**7]]}, 400, "input", "input[1]: token id 10000000 at 1 is not in the vocabulary"),
    ({"input": []}, 400, "input", "input is empty"),
    ({"input": "x", "encoding_format": "hex"}, 400, "encoding_format", "encoding_format"),
    ({"input": "x", "model": "generate"}, 404, "model", "model 'generate' is not served here"),
])
def test_bad_requests_get_the_one_error_shape(server, body, status, param, message):
    answer = requests.post(server + "/v1/embeddings", json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and message in error["message"] and error["code"] == status


def test_dimensions_equal_to_the_models_is_taken_and_the_client_sees_a_400_otherwise(server):
    import openai

    assert len(client(server).embeddings.create(model="embed", input="x", dimensions=64).data[0].embedding) == 64
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client(server).embeddings.create(model="embed", input="x", dimensions=16)


def test_the_routes_beside_it_still_answer(server):
    """The /v1/{task} route does not take /v1/embeddings, nor the reverse; GET on it is a 405."""
    assert requests.post(server + "/v1/embed", json={"inputs": "hello"}).json()["embedding"]
    assert requests.post(server + "/v1/classify", json={"inputs": "hello"}).json()["label"]
    assert requests.get(server + "/v1/embeddings").status_code == 405
