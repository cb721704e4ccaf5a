"""The inputs other clients send: one text or HF ``{"text", "text_pair"}`` rows on our predict route,
text-embeddings-inference's /predict, /embed, /info and /health, Triton's model config and repository index
(through tritonclient), Swagger UI served without a CDN, and the content-type hint."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from service.api.main import create_app
from service.settings import Settings
from tests.conftest import make_bundle
from tests.live_server import live_server

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TASK = {"X-Supermask-Task": "toy"}


def _settings(tmp_path, **kw) -> Settings:
    return Settings(device="cpu", store_dir=tmp_path / "store", examples_dir=None, admin_token=TOKEN,
                    max_inputs_per_request=8, max_input_chars=2000, **kw)


def _upload(client, bb) -> None:
    for name, bundle in (("toy", make_bundle(bb, "toy", seed=1)),
                         ("pair", make_bundle(bb, "pair", labels=("no", "yes"), text_pairs=True, seed=2)),
                         ("sim", make_bundle(bb, "sim", labels=(), text_pairs=True, seed=3))):
        assert client.put(f"/v1/tasks/{name}", content=bundle, headers=AUTH).status_code == 201


@pytest.fixture
def server(tiny_backbone, tmp_path):
    with TestClient(create_app(_settings(tmp_path), backbone=tiny_backbone)) as client:
        client.backbone = tiny_backbone
        _upload(client, tiny_backbone)
        yield client


def tei_error(r) -> str:
    """The message of TEI's ``ErrorResponse`` ``{"error", "error_type"}`` (its error_type checked by status)."""
    body = r.json()
    want = {429: "overloaded", 503: "unhealthy"}.get(r.status_code, "backend" if r.status_code >= 500 else "validation")
    assert set(body) == {"error", "error_type"} and body["error_type"] == want, body
    return body["error"]


def v1(server, task, inputs, **opts) -> list[dict]:
    r = server.post(f"/v1/tasks/{task}/predict", json={"inputs": inputs, **opts})
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


# ---- our predict route: the inputs HF and TEI send -------------------------------------------------------------

def test_one_text_is_one_prediction(server):
    one = v1(server, "toy", "a lovely film")
    assert len(one) == 1 and one == v1(server, "toy", ["a lovely film"])


def test_hf_text_pair_rows(server):
    want = v1(server, "pair", [["a man sings", "a man is singing"], ["a cat", "a dog"]])
    assert v1(server, "pair", [{"text": "a man sings", "text_pair": "a man is singing"},
                               {"text": "a cat", "text_pair": "a dog"}]) == want
    assert v1(server, "pair", {"text": "a man sings", "text_pair": "a man is singing"}) == v1(
        server, "pair", [["a man sings", "a man is singing"]])
    assert v1(server, "toy", [{"text": "a lovely film"}]) == v1(server, "toy", ["a lovely film"])
    r = server.post("/v1/tasks/toy/predict", json={"inputs": [{"text": "a", "label": "x"}]})
    assert r.status_code == 422 and "label" in r.json()["error"]["message"]
    r = server.post("/v1/tasks/pair/predict", json={"inputs": [{"text": "only one"}]})
    assert r.status_code == 422 and "pairs" in r.json()["error"]["message"]


def test_fanout_takes_one_text(server):
    r = server.post("/v1/predict", json={"inputs": "a lovely film", "tasks": ["toy"]})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["predictions"] == v1(server, "toy", ["a lovely film"])


