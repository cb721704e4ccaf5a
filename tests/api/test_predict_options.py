"""Predict options (top_k, raw_scores, function_to_apply, truncate, truncation_direction) against references
computed from the engine's logits; the truncation flag; unknown fields refused."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.main import create_app
from service.settings import Settings
from tests.conftest import make_bundle

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = ["a lovely film", "a dreadful film"]
LABELS = ("neg", "neutral", "pos")
#: words that are one token each in the uncased BERT vocabulary
WORDS = "the cat sat on a mat and the dog ran far away from home".split()


def long_text(n_words: int) -> str:
    return " ".join(WORDS[k % len(WORDS)] for k in range(n_words))


@pytest.fixture(params=[True, False], ids=["batching", "no-batching"])
def server(request, tiny_backbone, tmp_path):
    settings = Settings(device="cpu", store_dir=tmp_path / "store", examples_dir=None, admin_token=TOKEN,
                        max_inputs_per_request=8, max_input_chars=2000, batching=request.param)
    app = create_app(settings, backbone=tiny_backbone)
    with TestClient(app) as client:
        bb = tiny_backbone
        for name, bundle in (("tri", make_bundle(bb, "tri", labels=LABELS, seed=3)),
                             ("sim", make_bundle(bb, "sim", labels=(), text_pairs=True, seed=4))):
            assert client.put(f"/v1/tasks/{name}", content=bundle, headers=AUTH).status_code == 201
        client.engine = app.state.supermask.engine
        yield client


def logits(server, task, rows) -> np.ndarray:
    """The reference: the engine's raw head outputs for ``rows``, through its own logits call."""
    return server.engine.logits(task, [(r, None) if isinstance(r, str) else tuple(r) for r in rows]).numpy()


def predict(server, task="tri", **body):
    return server.post(f"/v1/tasks/{task}/predict", json={"inputs": TEXTS, **body})


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("body, fn", [
    ({}, softmax),
    ({"function_to_apply": "softmax"}, softmax),
    ({"function_to_apply": "sigmoid"}, lambda z: 1 / (1 + np.exp(-z))),
    ({"function_to_apply": "none"}, lambda z: z),
    ({"raw_scores": True}, lambda z: z),
    ({"raw_scores": True, "function_to_apply": "none"}, lambda z: z),
])
def test_scores_are_the_function_of_the_logits(server, body, fn):
    r = predict(server, **body)
    assert r.status_code == 200, r.text
    want = fn(logits(server, "tri", TEXTS))
    for pred, row in zip(r.json()["predictions"], want):
        np.testing.assert_allclose([pred["scores"][lab] for lab in LABELS], row, rtol=1e-5, atol=1e-6)
        best = int(np.argmax(row))
        assert pred["label"] == LABELS[best] and pred["score"] == pytest.approx(float(row[best]), rel=1e-5, abs=1e-6)
        assert "top" not in pred and "truncated" not in pred


@pytest.mark.parametrize("top_k, n", [(1, 1), (2, 2), (None, 3), (10, 3)])
def test_top_k_ranks_labels(server, top_k, n):
    r = predict(server, top_k=top_k, function_to_apply="sigmoid")
    assert r.status_code == 200, r.text
    want = 1 / (1 + np.exp(-logits(server, "tri", TEXTS)))
    for pred, row in zip(r.json()["predictions"], want):
        order = np.argsort(-row)[:n]
        assert [t["label"] for t in pred["top"]] == [LABELS[k] for k in order]
        np.testing.assert_allclose([t["score"] for t in pred["top"]], row[order], rtol=1e-5)


def test_raw_scores_contradicting_function_to_apply_is_refused(server):
    r = predict(server, raw_scores=True, function_to_apply="softmax")
    assert r.status_code == 422 and "raw_scores" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, named", [
    ({"topk": 2}, "topk"),
    ({"parameters": {"top_k": 2}, "return_all_scores": True}, "return_all_scores"),
    ({"truncation_direction": "middle"}, "truncation_direction"),
    ({"function_to_apply": "relu"}, "function_to_apply"),
    ({"top_k": 0}, "top_k"),
    ({"truncate": 0}, "truncate"),  # strict types: no 0 for false (found by schemathesis)
    ({"raw_scores": "true"}, "raw_scores"),
    ({"top_k": 2.0}, "top_k"),
])
def test_unknown_or_bad_fields_are_refused_naming_them(server, body, named):
    r = predict(server, **body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["type"] == "RequestInvalid" and named in err["message"]


def test_truncation_flag_and_direction(server):
    limit = 32  # make_bundle's max_seq_length: [CLS] + 30 tokens + [SEP]
    text = long_text(45)
    words = text.split()
    r = server.post("/v1/tasks/tri/predict", json={"inputs": [text, "short text"], "function_to_apply": "none"})
    assert r.status_code == 200, r.text
    long_pred, short_pred = r.json()["predictions"]
    assert long_pred["truncated"] is True and "truncated" not in short_pred
    # right truncation keeps the head, left the tail: the same logits as the kept words sent alone
    head, tail = " ".join(words[:limit - 2]), " ".join(words[-(limit - 2):])
    np.testing.assert_allclose(list(long_pred["scores"].values()), logits(server, "tri", [head])[0], rtol=1e-4,
                               atol=1e-5)
    r = server.post("/v1/tasks/tri/predict", json={"inputs": [text], "function_to_apply": "none",
                                                   "truncation_direction": "left"})
    left = r.json()["predictions"][0]
    assert left["truncated"] is True
    np.testing.assert_allclose(list(left["scores"].values()), logits(server, "tri", [tail])[0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(logits(server, "tri", [head])[0], logits(server, "tri", [tail])[0])
    exact = " ".join(words[:limit - 2])  # exactly the limit: not truncated
    r = server.post("/v1/tasks/tri/predict", json={"inputs": [exact]})
    assert "truncated" not in r.json()["predictions"][0]


def test_no_truncate_refuses_an_over_long_input_with_its_token_count(server):
    r = server.post("/v1/tasks/tri/predict", json={"inputs": ["fine", long_text(45)], "truncate": False})
    assert r.status_code == 422, r.text
    msg = r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "InputInvalid"
    assert "inputs[1]" in msg and "47 tokens" in msg and "limit of 32" in msg
    r = server.post("/v1/tasks/tri/predict", json={"inputs": [long_text(30)], "truncate": False})
    assert r.status_code == 200 and "truncated" not in r.json()["predictions"][0]


def test_regression_takes_truncation_options_only(server):
    pair = [[long_text(40), "a man dances"]]
    r = server.post("/v1/tasks/sim/predict", json={"inputs": pair, "truncation_direction": "left"})
    assert r.status_code == 200, r.text
    assert set(r.json()["predictions"][0]) == {"value", "truncated"}
    for body in ({"top_k": 1}, {"raw_scores": True}, {"function_to_apply": "none"}):
        r = server.post("/v1/tasks/sim/predict", json={"inputs": pair, **body})
        assert r.status_code == 422, r.text
        msg = r.json()["error"]["message"]
        assert "regression" in msg and next(iter(body)) in msg and "truncate" in msg
