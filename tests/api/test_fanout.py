"""Fan-out (POST /v1/predict with tasks): equals the separate calls, from one mixed-task pass."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.api.main import create_app
from service.settings import Settings
from tests.conftest import make_bundle

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SINGLE = {"a": ("neg", "pos"), "b": ("x", "y", "z"), "c": ("no", "yes")}


@pytest.fixture(params=[True, False], ids=["batching", "no-batching"])
def server(request, tiny_backbone, tmp_path):
    settings = Settings(device="cpu", store_dir=tmp_path / "store", examples_dir=None, admin_token=TOKEN,
                        max_fanout_tasks=4, batching=request.param)
    app = create_app(settings, backbone=tiny_backbone)
    with TestClient(app) as client:
        for seed, (name, labels) in enumerate(SINGLE.items()):
            bundle = make_bundle(tiny_backbone, name, labels=labels, seed=seed, sparsity=0.1 * (seed + 1))
            assert client.put(f"/v1/tasks/{name}", content=bundle, headers=AUTH).status_code == 201
        pairs = {"p": make_bundle(tiny_backbone, "p", text_pairs=True, seed=8),
                 "reg": make_bundle(tiny_backbone, "reg", labels=(), text_pairs=True, seed=9)}
        for name, bundle in pairs.items():
            assert client.put(f"/v1/tasks/{name}", content=bundle, headers=AUTH).status_code == 201
        client.engine = app.state.supermask.engine
        yield client


def count_passes(engine, monkeypatch) -> list[int]:
    """Record the number of rows of every forward pass the engine makes."""
    passes = []
    real = engine.forward._pass

    def spy(segs, rows, forms=None):
        passes.append(sum(len(r) for r in rows))
        return real(segs, rows, forms)

    monkeypatch.setattr(engine.forward, "_pass", spy)
    return passes


@pytest.mark.parametrize("body", [{}, {"top_k": None, "function_to_apply": "sigmoid"}, {"raw_scores": True}])
def test_fanout_equals_the_separate_calls_from_one_pass(server, monkeypatch, body):
    inputs = ["a lovely film", "a dreadful , overlong film"]
    separate = {t: server.post(f"/v1/tasks/{t}/predict", json={"inputs": inputs, **body}).json() for t in SINGLE}
    passes = count_passes(server.engine, monkeypatch)
    r = server.post("/v1/predict", json={"inputs": inputs, "tasks": ["c", "a", "b"], **body})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [res["task"] for res in results] == ["c", "a", "b"]
    assert passes == [6]  # 2 inputs x 3 tasks, one length class: ONE mixed-task pass
    for res in results:
        want = separate[res["task"]]
        assert len(res["predictions"]) == 2
        for got, exp in zip(res["predictions"], want["predictions"]):
            assert got.keys() == exp.keys() and got["label"] == exp["label"]
            assert got["scores"] == pytest.approx(exp["scores"], rel=1e-5, abs=1e-6)


def test_star_means_every_stored_task_taking_the_inputs(server, monkeypatch):
    passes = count_passes(server.engine, monkeypatch)
    r = server.post("/v1/predict", json={"inputs": ["one text"], "tasks": "*"})
    assert r.status_code == 200, r.text
    assert [res["task"] for res in r.json()["results"]] == ["a", "b", "c"] and passes == [3]
    pair = [["a man is dancing", "a man dances"]]
    r = server.post("/v1/predict", json={"inputs": pair, "tasks": "*", "top_k": 1})
    assert r.status_code == 200, r.text
    got = {res["task"]: res["predictions"][0] for res in r.json()["results"]}
    assert set(got) == {"p", "reg"}
    # the regression task answers its value: classification-only options apply to classification tasks
    assert set(got["reg"]) == {"value"} and len(got["p"]["top"]) == 1
    want = server.post("/v1/tasks/reg/predict", json={"inputs": pair}).json()["predictions"][0]
    assert got["reg"]["value"] == pytest.approx(want["value"], rel=1e-5)


def test_star_is_bounded_by_the_setting(server):
    bb = server.engine.backbone
    for name in ("d", "e"):
        server.put(f"/v1/tasks/{name}", content=make_bundle(bb, name), headers=AUTH)
    r = server.post("/v1/predict", json={"inputs": ["x"], "tasks": "*"})
    assert r.status_code == 422 and "fan-out limit of 4" in r.json()["error"]["message"]


@pytest.mark.parametrize("tasks, status, says", [
    ([], 422, "tasks is empty"),
    (["a", "a"], 422, "named twice"),
    (["a", "b", "c", "a", "b"], 422, "fan-out limit of 4"),
    (["a", "nope"], 404, "nope"),
    (["a", "p"], 422, "pairs"),
    (["a", "bad name!"], 422, "bad name!"),
    ("all", 422, "tasks"),
])
def test_bad_fanouts(server, tasks, status, says):
    r = server.post("/v1/predict", json={"inputs": ["x"], "tasks": tasks})
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]


def test_fanout_needs_tasks_and_refuses_unknown_fields(server):
    r = server.post("/v1/predict", json={"inputs": ["x"]})
    assert r.status_code == 422 and "tasks" in r.json()["error"]["message"]
    r = server.post("/v1/predict", json={"inputs": ["x"], "tasks": ["a"], "models": ["b"]})
    assert r.status_code == 422 and "models" in r.json()["error"]["message"]


@pytest.mark.parametrize("engine_kw", [
    {"precision": "fp32"},
    {"precision": "bf16"},
    {"emulate_device_path": "gpu_complement", "device_slots": 2},  # 3 tasks, 2 slots: two passes
], ids=["fp32", "bf16-hot-tier", "device-tier-2-slots"])
def test_engine_fanout_equals_separate_predictions_on_every_tier(tiny_backbone, tmp_path, monkeypatch, engine_kw):
    import asyncio

    from mask_store.local import LocalMaskStore
    from service.engine import Engine, PredictOptions, PredictRequest
    from service.kernels import cpu_hot
    from service.metrics import Metrics

    if engine_kw.get("precision") == "bf16" and cpu_hot.unavailable_reason("bf16"):
        pytest.skip(f"bf16 hot tier: {cpu_hot.unavailable_reason('bf16')}")
    store = LocalMaskStore(tmp_path / "s")
    for seed, (name, labels) in enumerate(SINGLE.items()):
        store.put(name, make_bundle(tiny_backbone, name, labels=labels, seed=seed, sparsity=0.1 * (seed + 1)))
    engine = Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu", **engine_kw)
    rows = (("a lovely film", None), ("a dreadful , overlong film", None))
    opts = PredictOptions(ranked=True, function_to_apply="sigmoid")
    separate = [engine.predict(PredictRequest(t, rows, opts)) for t in SINGLE]
    passes = count_passes(engine, monkeypatch)
    fan = asyncio.run(engine.predict_fanout_async([PredictRequest(t, rows, opts) for t in SINGLE]))
    assert passes == ([6] if "device_slots" not in engine_kw else [4, 2])
    for got, want in zip(fan, separate):
        for g, w in zip(got, want):
            assert g["label"] == w["label"] and [t["label"] for t in g["top"]] == [t["label"] for t in w["top"]]
            assert g["scores"] == pytest.approx(w["scores"], rel=1e-4, abs=1e-5)
