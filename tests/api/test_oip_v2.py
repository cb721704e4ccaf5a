"""Open Inference Protocol v2, through Triton's HTTP client library against a live uvicorn server."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from service.api.main import create_app
from service.settings import Settings
from tests.conftest import make_bundle
from tests.live_server import live_server

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = ["a lovely film", "a dreadful , overlong film", "fine"]


@pytest.fixture(scope="module")
def base_url(tiny_backbone_dir, tmp_path_factory):
    from backbone import load_backbone

    bb = load_backbone(tiny_backbone_dir)
    settings = Settings(device="cpu", store_dir=tmp_path_factory.mktemp("store"), examples_dir=None,
                        admin_token=TOKEN, max_inputs_per_request=8)
    app = create_app(settings, backbone=bb)
    with live_server(app) as url:
        with httpx.Client(base_url=url) as c:
            for name, bundle in (("tri", make_bundle(bb, "tri", labels=("a", "b", "c"), seed=1)),
                                 ("pair", make_bundle(bb, "pair", text_pairs=True, seed=2)),
                                 ("reg", make_bundle(bb, "reg", labels=(), text_pairs=True, seed=3))):
                assert c.put(f"/v1/tasks/{name}", content=bundle, headers=AUTH).status_code == 201
        yield url


@pytest.fixture
def client(base_url):
    c = httpclient.InferenceServerClient(url=base_url.removeprefix("http://"))
    yield c
    c.close()


def text_input(name, texts, binary):
    t = httpclient.InferInput(name, [len(texts)], "BYTES")
    t.set_data_from_numpy(np.array([x.encode() for x in texts], dtype=np.object_), binary_data=binary)
    return t


def v1(base_url, task, inputs, **opts):
    r = httpx.post(f"{base_url}/v1/tasks/{task}/predict", json={"inputs": inputs, **opts})
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "supermask"
    assert client.is_model_ready("tri") and client.is_model_ready("tri", model_version="1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("tri", model_version="7")
    meta = client.get_model_metadata("pair")
    assert [i["name"] for i in meta["inputs"]] == ["text", "text_pair"]
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [("label", "BYTES"), ("score", "FP32"),
                                                                      ("logits", "FP32")]
    meta = client.get_model_metadata("reg")
    assert [o["name"] for o in meta["outputs"]] == ["score", "logits"] and meta["outputs"][1]["shape"] == [-1, 1]


@pytest.mark.parametrize("binary", [True, False], ids=["binary-tensors", "json-tensors"])
def test_infer_equals_the_v1_predictions(client, base_url, binary):
    res = client.infer("tri", [text_input("text", TEXTS, binary)])
    labels = [x.decode() if isinstance(x, bytes) else x for x in res.as_numpy("label")]
    score, logits = res.as_numpy("score"), res.as_numpy("logits")
    assert logits.shape == (3, 3) and score.shape == (3,)
    probs = v1(base_url, "tri", TEXTS)
    raw = v1(base_url, "tri", TEXTS, raw_scores=True)
    for k in range(3):
        assert labels[k] == probs[k]["label"]
        assert score[k] == pytest.approx(probs[k]["score"], rel=1e-5)
        np.testing.assert_allclose(logits[k], [raw[k]["scores"][lab] for lab in ("a", "b", "c")], rtol=1e-5,
                                   atol=1e-6)


def test_infer_pairs_regression_and_chosen_outputs(client, base_url):
    a, b = ["a man is dancing", "the sky"], ["a man dances", "a bowl of soup"]
    res = client.infer("reg", [text_input("text", a, True), text_input("text_pair", b, True)])
    want = [p["value"] for p in v1(base_url, "reg", [list(x) for x in zip(a, b)])]
    np.testing.assert_allclose(res.as_numpy("score"), want, rtol=1e-5)
    np.testing.assert_allclose(res.as_numpy("logits")[:, 0], want, rtol=1e-5)
    out = [httpclient.InferRequestedOutput("label", binary_data=False)]
    res = client.infer("pair", [text_input("text", a, False), text_input("text_pair", b, False)], outputs=out)
    assert res.as_numpy("score") is None and len(res.as_numpy("label")) == 2
    assert res.get_response()["model_name"] == "pair"


@pytest.mark.parametrize("model, inputs, status, says", [
    ("nope", [("text", ["x"])], "404", "nope"),
    ("tri", [("sentence", ["x"])], "422", "['text']"),
    ("pair", [("text", ["x"])], "422", "text_pair"),
    ("pair", [("text", ["x", "y"]), ("text_pair", ["z"])], "422", "text_pair 1"),
    ("tri", [("text", [""])], "422", "empty"),
])
def test_errors_through_the_client(client, model, inputs, status, says):
    with pytest.raises(InferenceServerException) as exc:
        client.infer(model, [text_input(n, v, True) for n, v in inputs])
    assert exc.value.status() == status and says in exc.value.message()


def test_error_bodies_are_oip_shaped(base_url):
    cases = [("get", "/v2/models/nope", None, 404),
             ("post", "/v2/models/tri/infer", b"{not json", 422),
             ("post", "/v2/models/tri/infer", b'{"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], '
                                              b'"data": [1.0]}]}', 422),
             ("post", "/v2/models/tri/infer", b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], '
                                              b'"data": ["x"]}]}', 422),
             ("post", "/v2/models/tri/infer", b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], '
                                              b'"data": ["x"]}], "outputs": [{"name": "embedding"}]}', 422),
             ("post", "/v2/models/tri/infer", b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], '
                                              b'"data": ["x"]}], "outputs": 3}', 422)]
    for method, path, body, status in cases:
        r = httpx.request(method, base_url + path, content=body)
        assert r.status_code == status, (path, body, r.text)
        doc = r.json()
        assert set(doc) == {"error"} and isinstance(doc["error"], str) and doc["error"]
    ok = httpx.post(base_url + "/v2/models/tri/infer", json={"id": "r-1", "inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": [["x"]]}]})
    assert ok.status_code == 200 and ok.json()["id"] == "r-1"


def test_ready_only_after_start_up(tiny_backbone, tmp_path):
    from fastapi.testclient import TestClient

    app = create_app(Settings(device="cpu", store_dir=tmp_path / "store", examples_dir=None), backbone=tiny_backbone)
    before = TestClient(app).get("/v2/health/ready")  # no lifespan run: start-up not complete
    assert before.status_code == 400 and before.json() == {"ready": False}
    with TestClient(app) as c:
        assert c.get("/v2/health/ready").json() == {"ready": True} and c.get("/v2/health/live").status_code == 200
