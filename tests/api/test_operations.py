"""Operations: bounded admission (429 with Retry-After), request timeouts (503), request ids echoed and in
the log lines of their request, /readyz, and the opt-in CORS and gzip middlewares."""

from __future__ import annotations

import asyncio
import logging
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from service.api.main import create_app
from service.settings import Settings
from tests.api.test_api import AUTH, TOKEN
from tests.conftest import make_bundle


def _settings(tmp_path, **kw) -> Settings:
    return Settings(device="cpu", store_dir=tmp_path / "store", examples_dir=None, admin_token=TOKEN, **kw)


def _slow_forward(app, seconds: float, started: threading.Event | None = None):
    """Make every forward pass of ``app``'s engine take ``seconds`` longer (a saturated server)."""
    engine = app.state.supermask.engine
    real = engine._predict_prepared

    def slow(*a, **k):
        if started is not None:
            started.set()
        threading.Event().wait(seconds)
        return real(*a, **k)

    engine._predict_prepared = slow


@pytest.mark.parametrize("batching", [False, True])
def test_saturated_queue_answers_429_with_retry_after_and_stays_bounded(tiny_backbone, tmp_path, batching):
    app = create_app(_settings(tmp_path, max_queued_requests=3, batching=batching), backbone=tiny_backbone)
    with TestClient(app):
        pass  # start-up (lifespan) runs in the async client below
    engine = app.state.supermask.engine

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            r = await client.put("/v1/tasks/toy", content=make_bundle(tiny_backbone, "toy"), headers=AUTH)
            assert r.status_code == 201, r.text
            if batching:  # slow the batcher's pass
                real = engine.batcher._forward

                def slow(*a, **k):
                    threading.Event().wait(0.5)
                    return real(*a, **k)

                engine.batcher._forward = slow
            else:
                _slow_forward(app, 0.5)
            calls = [client.post("/v1/tasks/toy/predict", json={"inputs": [f"text {i}"]}) for i in range(12)]
            answers = await asyncio.gather(*calls)
            for _ in range(100):  # slots are released when the admitted work has finished
                if engine._admitted == 0:
                    break
                await asyncio.sleep(0.05)
            assert engine._admitted == 0
            return answers

    answers = asyncio.run(scenario())
    codes = sorted(r.status_code for r in answers)
    assert codes.count(200) >= 3 and codes.count(429) >= 6, codes
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "Overloaded" and "SUPERMASK_MAX_QUEUED_REQUESTS" in refused.text


def test_request_timeout_is_503_with_retry_after(tiny_backbone, tmp_path):
    app = create_app(_settings(tmp_path, request_timeout_s=0.2, batching=False), backbone=tiny_backbone)
    with TestClient(app) as client:
        assert client.put("/v1/tasks/toy", content=make_bundle(tiny_backbone, "toy"), headers=AUTH).status_code == 201
        _slow_forward(app, 1.0)
        r = client.post("/v1/tasks/toy/predict", json={"inputs": ["slow"]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "RequestTimedOut", r.text
        assert r.headers["retry-after"] == "1"
        engine = app.state.supermask.engine
        assert engine._admitted == 1  # answered, but its pass still runs: the slot stays taken until it ends
        for _ in range(100):
            if engine._admitted == 0:
                break
            threading.Event().wait(0.05)
        assert engine._admitted == 0


def test_request_id_is_echoed_generated_and_in_the_log(tiny_backbone, tmp_path):
    from asgi_correlation_id import CorrelationIdFilter

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep()
    handler.addFilter(CorrelationIdFilter(uuid_length=32, default_value="-"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        with TestClient(create_app(_settings(tmp_path), backbone=tiny_backbone)) as client:
            rid = "0123456789abcdef0123456789abcdef"
            r = client.put("/v1/tasks/toy", content=make_bundle(tiny_backbone, "toy"),
                           headers={**AUTH, "X-Request-ID": rid})
            assert r.status_code == 201 and r.headers["x-request-id"] == rid
            generated = client.get("/v1/tasks/nope").headers["x-request-id"]  # errors carry one too
            assert len(generated) == 32 and generated != rid
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    stored = [rec for rec in records if rec.getMessage().startswith("stored task toy")]
    assert stored and all(rec.correlation_id == rid for rec in stored)


def test_readyz_before_and_after_start_up(tiny_backbone, tmp_path):
    app = create_app(_settings(tmp_path), backbone=tiny_backbone)
    client = TestClient(app)
    r = client.get("/readyz")  # no lifespan run yet: the app is not started
    assert r.status_code == 503 and r.json()["error"]["type"] == "NotReady"
    with client:
        assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/readyz").status_code == 503  # shut down


def test_cors_and_gzip_are_off_by_default_and_work_when_set(tiny_backbone, tiny_backbone_dir, tmp_path):
    from backbone import load_backbone

    with TestClient(create_app(_settings(tmp_path / "a"), backbone=tiny_backbone)) as client:
        r = client.get("/v1/tasks", headers={"Origin": "https://app.example", "Accept-Encoding": "gzip"})
        assert "access-control-allow-origin" not in r.headers and r.headers.get("content-encoding") != "gzip"
    settings = _settings(tmp_path / "b", cors_origins=["https://app.example"], gzip_min_bytes=100)
    with TestClient(create_app(settings, backbone=load_backbone(tiny_backbone_dir))) as client:
        for i in range(3):
            client.put(f"/v1/tasks/t{i}", content=make_bundle(tiny_backbone, f"t{i}"), headers=AUTH)
        r = client.get("/v1/tasks", headers={"Origin": "https://app.example", "Accept-Encoding": "gzip"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert r.headers["content-encoding"] == "gzip" and r.json()["count"] == 3
        pre = client.options("/v1/tasks/t0/predict", headers={"Origin": "https://app.example",
                                                               "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200 and "POST" in pre.headers["access-control-allow-methods"]


def test_an_unforeseen_error_is_a_500_with_the_request_id_and_no_trace(tiny_backbone, tmp_path):
    app = create_app(_settings(tmp_path), backbone=tiny_backbone)
    with TestClient(app, raise_server_exceptions=False) as client:
        def boom():
            raise RuntimeError("/secret/path/in/a/message")

        app.state.supermask.engine.status = boom
        r = client.get("/healthz", headers={"X-Request-ID": "feedfacefeedfacefeedfacefeedface"})
        assert r.status_code == 500 and r.json() == {"error": {"type": "InternalError",
                                                               "message": "internal server error (logged on the server)"}}
        assert r.headers["x-request-id"] == "feedfacefeedfacefeedfacefeedface"
        assert "secret" not in r.text


def test_oip_tensor_data_nested_too_deep_is_a_422(tiny_backbone, tmp_path):
    with TestClient(create_app(_settings(tmp_path), backbone=tiny_backbone)) as client:
        client.put("/v1/tasks/toy", content=make_bundle(tiny_backbone, "toy"), headers=AUTH)
        deep = "x"
        for _ in range(600):
            deep = [deep]
        r = client.post("/v2/models/toy/infer",
                        json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": deep}]})
        assert r.status_code == 422 and "nested" in r.json()["error"], r.text
