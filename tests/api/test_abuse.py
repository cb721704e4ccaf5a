"""Abuse that costs the attacker bytes and the server far more (issue 35): reply amplification, malformed v2
fields and headers, slow and idle connections, work for clients that left. Each test fails without its bound.

Slow-client tests run a real uvicorn on loopback (127.0.0.1 only) with sub-second timeouts, a handful of
sockets, and deadlines on every wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from service.api.main import create_app
from service.settings import Settings
from tests.api.test_api import AUTH, TOKEN
from tests.conftest import make_bundle

WIDE = tuple(f"label-{i:03d}-" + "x" * 30 for i in range(100))  # 100 labels of 40 characters: within the bounds


@pytest.fixture(scope="module")
def server(tiny_backbone_dir, tmp_path_factory):
    from backbone import load_backbone

    bb = load_backbone(tiny_backbone_dir)
    settings = Settings(device="cpu", store_dir=tmp_path_factory.mktemp("store"), examples_dir=None,
                        admin_token=TOKEN, max_inputs_per_request=8, max_response_bytes=10_000, max_work_rows=6,
                        batching=False)
    with TestClient(create_app(settings, backbone=bb), raise_server_exceptions=False) as client:
        for name, labels, pairs in (("toy", ("neg", "pos"), False), ("wide", WIDE, False),
                                    ("toy2", ("a", "b"), False), ("pair", ("no", "yes"), True)):
            r = client.put(f"/v1/tasks/{name}", content=make_bundle(bb, name, labels=labels, text_pairs=pairs),
                           headers=AUTH)
            assert r.status_code == 201, r.text
        client.backbone = bb
        yield client


def _v1_error(r, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    assert r.json()["error"]["type"] == kind, r.text
    return r.json()["error"]["message"]


def _infer(texts, outputs=None, **extra) -> dict:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": list(texts)}], **extra}
    if outputs is not None:
        body["outputs"] = outputs
    return body


# ---- 1. reply amplification ------------------------------------------------------------------------------------


def test_v2_output_named_twice_is_refused_before_any_work(server):
    r = server.post("/v2/models/toy/infer", json=_infer(["fine"] * 8, [{"name": "logits"}] * 1000))
    assert r.status_code == 422 and "named twice" in r.json()["error"], r.text
    assert len(r.content) < 300  # the refusal does not echo the request
    r = server.post("/v2/models/toy/infer", json=_infer(["fine"], [{"name": "label"}, {"name": "score"}]))
    assert r.status_code == 200 and [o["name"] for o in r.json()["outputs"]] == ["label", "score"]


def test_upload_with_too_many_or_too_long_labels_is_refused(server):
    bb = server.backbone
    many = make_bundle(bb, "many", labels=tuple(f"l{i}" for i in range(129)))  # default bound: 128
    msg = _v1_error(server.put("/v1/tasks/many", content=many, headers=AUTH), 422, "BundleInvalid")
    assert "129 labels, more than the limit of 128 (SUPERMASK_MAX_LABELS)" in msg
    long = make_bundle(bb, "long", labels=("short", "y" * 65))  # default bound: 64 characters
    assert "SUPERMASK_MAX_LABEL_CHARS" in _v1_error(server.put("/v1/tasks/long", content=long, headers=AUTH), 422,
                                                    "BundleInvalid")
    assert server.get("/v1/tasks/many").status_code == 404 and server.get("/v1/tasks/long").status_code == 404


def test_default_label_bounds_keep_a_full_top_k_reply_small():
    """At the default bounds (128 labels x 64 characters, 64 inputs) a full-ranking predict reply stays under
    the default reply budget: the single-task route is bounded by construction."""
    from mask_store.format import BundleHeader
    from service.api.limits import predict_reply_bytes

    s = Settings(_env_file=None)
    labels = [("é" * s.max_label_chars)[:-len(str(i))] + str(i) for i in range(s.max_labels)]
    header = BundleHeader.model_construct(problem_type="single_label_classification", labels=labels)
    worst = predict_reply_bytes("t" * 64, header, s.max_inputs_per_request, ranked=True, top_k=None)
    assert worst <= s.max_response_bytes, worst


def test_fanout_reply_over_the_budget_is_refused_with_the_reason(server):
    from service.api.limits import predict_reply_bytes

    ok = server.post("/v1/predict", json={"inputs": ["a fine film"], "tasks": ["wide"]})
    assert ok.status_code == 200, ok.text
    estimate = predict_reply_bytes("wide", _header(server, "wide"), 1, ranked=False, top_k=None)
    assert len(ok.content) <= estimate  # the estimate is an upper bound of the real reply
    r = server.post("/v1/predict", json={"inputs": ["a fine film"], "tasks": ["wide"], "top_k": None})
    msg = _v1_error(r, 422, "ReplyTooLarge")
    assert "more than the reply limit of 10000 bytes (SUPERMASK_MAX_RESPONSE_BYTES)" in msg
    ranked = server.post("/v1/predict", json={"inputs": ["a fine film"], "tasks": ["wide"], "top_k": 2})
    assert ranked.status_code == 200 and len(ranked.json()["results"][0]["predictions"][0]["top"]) == 2


def test_v2_reply_over_the_budget_is_refused(server):
    ok = server.post("/v2/models/wide/infer", json=_infer(["fine", "dull"]))
    assert ok.status_code == 200 and len(ok.json()["outputs"][2]["data"]) == 200, ok.text
    r = server.post("/v2/models/wide/infer", json=_infer(["fine"] * 8))
    assert r.status_code == 422 and "SUPERMASK_MAX_RESPONSE_BYTES" in r.json()["error"], r.text
    assert server.post("/v2/models/wide/infer", json=_infer(["fine"] * 8, [{"name": "label"}])).status_code == 200


def _header(server, task):
    from mask_store.format import BundleHeader

    t = server.get(f"/v1/tasks/{task}").json()
    return BundleHeader.model_construct(problem_type=t["problem_type"], labels=t["labels"])


# ---- 2. malformed v2 fields and headers: 422, never 500 --------------------------------------------------------


@pytest.mark.parametrize("outputs", [[{"name": []}], [{"name": {}}], [{"name": 3}], [{"name": None}], [{}], ["label"],
                                     [[]], {"name": "label"}, "label", 7, [{"name": "nope"}]])
def test_malformed_v2_outputs_are_422(server, outputs):
    r = server.post("/v2/models/toy/infer", json=_infer(["fine"], outputs))
    assert r.status_code == 422 and set(r.json()) == {"error"}, r.text


@pytest.mark.parametrize("value", [b"\xb2", b"\xb9\xb3", b"1\xb2", b"\xd9\xa3", b"-1", b"+3", b"", b"9" * 40, b"0x10"])
def test_binary_extension_header_that_is_not_ascii_digits_is_422(slow_app, value):
    """Over a real socket (the in-process test client re-encodes header bytes): a latin-1 superscript digit is
    what ``str.isdigit`` takes and ``int`` refuses."""
    from service.api.server import HeadTimeoutProtocol

    body = json.dumps(_infer(["fine"])).encode()
    with _uvicorn(slow_app, HeadTimeoutProtocol) as port:
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(b"POST /v2/models/toy/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: " + value +
                  b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        reply = _closed_within(c, 10)
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 422"), reply[:300]
    assert "Inference-Header-Content-Length" in json.loads(payload)["error"]


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                     st.text(max_size=8), st.sampled_from(["text", "text_pair", "BYTES", "label", "score", "logits",
                                                            "FP32", "", "fine"]))
_json = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(["name", "datatype", "shape", "data", "parameters", "binary_data_size",
                                     "inputs", "outputs", "id", "x"]), inner, max_size=5)), max_leaves=20)
_tensor = st.fixed_dictionaries({}, optional={"name": st.one_of(st.sampled_from(["text", "text_pair"]), _json),
                                              "datatype": st.one_of(st.just("BYTES"), _json),
                                              "shape": st.one_of(st.lists(st.integers(-1, 3), max_size=3), _json),
                                              "data": st.one_of(st.lists(st.text(min_size=1, max_size=6), max_size=3),
                                                                _json),
                                              "parameters": st.one_of(st.fixed_dictionaries(
                                                  {"binary_data_size": st.one_of(st.integers(-2, 40), _json)}),
                                                  _json)})
_body = st.fixed_dictionaries({}, optional={"inputs": st.one_of(st.lists(_tensor, max_size=3), _json),
                                            "outputs": st.one_of(st.lists(st.one_of(st.fixed_dictionaries(
                                                {"name": _json}), _json), max_size=4), _json),
                                            "id": _json, "parameters": _json})


_PATHS = [("inputs",), ("inputs", 0), ("inputs", 0, "name"), ("inputs", 0, "datatype"), ("inputs", 0, "shape"),
          ("inputs", 0, "data"), ("inputs", 0, "parameters"), ("outputs",), ("outputs", 0), ("outputs", 0, "name"),
          ("outputs", 1, "name"), ("id",), ("parameters",)]


@st.composite
def _mutated(draw):
    """A valid inference request with one to three fields replaced by arbitrary JSON: the parser's every branch
    is reached with the rest of the request valid."""
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["fine"]}],
            "outputs": [{"name": "label"}, {"name": "score"}]}
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_PATHS))
        node = body
        for key in path[:-1]:
            node = node[key] if isinstance(node, dict) and key in node or isinstance(node, list) and \
                isinstance(key, int) and key < len(node) else None
            if not isinstance(node, (dict, list)):
                break
        else:
            if isinstance(node, dict) or isinstance(node, list) and isinstance(path[-1], int) and path[-1] < len(node):
                node[path[-1]] = draw(_json)
    return body


@hyp_settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=st.one_of(_mutated(), _body, _json), binary=st.binary(max_size=24),
       header=st.one_of(st.none(), st.text(alphabet=st.characters(max_codepoint=255, blacklist_categories=("Cc",)),
                                           max_size=6)),
       task=st.sampled_from(["toy", "pair"]))
def test_fuzzed_v2_bodies_and_binary_headers_never_answer_500(server, body, binary, header, task):
    head = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    content = head
    if header is not None:  # the binary extension: a header length (any latin-1 text), then raw bytes
        headers["inference-header-content-length"] = header.encode("latin-1")
        content = head + binary
    r = server.post(f"/v2/models/{task}/infer", content=content, headers=headers)
    assert r.status_code in (200, 422), (r.status_code, r.text[:300], body, header)
    assert set(r.json()) == ({"error"} if r.status_code == 422 else {"model_name", "model_version", "outputs"} |
                             ({"id"} if isinstance(body, dict) and isinstance(body.get("id"), str) else set()))


# ---- 4. work bounds; queued work of a client that left ---------------------------------------------------------


def test_fanout_rows_times_tasks_over_the_work_bound_is_refused(server):
    ok = server.post("/v1/predict", json={"inputs": ["a", "b", "c"], "tasks": ["toy", "toy2"]})  # 6 rows: the bound
    assert ok.status_code == 200, ok.text
    r = server.post("/v1/predict", json={"inputs": ["a", "b", "c", "d"], "tasks": ["toy", "toy2"]})
    assert "4 inputs x 2 tasks = 8 rows of work, more than the limit of 6" in _v1_error(r, 422, "WorkTooLarge")
    r = server.post("/v1/predict", json={"inputs": ["a", "b", "c", "d"], "tasks": "*"})  # "*": 3 single-text tasks
    assert "SUPERMASK_MAX_WORK_ROWS" in _v1_error(r, 422, "WorkTooLarge")


def test_queued_rows_of_a_client_that_left_are_never_computed():
    """Three submissions: the first holds the forward pass; the second's client leaves while it is queued. Its
    rows never reach a pass; the third's do."""
    from service.batcher import ClientGone, MicroBatcher, client_gone

    seen: list[list[str]] = []
    release = threading.Event()

    def forward(items):
        seen.append([t for t, _ in items])
        release.wait(5)
        return [[{"task": t}] * len(rows) for t, rows in items]

    async def main():
        batcher = MicroBatcher(forward, max_rows=1, max_wait_s=0)
        first = asyncio.ensure_future(batcher.submit("a", (("x", None),)))
        await asyncio.sleep(0.1)  # "a" is in the pass
        gone = asyncio.Event()
        token = client_gone.set(gone)
        second = asyncio.ensure_future(batcher.submit("b", (("y", None),)))
        client_gone.reset(token)
        third = asyncio.ensure_future(batcher.submit("c", (("z", None),)))
        await asyncio.sleep(0.05)
        gone.set()  # b's client disconnects while b waits in the queue
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.wait_for(asyncio.gather(first, second, third, return_exceptions=True), 10)
        await batcher.close()
        return batcher, results

    batcher, (a, b, c) = asyncio.run(main())
    assert isinstance(b, ClientGone) and a == [{"task": "a"}] and c == [{"task": "c"}]
    assert seen == [["a"], ["c"]] and batcher.dropped == 1


