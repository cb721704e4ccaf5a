"""OpenTelemetry tracing (service/tracing.py), with the SDK's in-memory exporter: off by default; on, a predict
gives a server span with the engine's stages under it (micro-batched: a batch span linked to the request)."""

from __future__ import annotations

import pytest

from tests.conftest import make_bundle

sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="the otel extra is not installed")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from service import tracing  # noqa: E402

INPUTS = {"inputs": ["a charming and often affecting journey", "dull"]}


@pytest.fixture()
def spans():
    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider=provider)
    try:
        yield exporter
    finally:
        tracing.disable()


def _client(backbone, tmp_path, **settings):
    from fastapi.testclient import TestClient

    from service.api.main import create_app
    from service.settings import Settings

    (tmp_path / "t.smask").write_bytes(make_bundle(backbone, "t", seed=1))
    return TestClient(create_app(Settings(store_dir=tmp_path, examples_dir=None, device="cpu", **settings),
                                 backbone=backbone))


def _by_name(exporter) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in exporter.get_finished_spans():
        out.setdefault(s.name, []).append(s)
    return out


def test_tracing_is_off_by_default(tiny_backbone, tmp_path):
    from service.settings import Settings

    assert Settings().otel_tracing is False
    with _client(tiny_backbone, tmp_path) as c:
        assert c.post("/v1/tasks/t/predict", json=INPUTS).status_code == 200
    assert not tracing.enabled()


def test_tracing_off_makes_no_span_even_when_the_process_has_a_tracer_provider(tiny_backbone, tmp_path, monkeypatch):
    """FastAPI traces every request natively once a global provider is set (by ``opentelemetry-instrument``, another
    library): with tracing off, the server makes no span of its own either way."""
    from opentelemetry import trace

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    with _client(tiny_backbone, tmp_path) as c:
        assert c.post("/v1/tasks/t/predict", json=INPUTS).status_code == 200
        assert c.get("/healthz").status_code == 200
    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize("batching", [True, False])
def test_a_predict_is_traced_stage_by_stage(spans, tiny_backbone, tmp_path, batching):
    with _client(tiny_backbone, tmp_path, otel_tracing=True, batching=batching) as c:
        assert c.post("/v1/tasks/t/predict", json=INPUTS).status_code == 200
        assert c.get("/healthz").status_code == 200  # excluded: no span
    got = _by_name(spans)
    server = [s for s in got.get("POST /v1/tasks/{task}/predict", []) if s.parent is None]
    assert len(server) == 1, list(got)
    request = server[0].context
    assert not any("healthz" in name for name in got)

    def under_request(s) -> bool:
        return s.context.trace_id == request.trace_id and s.parent is not None

    (prepare,) = got["supermask.prepare"]
    assert under_request(prepare) and prepare.attributes["rows"] == 2
    (tokenize,) = got["supermask.tokenize"]
    (forward,) = got["supermask.forward"]
    assert forward.attributes["rows"] == 2 and forward.end_time - forward.start_time > 0
    if batching:
        (queue,) = got["supermask.queue"]
        (batch,) = got["supermask.batch"]
        assert under_request(queue) and queue.attributes["task"] == "t"
        assert batch.parent is None and [link.context.span_id for link in batch.links] == [queue.parent.span_id]
        # a request is tokenized once, while it is prepared (before it queues); its pass runs in the batch
        assert tokenize.parent.span_id == prepare.context.span_id and forward.parent.span_id == batch.context.span_id
        assert tokenize.end_time <= prepare.end_time <= queue.end_time <= batch.start_time <= forward.start_time
        assert forward.end_time <= batch.end_time
    else:
        assert "supermask.batch" not in got and "supermask.queue" not in got
        assert under_request(tokenize) and under_request(forward)