def test_missing_content_type_gets_a_hint(server):
    r = server.post("/v1/tasks/toy/predict", content=b'{"inputs": ["a"]}',
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 422
    assert "Content-Type: application/json" in r.json()["error"]["message"]
    r = server.post("/v1/tasks/toy/predict", json={"inputs": 3})  # JSON said: no hint, the field's error
    assert r.status_code == 422 and "Content-Type" not in r.json()["error"]["message"]


# ---- text-embeddings-inference ---------------------------------------------------------------------------------

def test_tei_predict_shapes(server):
    ours = v1(server, "toy", ["a lovely film", "a dreadful film"], top_k=None)
    one = server.post("/predict", json={"inputs": "a lovely film"}, headers=TASK)
    assert one.status_code == 200, one.text
    assert one.json() == v1(server, "toy", ["a lovely film"], top_k=None)[0]["top"]  # every label, highest first
    assert [p["score"] for p in one.json()] == sorted((p["score"] for p in one.json()), reverse=True)
    batch = server.post("/predict", json={"inputs": [["a lovely film"], ["a dreadful film"]]}, headers=TASK)
    assert batch.json() == [p["top"] for p in ours]
    raw = server.post("/predict", json={"inputs": "a lovely film", "raw_scores": True}, headers=TASK).json()
    top = v1(server, "toy", ["a lovely film"], raw_scores=True, top_k=None)[0]["top"]
    logits = {p["label"]: p["score"] for p in top}
    assert {p["label"]: p["score"] for p in raw} == logits


def test_tei_predict_pairs_and_regression(server):
    pair = server.post("/predict", json={"inputs": ["a man sings", "a man is singing"]}, headers={
        "X-Supermask-Task": "pair"})
    assert pair.status_code == 200, pair.text
    assert pair.json() == v1(server, "pair", [["a man sings", "a man is singing"]], top_k=None)[0]["top"]
    sim = server.post("/predict", json={"inputs": [["a", "b"], ["c", "d"]]}, headers={"X-Supermask-Task": "sim"})
    values = [p["value"] for p in v1(server, "sim", [["a", "b"], ["c", "d"]])]
    assert sim.json() == [[{"score": v, "label": "LABEL_0"}] for v in values]
    # a two-text list is one pair in TEI: a single-text task says so
    r = server.post("/predict", json={"inputs": ["a", "b"]}, headers=TASK)
    assert r.status_code == 422 and "pair" in tei_error(r)


def test_tei_predict_needs_a_task_and_ignores_unknown_fields(server):
    r = server.post("/predict", json={"inputs": "a"})
    assert r.status_code == 422 and "X-Supermask-Task" in tei_error(r)
    r = server.post("/predict", json={"inputs": "a", "parameters": {"top_k": 1}}, headers=TASK)  # InferenceClient's
    assert r.status_code == 200 and len(r.json()) == 2
    r = server.post("/predict", json={"inputs": "a"}, headers={"X-Supermask-Task": "TOY"})
    assert r.status_code == 404 and "'toy'" in tei_error(r)


def test_tei_default_task_setting(tiny_backbone, tmp_path):
    with TestClient(create_app(_settings(tmp_path, tei_task="toy"), backbone=tiny_backbone)) as client:
        _upload(client, tiny_backbone)
        r = client.post("/predict", json={"inputs": "a lovely film"})  # a TEI client: no header
        assert r.status_code == 200 and r.json() == v1(client, "toy", ["a lovely film"], top_k=None)[0]["top"]
        info = client.get("/info").json()
        assert info["model_id"] == "toy"
        assert info["model_type"] == {"classifier": {"id2label": {"0": "neg", "1": "pos"},
                                                     "label2id": {"neg": 0, "pos": 1}}}
        assert client.get("/info", headers={"X-Supermask-Task": "sim"}).json()["model_type"]["classifier"][
            "id2label"] == {"0": "LABEL_0"}


def test_tei_info_without_a_task_is_the_embedding_backbone(server):
    info = server.get("/info").json()
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 128  # the tiny backbone's position embeddings
    assert info["max_client_batch_size"] == 8 and info["model_dtype"] == "float32"
    assert {"model_id", "max_concurrent_requests", "max_batch_tokens", "auto_truncate", "tokenization_workers",
            "version"} <= set(info)
    assert server.get("/health").status_code == 200


def _reference_embedding(bb, texts) -> torch.Tensor:
    """Mean pooling over the quantized backbone's own forward (no mask), as sentence-transformers computes it."""
    from backbone import mean_pool

    enc = bb.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        hidden = bb.model(**enc).last_hidden_state
    return mean_pool(hidden, enc["attention_mask"])


def test_embed_is_the_mean_pooled_backbone(tiny_backbone_dir, tmp_path):
    from backbone import load_backbone

    bb = load_backbone(tiny_backbone_dir)
    want = _reference_embedding(bb, ["a lovely film", "a dreadful , overlong film"])  # before the engine wraps it
    with TestClient(create_app(_settings(tmp_path), backbone=bb)) as client:
        r = client.post("/embed", json={"inputs": ["a lovely film", "a dreadful , overlong film"], "normalize": False})
        assert r.status_code == 200, r.text
        got = torch.tensor(r.json())
        assert got.shape == (2, bb.hidden_size)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        one = torch.tensor(client.post("/embed", json={"inputs": "a lovely film"}).json())  # normalised
        assert one.shape == (1, bb.hidden_size)
        torch.testing.assert_close(one[0], torch.nn.functional.normalize(want[0], dim=0), atol=1e-4, rtol=1e-4)


def test_embed_through_a_task_mask_is_what_its_head_reads(server):
    r = server.post("/embed", json={"inputs": ["a lovely film", "a dreadful film"], "normalize": False}, headers=TASK)
    assert r.status_code == 200, r.text
    masked = torch.tensor(r.json())
    plain = torch.tensor(server.post("/embed", json={"inputs": ["a lovely film", "a dreadful film"],
                                                      "normalize": False}).json())
    assert not torch.allclose(masked, plain, atol=1e-3)  # the mask changes the vectors
    engine = server.app.state.supermask.engine
    entry = engine.tasks.get("toy")
    logits = masked @ entry.head_weight.T + entry.head_bias
    raw = v1(server, "toy", ["a lovely film", "a dreadful film"], raw_scores=True)
    want = torch.tensor([[p["scores"]["neg"], p["scores"]["pos"]] for p in raw])
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def test_embed_bad_inputs(server):
    long = " ".join(["word"] * 300)
    r = server.post("/embed", json={"inputs": long, "truncate": False})
    assert r.status_code == 422 and "tokens" in tei_error(r)
    assert server.post("/embed", json={"inputs": long}).status_code == 200  # truncated (auto_truncate)
    assert server.post("/embed", json={"inputs": [1, 2, 3]}).status_code == 422  # token ids: not taken
    assert server.post("/embed", json={"inputs": []}).status_code == 422
    assert server.post("/embed", json={"inputs": ["x"] * 9}).status_code == 422  # over max_inputs_per_request
    r = server.post("/embed", json={"inputs": "a", "prompt_name": "query"})
    assert r.status_code == 422 and "prompt_name" in tei_error(r)
    assert server.post("/embed", json={"inputs": "a"}, headers={"X-Supermask-Task": "nope"}).status_code == 404
    r = server.post("/embed", json={"inputs": "a"}, headers={"X-Supermask-Task": "no/such"})
    assert r.status_code == 422 and "X-Supermask-Task" in tei_error(r)  # not a task name
    r = server.get("/embed")  # a wrong method: TEI's shape too (Starlette's 405)
    assert r.status_code == 405 and "POST" in tei_error(r)
    r = server.post("/embed", content=b'{"inputs": "a"}')  # no content type
    assert r.status_code == 422 and "Content-Type: application/json" in tei_error(r)


def test_replies_over_the_response_limit_are_refused_before_work(tiny_backbone, tmp_path):
    with TestClient(create_app(_settings(tmp_path, max_response_bytes=2000), backbone=tiny_backbone)) as client:
        _upload(client, tiny_backbone)
        assert client.post("/embed", json={"inputs": ["a"]}).status_code == 200  # 32 floats
        r = client.post("/embed", json={"inputs": ["a", "b", "c"]})
        assert r.status_code == 422 and "SUPERMASK_MAX_RESPONSE_BYTES" in tei_error(r)
        assert client.post("/predict", json={"inputs": "a"}, headers=TASK).status_code == 200
        r = client.post("/predict", json={"inputs": [["a"]] * 8}, headers=TASK)
        assert r.status_code == 422 and "SUPERMASK_MAX_RESPONSE_BYTES" in tei_error(r)


# ---- Open Inference Protocol v2: model config and repository index through tritonclient -------------------------

def test_tritonclient_model_config_and_repository_index(tiny_backbone, tmp_path):
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
    from tritonclient.utils import InferenceServerException

    app = create_app(_settings(tmp_path), backbone=tiny_backbone)
    with live_server(app) as url:
        with httpx.Client(base_url=url) as c:
            _upload(c, tiny_backbone)
        client = httpclient.InferenceServerClient(url=url.removeprefix("http://"))
        try:
            config = client.get_model_config("pair")
            assert config["name"] == "pair" and config["max_batch_size"] == 0
            assert config["input"] == [{"name": "text", "data_type": "TYPE_STRING", "dims": [-1]},
                                       {"name": "text_pair", "data_type": "TYPE_STRING", "dims": [-1]}]
            assert [o["name"] for o in config["output"]] == ["label", "score", "logits"]
            assert config["output"][2] == {"name": "logits", "data_type": "TYPE_FP32", "dims": [-1, 2]}
            assert client.get_model_config("sim", model_version="1")["output"][0]["name"] == "score"
            with pytest.raises(InferenceServerException, match="no task named"):
                client.get_model_config("absent")
            index = client.get_model_repository_index()
            assert index == [{"name": t, "version": "1", "state": "READY", "reason": ""}
                             for t in ("pair", "sim", "toy")]
            # what the config says is what inference takes and answers
            t = httpclient.InferInput("text", [1], "BYTES")
            t.set_data_from_numpy(np.array([b"a man sings"], dtype=np.object_))
            p = httpclient.InferInput("text_pair", [1], "BYTES")
            p.set_data_from_numpy(np.array([b"a man is singing"], dtype=np.object_))
            assert client.infer("pair", [t, p]).as_numpy("logits").shape == (1, 2)
        finally:
            client.close()
    assert "model_repository" in TestClient(app).get("/v2").json()["extensions"]


def test_repository_index_bad_body(server):
    assert server.post("/v2/repository/index", json={"ready": True}).status_code == 200
    r = server.post("/v2/repository/index", json={"ready": "yes"})
    assert r.status_code == 422 and isinstance(r.json()["error"], str)


# ---- /docs works offline -----------------------------------------------------------------------------------------

def test_docs_served_from_this_server(server):
    page = server.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower() and "http" not in page.text.split("<body>")[1].split("url:")[0]
    for asset in ("/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css"):
        assert asset in page.text
        r = server.get(asset)
        assert r.status_code == 200 and len(r.content) > 10_000
    assert server.get("/redoc").status_code == 404  # ReDoc loaded from a CDN only: not offered


def test_huggingface_inference_client_unchanged(tiny_backbone, tmp_path, monkeypatch):
    """Hugging Face's TEI client (``huggingface_hub.InferenceClient`` pointed at a URL) against /predict and /embed:
    the body it sends (``parameters`` included) is taken and its parser reads the answers."""
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    # the hub's offline switch refuses every request, loopback included; this client talks to nothing but it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    app = create_app(_settings(tmp_path, tei_task="toy"), backbone=tiny_backbone)
    with live_server(app) as url:
        with httpx.Client(base_url=url) as c:
            _upload(c, tiny_backbone)
            want = c.post("/v1/tasks/toy/predict", json={"inputs": ["a lovely film"]}).json()["predictions"][0]
            vec = c.post("/embed", json={"inputs": "a lovely film"}).json()
        out = InferenceClient(f"{url}/predict").text_classification("a lovely film")
        top = out[0] if isinstance(out, list) else out  # huggingface_hub takes the first of TEI's flat list
        assert (top.label, top.score) == (want["label"], pytest.approx(want["score"], abs=1e-6))
        emb = InferenceClient(f"{url}/embed").feature_extraction("a lovely film")
        assert emb.shape == (1, tiny_backbone.hidden_size)
        np.testing.assert_allclose(emb, np.array(vec), atol=1e-6)