@pytest.mark.parametrize("precision", ["int8", "fp32"])  # a dedicated forward thread; the default thread pool
def test_a_fanout_whose_client_left_while_queued_is_never_computed(tiny_backbone, tmp_path, precision):
    """A fan-out waits for the pass lock (another pass holds it); its client leaves; it never runs (ClientGone)
    and a fan-out whose client stays is answered."""
    from mask_store.local import LocalMaskStore
    from service.batcher import ClientGone, client_gone
    from service.engine import Engine, PredictRequest
    from service.metrics import Metrics
    from tests.conftest import make_bundle

    store = LocalMaskStore(tmp_path)
    for i, task in enumerate(("t1", "t2")):
        store.put(task, make_bundle(tiny_backbone, task=task, seed=i))
    engine = Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu", precision=precision,
                    runtime="torch")
    passes: list[list[str]] = []
    real_run = engine.forward.run

    def counted(items, *a, **k):
        passes.append([t for t, _ in items])
        return real_run(items, *a, **k)

    engine.forward.run = counted
    reqs = [PredictRequest(t, (("a fine film", None),)) for t in ("t1", "t2")]

    async def main():
        engine._lock.acquire()  # a pass in progress
        try:
            gone = asyncio.Event()
            token = client_gone.set(gone)
            left = asyncio.ensure_future(engine.predict_fanout_async(reqs))
            client_gone.reset(token)
            await asyncio.sleep(1.0)  # prepared, waiting for the pass lock
            gone.set()
            await asyncio.sleep(0.2)
        finally:
            engine._lock.release()
        stayed = await asyncio.wait_for(engine.predict_fanout_async(reqs), 20)
        return await asyncio.gather(left, return_exceptions=True), stayed

    (left,), stayed = asyncio.run(main())
    assert isinstance(left, ClientGone), left
    assert [len(r) for r in stayed] == [1, 1] and passes == [["t1", "t2"]]  # only the second fan-out ran
    assert engine._admitted == 0


