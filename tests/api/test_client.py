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
from supermask.client import ApiError, AsyncClient, CallTimedOut, Client, ClientError, ServerUnreachable
from tests.conftest import EXAMPLES_DIR, REPO, make_bundle
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


def test_an_unreachable_server_is_the_clients_typed_error(capsys):
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with Client(url, retries=1, backoff_s=0.01) as c, pytest.raises(ServerUnreachable) as exc:
        c.tasks()
    assert isinstance(exc.value, ClientError) and exc.value.connect and url in str(exc.value)
    assert isinstance(exc.value.__cause__, httpx.ConnectError)

    async def go():
        async with AsyncClient(url, retries=0) as c:
            await c.tasks()

    with pytest.raises(ServerUnreachable):
        asyncio.run(go())
    code, _, err = run_cli(capsys, "tasks", "--url", url, "--retries", "0")
    assert code == 2 and f"cannot reach the server at {url}" in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["soon", "²", "1.5", "-3", "Fri, 99 Foo 2026 25:61:61 GMT"])
def test_a_retry_after_that_is_no_number_or_date_is_ignored(value):
    header = {"Retry-After": value.encode("latin-1")}  # as sent on the wire ('²' is byte 0xb2)
    script = Script((429, header), (429, header))
    waits = []
    c = Client("http://server", transport=httpx.MockTransport(script), retries=1, backoff_s=0.01)
    c.sleep = waits.append
    with pytest.raises(ApiError) as exc:
        c.predict("t", ["x"])
    assert exc.value.status == 429 and exc.value.retry_after is None
    assert script.calls == 2 and len(waits) == 1 and waits[0] <= 0.02  # exponential back-off instead


class Trickle:
    """A loopback HTTP server that answers every request one byte per ``interval_s``: the status line and
    headers too (``head=True``), or a complete head and then the body."""

    def __init__(self, head: bool, interval_s: float = 0.2):
        import socket
        import threading

        self.head, self.interval_s, self.stop = head, interval_s, threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        import threading

        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn):
        body = b'{"task": "t", "predictions": [{"value": 1.5}]}'
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
        with conn:
            conn.recv(65536)
            if not self.head:
                conn.sendall(head)
            for k in range(len(head + body) if self.head else len(body)):
                if self.stop.wait(self.interval_s):
                    return
                try:
                    conn.sendall(((head + body) if self.head else body)[k:k + 1])
                except OSError:
                    return

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@pytest.mark.parametrize("head", [True, False], ids=["trickled-head", "trickled-body"])
def test_the_timeout_bounds_the_whole_call(head, capsys):
    """A server sending a byte every 0.2 s (each read well within httpx's per-read timeout) cannot hold a call
    past its timeout: sync, async and the CLI give up at ~1 s with the client's typed error."""
    server = Trickle(head)
    try:
        started = time.monotonic()
        with Client(server.url, timeout=1.0, retries=0) as c, pytest.raises(CallTimedOut) as exc:
            c.predict("t", ["x"])
        assert time.monotonic() - started < 3 and "1 s" in str(exc.value)

        async def go():
            async with AsyncClient(server.url, timeout=1.0, retries=0) as c:
                await c.predict("t", ["x"])

        started = time.monotonic()
        with pytest.raises(CallTimedOut):
            asyncio.run(go())
        assert time.monotonic() - started < 3
        started = time.monotonic()
        code, _, err = run_cli(capsys, "predict", "t", "x", "--url", server.url, "--timeout", "1")
        assert code == 2 and "within the timeout of 1 s" in err and time.monotonic() - started < 3
    finally:
        server.close()
    with Client("http://server", transport=httpx.MockTransport(Script()), timeout=1) as c:
        assert c.predict("t", ["x"]).predictions[0].value == 1.5  # a prompt answer is unaffected


