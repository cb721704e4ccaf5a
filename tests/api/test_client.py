"""The Python client (sync and async) and the client commands of the CLI, against a live uvicorn server;
retries on 429 / 503 honouring Retry-After, against a scripted transport."""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import time

import httpx
import pytest

from service.api.main import create_app
from service.api.schemas import LabelScore, PredictPublic
from service.settings import Settings
from supermask import cli
from supermask.client import ApiError, AsyncClient, Client
from tests.conftest import make_bundle
from tests.live_server import live_server

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def backbone(tiny_backbone_dir):
    from backbone import load_backbone

    return load_backbone(tiny_backbone_dir)


@pytest.fixture(scope="module")
def base_url(backbone, tmp_path_factory):
    settings = Settings(device="cpu", store_dir=tmp_path_factory.mktemp("store"), examples_dir=None,
                        admin_token=TOKEN)
    with live_server(create_app(settings, backbone=backbone)) as url:
        with Client(url, TOKEN) as c:
            c.upload("toy", make_bundle(backbone, "toy", labels=("neg", "neutral", "pos")))
            c.upload("sim", make_bundle(backbone, "sim", labels=(), text_pairs=True, seed=5))
        yield url


def raw(base_url, task, body):
    r = httpx.post(f"{base_url}/v1/tasks/{task}/predict", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def same(a: dict, b: dict) -> bool:
    """Equal predictions, scores within float tolerance (a pass shared with other requests may round apart)."""
    return a.keys() == b.keys() and a.get("label") == b.get("label") and \
        a.get("scores") == pytest.approx(b.get("scores"), rel=1e-5, abs=1e-6)


def test_sync_client_predict_and_typed_results(base_url):
    texts = ["a lovely film", "a dreadful film"]
    with Client(base_url) as c:
        got = c.predict("toy", texts, top_k=2, function_to_apply="sigmoid")
        assert isinstance(got, PredictPublic) and isinstance(got.predictions[0].top[0], LabelScore)
        assert got.model_dump(exclude_none=True) == raw(base_url, "toy", {"inputs": texts, "top_k": 2,
                                                                         "function_to_apply": "sigmoid"})
        assert c.predict("toy", texts).model_dump(exclude_none=True) == raw(base_url, "toy", {"inputs": texts})
        assert [len(p.top) for p in c.predict("toy", texts, top_k=None).predictions] == [3, 3]
        pair = c.predict("sim", [("a man is dancing", "a man dances")])
        assert pair.predictions[0].value is not None and pair.predictions[0].label is None
        fan = c.predict_tasks(["toy"], texts, raw_scores=True)
        assert fan.results[0].model_dump(exclude_none=True) == raw(base_url, "toy", {"inputs": texts,
                                                                                     "raw_scores": True})
        assert c.health().status == "ok"
        with pytest.raises(TypeError):
            c.predict("toy", "one string")


def test_sync_client_admin_round_trip_and_errors(base_url, backbone):
    with Client(base_url, TOKEN) as c:
        info, created = c.upload("extra", make_bundle(backbone, "extra", seed=9))
        assert created and info.name == "extra"
        assert c.upload("extra", make_bundle(backbone, "extra", seed=10))[1] is False
        assert "extra" in [t.name for t in c.tasks().tasks] and c.task("extra").labels == ["neg", "pos"]
        c.delete("extra")
        with pytest.raises(ApiError) as exc:
            c.predict("extra", ["x"])
        assert exc.value.status == 404 and exc.value.type == "TaskNotFound" and "extra" in exc.value.message
    with Client(base_url, "wrong-token") as c, pytest.raises(ApiError) as exc:
        c.delete("toy")
    assert exc.value.status == 403 and exc.value.type == "Forbidden"


def test_async_client(base_url, backbone):
    async def go():
        async with AsyncClient(base_url, TOKEN) as c:
            got = await asyncio.gather(*(c.predict("toy", [t]) for t in ("good", "bad", "fine")))
            for g, t in zip(got, ("good", "bad", "fine")):
                assert same(g.predictions[0].model_dump(exclude_none=True), raw(base_url, "toy", {"inputs": [t]})
                            ["predictions"][0])
            _, created = await c.upload("async-task", make_bundle(backbone, "async-task"))
            assert created and "async-task" in [t.name for t in (await c.tasks()).tasks]
            fan = await c.predict_tasks("*", ["good"])
            assert {r.task for r in fan.results} == {"toy", "async-task"}
            await c.delete("async-task")
            with pytest.raises(ApiError) as exc:
                await c.task("async-task")
            assert exc.value.status == 404

    asyncio.run(go())


class Script:
    """A transport answering from a list of (status, headers) and then 200 with a prediction; records calls."""

    def __init__(self, *replies):
        self.replies, self.calls = list(replies), 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.replies:
            status, headers = self.replies.pop(0)
            return httpx.Response(status, headers=headers,
                                  json={"error": {"type": "Overloaded", "message": "queue full"}})
        return httpx.Response(200, json={"task": "t", "predictions": [{"value": 1.5}]})


def test_retries_honour_retry_after():
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    script = Script((429, {"Retry-After": "2"}), (503, {}), (429, {"Retry-After": date}))
    waits = []
    c = Client("http://server", transport=httpx.MockTransport(script), retries=3, backoff_s=0.01)
    c.sleep = waits.append
    assert c.predict("t", ["x"]).predictions[0].value == 1.5
    assert script.calls == 4
    assert waits[0] == 2.0 and waits[1] <= 0.02 and 25 < waits[2] <= 30  # Retry-After, back-off, HTTP date


def test_retries_stop_and_other_errors_are_not_retried():
    script = Script(*[(503, {"Retry-After": "0"})] * 5)
    c = Client("http://server", transport=httpx.MockTransport(script), retries=2)
    c.sleep = lambda s: None
    with pytest.raises(ApiError) as exc:
        c.predict("t", ["x"])
    assert exc.value.status == 503 and exc.value.type == "Overloaded" and script.calls == 3
    script = Script((422, {}))
    c = Client("http://server", transport=httpx.MockTransport(script), retries=5)
    with pytest.raises(ApiError) as exc:
        c.predict("t", ["x"])
    assert exc.value.status == 422 and script.calls == 1


def test_async_retries_honour_retry_after():
    script = Script((429, {"Retry-After": "3"}))
    waits = []

    async def sleep(s):
        waits.append(s)

    async def go():
        async with AsyncClient("http://server", transport=httpx.MockTransport(script)) as c:
            c.sleep = sleep
            return await c.predict("t", ["x"])

    assert asyncio.run(go()).predictions[0].value == 1.5 and waits == [3.0] and script.calls == 2


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_client_commands(base_url, backbone, tmp_path, capsys, monkeypatch):
    code, out, _ = run_cli(capsys, "predict", "toy", "a lovely film", "dull", "--top-k", "all", "--url", base_url)
    assert code == 0
    assert json.loads(out) == raw(base_url, "toy", {"inputs": ["a lovely film", "dull"], "top_k": None})
    code, out, _ = run_cli(capsys, "predict", "sim", "a man", "a man dances", "--pairs", "--url", base_url)
    assert code == 0 and "value" in json.loads(out)["predictions"][0]
    monkeypatch.setenv("SUPERMASK_URL", base_url)
    monkeypatch.setenv("SUPERMASK_ADMIN_TOKEN", TOKEN)
    code, out, _ = run_cli(capsys, "predict", "toy,toy2", "good")
    assert code == 2  # toy2 does not exist (yet)
    bundle = tmp_path / "toy2.smask"
    bundle.write_bytes(make_bundle(backbone, "toy2", seed=3))
    code, out, err = run_cli(capsys, "upload", str(bundle))
    assert code == 0 and "created task 'toy2'" in err and json.loads(out)["name"] == "toy2"
    code, out, _ = run_cli(capsys, "predict", "toy,toy2", "good")
    assert code == 0 and [r["task"] for r in json.loads(out)["results"]] == ["toy", "toy2"]
    code, out, _ = run_cli(capsys, "tasks")
    assert code == 0 and out.splitlines()[0].split()[:2] == ["task", "problem"] and "toy2" in out
    code, out, _ = run_cli(capsys, "tasks", "--json")
    assert json.loads(out)["count"] == 3
    code, _, err = run_cli(capsys, "delete", "toy2")
    assert code == 0 and "deleted" in err
    code, _, err = run_cli(capsys, "delete", "toy2")
    assert code == 2 and "404 TaskNotFound" in err
    code, _, err = run_cli(capsys, "tasks", "--url", "http://127.0.0.1:9", "--retries", "0")
    assert code == 2 and "cannot reach the server" in err
    monkeypatch.setattr("sys.stdin", io.StringIO("good\n\nbad\n"))
    code, out, _ = run_cli(capsys, "predict", "toy", "-")
    assert code == 0 and json.loads(out) == raw(base_url, "toy", {"inputs": ["good", "bad"]})
    with pytest.raises(SystemExit):
        cli.main(["predict", "toy", "x", "--top-k", "0"])
    assert "--top-k" in capsys.readouterr().err