# ---- 6. concurrent admin writes --------------------------------------------------------------------------------


def test_an_upload_answers_its_own_bundle_when_a_delete_lands_right_after(tiny_backbone, tmp_path):
    """The upload stored the bundle; a DELETE of the same task lands before the answer is written: the PUT still
    answers 201 with the bundle it stored (it answered 404, the size read back from a store that no longer had it)."""
    settings = Settings(device="cpu", store_dir=tmp_path / "store", examples_dir=None, admin_token=TOKEN)
    app = create_app(settings, backbone=tiny_backbone)
    engine = app.state.supermask.engine
    register = engine.register

    def register_then_deleted(task, data):
        out = register(task, data)
        engine.delete(task)  # the concurrent DELETE
        return out

    engine.register = register_then_deleted
    body = make_bundle(tiny_backbone, "racy")
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.put("/v1/tasks/racy", content=body, headers=AUTH)
        assert r.status_code == 201, r.text
        assert r.json()["name"] == "racy" and r.json()["bytes"] == len(body)
        assert client.get("/v1/tasks/racy").status_code == 404  # and the delete did happen


def test_a_predict_answered_after_its_task_was_deleted_leaves_no_metric_series(tiny_backbone, tmp_path):
    from mask_store.local import LocalMaskStore
    from service.engine import Engine, PredictRequest
    from service.metrics import Metrics

    store = LocalMaskStore(tmp_path)
    store.put("gone", make_bundle(tiny_backbone, task="gone"))
    engine = Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu", precision="fp32")
    real = engine._predict_prepared

    def delete_during_the_pass(items, prepared, cancelled=None):
        out = real(items, prepared, cancelled)
        engine.delete("gone")  # a DELETE racing the predict
        return out

    engine._predict_prepared = delete_during_the_pass
    preds = asyncio.run(engine.predict_async(PredictRequest("gone", (("fine", None),))))
    assert len(preds) == 1  # answered with the bundle it was prepared with
    text = engine.metrics.render().decode()
    assert 'task="gone"' not in text, [line for line in text.splitlines() if 'task="gone"' in line]


