"""vLLM's pooling routes over real HTTP: POST /classify answers the offline classify task's label and
class probabilities, POST /score the cosine similarity of the offline embed task's vectors, both in
vLLM's shapes; bad requests get the endpoint's one error shape."""

import numpy as np
import pytest
import requests

from pipelines.config import LabelConfig
from pipelines.replica import BloomReplica
from tests.pipelines.conftest import corpus_rows
from tests.pipelines.serve import endpoint

EMBED = {"dtype": "float32", "max_input_tokens": 128}
CLASSIFY = {"dtype": "float32"}


@pytest.fixture(scope="module")
def server(ray_cluster, checkpoints):
    tasks = {"embed": {"model": str(checkpoints["generate"]), **EMBED},
             "classify": {"model": str(checkpoints["classify"]), **CLASSIFY}}
    with endpoint("bloomline-pooling", tasks) as url:
        yield url


@pytest.fixture(scope="module")
def offline(checkpoints):
    return {"embed": BloomReplica(LabelConfig(task="embed", model=str(checkpoints["generate"]), **EMBED)),
            "classify": BloomReplica(LabelConfig(task="classify", model=str(checkpoints["classify"]), **CLASSIFY))}


def texts(n: int) -> list[str]:
    return [r["text"] for r in corpus_rows(n)]


def test_classify_answers_the_offline_label_and_probabilities_in_vllms_shape(server, offline):
    rep = offline["classify"]
    want = rep.label_rows([{"text": t} for t in texts(3)])
    answer = requests.post(server + "/classify", json={"model": "classify", "input": texts(3)})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["id"].startswith("classify-") and body["object"] == "list" and body["model"] == "classify"
    assert isinstance(body["created"], int)
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    for d, w in zip(body["data"], want):
        assert d["label"] == w["label"] and d["num_classes"] == len(rep.model.config.id2label) == 3
        np.testing.assert_allclose(d["probs"], [s["score"] for s in w["scores"]], atol=1e-6)
        assert abs(sum(d["probs"]) - 1) < 1e-5  # softmax over the classes, in class order
        assert d["label"] == rep.model.config.id2label[int(np.argmax(d["probs"]))]
    tokens = sum(len(rep.tokenizer.encode(t)) for t in texts(3))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                             "prompt_tokens_details": None}
    one = requests.post(server + "/classify", json={"input": texts(1)[0]}).json()  # model may be left out
    assert len(one["data"]) == 1 and one["data"][0]["label"] == want[0]["label"]


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_score_is_the_cosine_of_the_offline_embeddings_one_to_one_one_to_many_and_many_to_many(server, offline):
    rep = offline["embed"]
    query, docs = texts(4)[0], texts(4)[1:]
    vectors = {t: r["embedding"] for t, r in zip([query, *docs], rep.label_rows([{"text": t} for t in [query, *docs]]))}
    cases = [(query, docs[0], [(query, docs[0])]),
             (query, docs, [(query, d) for d in docs]),
             ([query], docs, [(query, d) for d in docs]),
             (docs, [query, query, docs[0]], list(zip(docs, [query, query, docs[0]])))]
    for text_1, text_2, pairs in cases:
        answer = requests.post(server + "/score", json={"model": "embed", "text_1": text_1, "text_2": text_2})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["id"].startswith("score-") and body["object"] == "list" and body["model"] == "embed"
        assert [(d["index"], d["object"]) for d in body["data"]] == [(i, "score") for i in range(len(pairs))]
        for d, (a, b) in zip(body["data"], pairs):
            assert abs(d["score"] - cosine(vectors[a], vectors[b])) < 1e-5
        sent = ([text_1] if isinstance(text_1, str) else text_1) + ([text_2] if isinstance(text_2, str) else text_2)
        assert body["usage"]["prompt_tokens"] == sum(len(rep.tokenizer.encode(t)) for t in sent)
    same = requests.post(server + "/score", json={"text_1": query, "text_2": query}).json()
    assert abs(same["data"][0]["score"] - 1) < 1e-5


@pytest.mark.parametrize("route, body, status, param, message", [
    ("/classify", {"input": []}, 400, "input", "input is empty"),
    ("/classify", {"input": 3}, 400, "input", "invalid request"),
    ("/classify", {"input": "x", "truncate_prompt_tokens": 4}, 400, "truncate_prompt_tokens", "Extra inputs"),
    ("/classify", {"input": "x", "model": "embed"}, 404, "model", "model 'embed' is not served here"),
    ("/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, 400, "text_2", "pairs 1:1, 1:N or N:N"),
    ("/score", {"text_1": "a", "text_2": []}, 400, "text_2", "text_2 is empty"),
    ("/score", {"text_1": "a"}, 400, "text_2", "Field required"),
    ("/score", {"text_1": "a", "text_2": ["fine", "word " * 300]}, 400, "text_2",
     "text_2[1]: input has"),
    ("/score", {"text_1": "word " * 300, "text_2": "fine"}, 400, "text_1", "text_1: input has"),
    ("/score", {"text_1": "a", "text_2": "b", "model": "classify"}, 404, "model", "model 'classify' is not served"),
])
def test_bad_requests_get_the_one_error_shape(server, route, body, status, param, message):
    answer = requests.post(server + route, json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and message in error["message"] and error["code"] == status, error
    assert requests.get(server + route).status_code == 405