def test_upload_renames_with_task_and_the_cli_explains_pairs_and_case(base_url, backbone, tmp_path, capsys):
    bundle = tmp_path / "orig.smask"
    bundle.write_bytes(make_bundle(backbone, "orig", seed=11))
    with Client(base_url, TOKEN) as c, pytest.raises(ApiError) as exc:
        c.upload("renamed", bundle)  # without rename the server refuses the mismatch, as before
    assert exc.value.status == 422
    code, out, err = run_cli(capsys, "upload", str(bundle), "--task", "renamed", "--url", base_url, "--token", TOKEN)
    assert code == 0 and "created task 'renamed' (bundle of task 'orig', renamed)" in err
    assert json.loads(out)["name"] == "renamed"
    assert raw(base_url, "renamed", {"inputs": ["good"]})["predictions"][0]["label"] in ("neg", "pos")
    with Client(base_url, TOKEN) as c:
        assert c.task("renamed").name == "renamed"
        c.delete("renamed")
    # a pair task sent one text, a single-text task sent --pairs: the error says how to call it
    code, _, err = run_cli(capsys, "predict", "sim", "one text", "--url", base_url)
    assert code == 2 and "422" in err and "takes sentence pairs" in err and "--pairs" in err
    code, _, err = run_cli(capsys, "predict", "toy", "a", "b", "--pairs", "--url", base_url)
    assert code == 2 and "takes single texts: leave out --pairs" in err
    # a name in the wrong case: 404, naming the stored task
    r = httpx.post(f"{base_url}/v1/tasks/TOY/predict", json={"inputs": ["good"]})
    assert r.status_code == 404 and r.json()["error"]["type"] == "TaskNotFound"
    assert "did you mean 'toy'?" in r.json()["error"]["message"]
    assert "did you mean" not in httpx.get(f"{base_url}/v1/tasks/zzz").json()["error"]["message"]
    code, _, err = run_cli(capsys, "predict", "TOY", "good", "--url", base_url)
    assert code == 2 and "did you mean 'toy'?" in err


@pytest.mark.parametrize("rid,kept", [
    ("my-job 42/step:3", True), ("a" * 128, True), ("0123456789abcdef0123456789abcdef", True),
    ("a" * 129, False), ("caf\u00e9", False), ("tab\there", False)])
def test_a_printable_bounded_request_id_is_kept(base_url, rid, kept):
    r = httpx.get(f"{base_url}/healthz", headers={"X-Request-ID": rid.encode("latin-1")})
    got = r.headers["x-request-id"]
    assert (got == rid) is kept
    if not kept:
        assert len(got) == 32 and all(ch in "0123456789abcdef" for ch in got)


def readme_cli_lines() -> list[str]:
    """The command lines of the README's shell example of the client commands (comments and blanks left out)."""
    text = (REPO / "README.md").read_text()
    start = text.index("```bash", text.index("The same from the shell")) + len("```bash")
    block = text[start:text.index("```", start)]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_the_readme_cli_section_works_after_serve_sh(tmp_path, capsys, monkeypatch):
    """Every line of the README's CLI example, run as written (in the repository root, as after serve.sh)
    against a server of the shipped example tasks: the exit status and the message its comment shows."""
    import shlex

    from backbone import BackboneLoadError, default_backbone_path

    try:
        default_backbone_path()
    except BackboneLoadError as exc:
        pytest.skip(str(exc))
    lines = readme_cli_lines()
    # the command is on PATH: serve.sh installs the package (its `supermask` script) into .venv
    assert lines[0].startswith("source .venv/bin/activate")
    assert 'pip install --quiet -e ".[dev]"' in (REPO / "scripts" / "bootstrap.sh").read_text()
    assert '\nsupermask = "supermask.cli:main"' in (REPO / "pyproject.toml").read_text()
    monkeypatch.chdir(REPO)
    settings = Settings(device="cpu", store_dir=tmp_path / "store", examples_dir=EXAMPLES_DIR,
                        admin_token="change-me")
    with live_server(create_app(settings)) as url:
        for line in lines[1:]:
            command, _, comment = line.partition("#")
            argv = shlex.split(command)
            if argv[0] == "export":
                for pair in argv[1:]:
                    name, _, value = pair.partition("=")
                    monkeypatch.setenv(name, url if name == "SUPERMASK_URL" else value)
                continue
            assert argv[0] == "supermask", line
            code = cli.main(argv[1:])
            _, err = capsys.readouterr()
            comment = comment.strip()
            assert code == (2 if comment.endswith("(exit 2)") else 0), (line, err)
            if comment.startswith("error:"):  # the message as shown, '...' standing for any text
                for piece in comment.removesuffix("(exit 2)").strip().split("..."):
                    assert piece.strip() in err, (line, piece, err)
            elif comment.startswith(("created", "deleted")):
                assert comment in err, (line, err)