# ---- 3. slow and idle connections ------------------------------------------------------------------------------


@contextlib.contextmanager
def _uvicorn(app, protocol, limit: int | None = 64):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, http=protocol, log_level="warning", limit_concurrency=limit))
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert th.is_alive() and time.monotonic() < deadline, "the server did not start within 20 s"
        time.sleep(0.05)
    try:
        yield port
    finally:
        srv.should_exit = True
        th.join(10)
        sock.close()


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes ``sock``; fails if it is still open after ``seconds``."""
    sock.settimeout(seconds)
    got = b""
    t0 = time.monotonic()
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"the connection was still open after {seconds} s")
        if not chunk:
            return got
        got += chunk
        assert time.monotonic() - t0 < seconds


@pytest.fixture(scope="module")
def slow_app(tiny_backbone_dir, tmp_path_factory):
    from backbone import load_backbone

    from mask_store.local import LocalMaskStore

    bb = load_backbone(tiny_backbone_dir)
    settings = Settings(device="cpu", store_dir=tmp_path_factory.mktemp("slow"), examples_dir=None,
                        admin_token=TOKEN, batching=False)
    LocalMaskStore(settings.store_dir).put("toy", make_bundle(bb, "toy"))
    return create_app(settings, backbone=bb)


def test_partial_second_head_and_stalled_body_are_timed_out_on_keep_alive(slow_app):
    from service.api.server import HeadTimeoutProtocol

    class Quick(HeadTimeoutProtocol):
        head_timeout_s = 0.5
        body_timeout_s = 0.5

    with _uvicorn(slow_app, Quick) as port:
        # a complete first request, then half of a second head on the same connection
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        c.settimeout(5)
        assert c.recv(12).startswith(b"HTTP/1.1 200")
        c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        _closed_within(c, 8)
        assert time.monotonic() - t0 < 8
        # a complete head whose body stalls, first request and after a keep-alive one
        for warm in (False, True):
            c = socket.create_connection(("127.0.0.1", port))
            if warm:
                c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                c.settimeout(5)
                assert c.recv(12).startswith(b"HTTP/1.1 200")
            c.sendall(b"POST /v1/tasks/toy/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"inputs\": [")
            rest = _closed_within(c, 8)
            assert b"408 Request Timeout" in rest and b"SUPERMASK_BODY_TIMEOUT_S" in rest
        # a body that keeps arriving is not cut by the idle timeout
        c = socket.create_connection(("127.0.0.1", port))
        body = b'{"inputs": ["a fine film"]}'
        c.sendall(b"POST /v1/tasks/nosuch/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        for i in range(0, len(body), 9):
            time.sleep(0.3)
            c.sendall(body[i:i + 9])
        assert b"404" in _closed_within(c, 8).split(b"\r\n")[0]


def test_health_probes_keep_their_slots_while_every_other_slot_is_held(slow_app):
    from service.api.server import HeadTimeoutProtocol

    class Reserved(HeadTimeoutProtocol):
        head_timeout_s = 30.0
        body_timeout_s = 30.0
        health_reserved_slots = 2

    # 6 in all, 2 kept for probes: an ordinary request is refused once 4 connections are open, its own counted
    # (uvicorn compares the open connections, this one included, with the limit), so 3 can be held
    with _uvicorn(slow_app, Reserved, limit=6) as port:
        held = []
        for _ in range(3):  # one at a time: each head is read while the connections before it are open
            h = socket.create_connection(("127.0.0.1", port))
            held.append(h)
            h.sendall(b"POST /v1/tasks/toy/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
            time.sleep(0.2)
        for h in held:  # heads complete, bodies stalled: each holds its slot (no answer yet)
            h.settimeout(0.1)
            with pytest.raises(TimeoutError):
                h.recv(1)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
                assert client.get("/healthz").status_code == 200
                assert client.get("/readyz").status_code == 200
                assert client.get("/v2/health/ready").status_code == 200
                assert client.get("/v1/tasks").status_code == 503  # an ordinary request over the limit
        finally:
            for h in held:
                h.close()
