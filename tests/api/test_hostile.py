"""Hostile input and faults through the REST API: each answers a typed JSON error with a fitting status,
nothing invalid is stored, and one bad file in the store never breaks listing or the other tasks.

One test per finding of the outsider's attack (lone surrogates, unbounded bodies, over-deep headers,
huge shapes, tiny max lengths, huge heads, disk faults, header bit flips, FIFOs and directories in the
store, metric label growth, corrupt stored bundles, over-deep bodies, half-open connections).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

import mask_store.local as local_mod
from mask_store.format import HEAD_BIAS, HEAD_WEIGHT, HEADER_DIGEST_BYTES, MAGIC, frame
from service.api.main import create_app
from service.settings import Settings
from tests.api.test_api import AUTH, TOKEN, snapshot
from tests.conftest import make_bundle


@pytest.fixture
def settings(tmp_path):
    return Settings(device="cpu", store_dir=tmp_path / "store", examples_dir=None, admin_token=TOKEN,
                    max_bundle_bytes=200_000, max_inputs_per_request=8, max_input_chars=200,
                    max_request_bytes=4096, batching=False)


@pytest.fixture
def server(tiny_backbone, settings):
    with TestClient(create_app(settings, backbone=tiny_backbone), raise_server_exceptions=False) as client:
        client.store_dir = settings.store_dir
        client.backbone = tiny_backbone
        assert client.put("/v1/tasks/toy", content=make_bundle(tiny_backbone, "toy"), headers=AUTH).status_code == 201
        bb = tiny_backbone
        assert client.put("/v1/tasks/pair", content=make_bundle(bb, "pair", text_pairs=True),
                          headers=AUTH).status_code == 201
        yield client


def _error(r, status: int, kind: str | None = None) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}, body
    if kind is not None:
        assert body["error"]["type"] == kind, body
    assert "Traceback" not in r.text and "/work" not in r.text and "site-packages" not in r.text
    return body["error"]["message"]


def _edit(bundle: bytes, edit) -> bytes:
    (hlen,) = struct.unpack_from("<I", bundle, len(MAGIC))
    header = json.loads(bundle[12:12 + hlen])
    edit(header)
    return frame(json.dumps(header).encode(), bundle[12 + hlen + HEADER_DIGEST_BYTES:])


def _nest(depth: int):
    v: object = 1
    for _ in range(depth):
        v = {"a": v}
    return v


# ---- 1. lone surrogates -------------------------------------------------------------------------


def test_lone_surrogate_is_422_single_and_pair(server):
    r = server.post("/v1/tasks/toy/predict", content=b'{"inputs":["\\ud800"]}',
                    headers={"content-type": "application/json"})
    assert "surrogate" in _error(r, 422, "InputInvalid")
    r = server.post("/v1/tasks/pair/predict", content=b'{"inputs":[["fine", "x\\udfff"]]}',
                    headers={"content-type": "application/json"})
    assert "surrogate" in _error(r, 422, "InputInvalid")
    # a proper pair of surrogates is one character and fine
    r = server.post("/v1/tasks/toy/predict", content=b'{"inputs":["smile \\ud83d\\ude00"]}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


# ---- 2. request body size ---------------------------------------------------------------------


def test_predict_body_over_limit_is_413_by_length_and_while_streaming(server, settings):
    big = json.dumps({"inputs": ["a"] * (settings.max_request_bytes // 4)}).encode()
    assert len(big) > settings.max_request_bytes
    r = server.post("/v1/tasks/toy/predict", content=big, headers={"content-type": "application/json"})
    assert "SUPERMASK_MAX_REQUEST_BYTES" in _error(r, 413, "RequestTooLarge")
    received = []

    def chunks():  # no Content-Length: the limit is enforced on the bytes as they arrive
        for i in range(0, len(big), 4096):
            received.append(i)
            yield big[i:i + 4096]

    r = server.post("/v1/tasks/toy/predict", content=chunks(), headers={"content-type": "application/json"})
    _error(r, 413, "RequestTooLarge")
    # a body within the limit is served as before, uploads keep their own (larger) limit
    assert server.post("/v1/tasks/toy/predict", json={"inputs": ["fine"]}).status_code == 200
    bundle = make_bundle(server.backbone, "toy", seed=3)
    assert len(bundle) > settings.max_request_bytes
    assert server.put("/v1/tasks/toy", content=bundle, headers=AUTH).status_code == 200


# ---- 3-6, 8. headers that validate must serve: rejected on upload, store unchanged ------------------


HOSTILE_HEADERS = {
    "deep_metrics": (lambda h: h.update(metrics={"m": _nest(300)}), "nested"),
    "deep_training": (lambda h: h.update(training=_nest(600)), "nested"),
    "huge_shape": (lambda h: h["masks"][0].update(shape=[1e200, 1e200]), "shape"),
    "huge_int_shape": (lambda h: h["masks"][0].update(shape=[10 ** 30, 10 ** 30]), "shape"),
    "max_seq_length_1": (lambda h: h.update(max_seq_length=1), "max_seq_length"),
    "max_seq_length_2": (lambda h: h.update(max_seq_length=2), "max_seq_length"),
    "nan_metric": (lambda h: h.update(metrics={"acc": float("nan")}), "JSON"),
    "flipped_label": (None, "checksum"),
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_hostile_header_rejected_and_nothing_stored(server, case):
    edit, reason = HOSTILE_HEADERS[case]
    good = make_bundle(server.backbone, "toy", seed=5)
    if edit is None:  # one bit flipped inside a label name, header checksum not recomputed
        bad = bytearray(good)
        i = bytes(good).index(b'"neg"') + 1
        bad[i] ^= 0x01  # "neg" -> "oeg"
        bad = bytes(bad)
    else:
        bad = _edit(good, edit)
    before = snapshot(server.store_dir)
    r = server.put("/v1/tasks/toy", content=bad, headers=AUTH)
    assert reason in _error(r, 422, "BundleInvalid")
    assert snapshot(server.store_dir) == before
    assert server.get("/v1/tasks").status_code == 200
    assert server.post("/v1/tasks/toy/predict", json={"inputs": ["still served"]}).status_code == 200


@pytest.mark.parametrize("case", ["deep_metrics", "huge_shape", "max_seq_length_1"])
def test_hostile_file_in_store_breaks_nothing_else(server, case):
    """Such a file put into the store behind the server's back (an old release stored them) is
    quarantined when read; listing and every other task keep working, also after a restart."""
    edit, _ = HOSTILE_HEADERS[case]
    (server.store_dir / "evil.smask").write_bytes(_edit(make_bundle(server.backbone, "evil"), edit))
    r = server.get("/v1/tasks")
    assert r.status_code == 200 and [t["name"] for t in r.json()["tasks"]] == ["pair", "toy"]
    assert server.get("/v1/tasks/toy").status_code == 200
    assert server.get("/healthz").json()["quarantined"] == ["evil"]
    _error(server.get("/v1/tasks/evil"), 404)  # moved aside: no longer a task


def test_huge_head_weights_rejected(server):
    bb = server.backbone
    from mask_store.format import encode_bundle

    masks = {f"{n}.weight": np.ones(tuple(bb.qweight[n].shape), dtype=bool) for n in bb.masked}
    head = {HEAD_WEIGHT: np.full((2, bb.hidden_size), 3e38, dtype=np.float32),
            HEAD_BIAS: np.array([-3e38, 3e38], dtype=np.float32)}
    bad = encode_bundle(task="toy", problem_type="single_label_classification", labels=["neg", "pos"],
                        max_seq_length=32, backbone_fingerprint=bb.fingerprint, masks=masks, head=head)
    assert "magnitude" in _error(server.put("/v1/tasks/toy", content=bad, headers=AUTH), 422, "BundleInvalid")


# ---- 7. storage faults -------------------------------------------------------------------------


@pytest.mark.parametrize("err, status, kind", [(errno.ENOSPC, 507, "StoreFull"),
                                               (errno.EROFS, 503, "StoreUnavailable")])
def test_disk_full_or_read_only_is_typed_and_changes_nothing(server, monkeypatch, err, status, kind):
    before = snapshot(server.store_dir)

    def fail(*a, **k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(local_mod.os, "fsync", fail)  # the temporary file's write cannot be made durable
    _error(server.put("/v1/tasks/toy", content=make_bundle(server.backbone, "toy", seed=9), headers=AUTH),
           status, kind)
    monkeypatch.undo()
    monkeypatch.setattr(local_mod.Path, "unlink", fail)
    _error(server.delete("/v1/tasks/toy", headers=AUTH), status, kind)
    monkeypatch.undo()
    assert snapshot(server.store_dir) == before
    assert server.post("/v1/tasks/toy/predict", json={"inputs": ["x"]}).status_code == 200


# ---- 10. non-regular files in the store --------------------------------------------------------


def test_fifo_and_directory_named_like_bundles_are_ignored(server):
    os.mkfifo(server.store_dir / "X.smask")
    (server.store_dir / "D.smask").mkdir()
    done = {}

    def listing():
        done["r"] = server.get("/v1/tasks")

    t = threading.Thread(target=listing, daemon=True)
    t.start()
    t.join(10)
    assert "r" in done, "GET /v1/tasks blocked on a FIFO"
    assert [x["name"] for x in done["r"].json()["tasks"]] == ["pair", "toy"]
    for name in ("X", "D"):
        _error(server.get(f"/v1/tasks/{name}"), 404, "TaskNotFound")
        _error(server.post(f"/v1/tasks/{name}/predict", json={"inputs": ["x"]}), 404, "TaskNotFound")
    assert server.get("/healthz").json()["tasks"] == 2


# ---- 11. metric labels only for tasks that exist -----------------------------------------------


def test_unknown_names_add_no_metric_series(server):
    for i in range(300):
        _error(server.post(f"/v1/tasks/nope{i}/predict", json={"inputs": ["x"]}), 404)
    text = server.get("/metrics").text
    assert "nope" not in text
    server.post("/v1/tasks/toy/predict", json={"inputs": ["x"]})
    assert 'supermask_cache_misses_total{task="toy"}' in server.get("/metrics").text
    assert server.delete("/v1/tasks/toy", headers=AUTH).status_code == 204
    assert 'task="toy"' not in server.get("/metrics").text  # a deleted task's series go with it


# ---- 12. a corrupt stored bundle ----------------------------------------------------------------


def test_corrupt_stored_bundle_is_a_server_fault_quarantined_and_reported(server):
    path = server.store_dir / "toy.smask"
    assert server.post("/v1/tasks/toy/predict", json={"inputs": ["x"]}).status_code == 200  # now cached
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the head blob
    with open(path, "r+b") as fh:  # in place: same inode, same size
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime restored
    r = server.post("/v1/tasks/toy/predict", json={"inputs": ["x"]})
    assert "corrupt" in _error(r, 500, "StoredBundleCorrupt")
    health = server.get("/healthz").json()
    assert health["status"] == "degraded" and health["quarantined"] == ["toy"]
    assert "supermask_quarantined_bundles_total 1.0" in server.get("/metrics").text
    assert server.post("/v1/tasks/pair/predict", json={"inputs": [["a", "b"]]}).status_code == 200
    # a re-upload serves again
    assert server.put("/v1/tasks/toy", content=make_bundle(server.backbone, "toy"), headers=AUTH).status_code == 201
    assert server.post("/v1/tasks/toy/predict", json={"inputs": ["x"]}).status_code == 200


# ---- 13. over-deep and malformed bodies ----------------------------------------------------------


def test_over_deep_body_gets_the_documented_error(server, settings):
    deep = b"{\"inputs\": " + b"[" * 1_500 + b"]" * 1_500 + b"}"
    assert len(deep) < settings.max_request_bytes
    r = server.post("/v1/tasks/toy/predict", content=deep, headers={"content-type": "application/json"})
    _error(r, 422, "RequestInvalid")
    _error(server.get("/no/such/route"), 404, "NotFound")
    _error(server.delete("/healthz"), 405, "MethodNotAllowed")


# ---- 14. half-open connections ---------------------------------------------------------------------


def test_connection_without_a_request_head_is_closed(tiny_backbone, settings):
    import uvicorn

    from service.api.server import HeadTimeoutProtocol

    class Quick(HeadTimeoutProtocol):
        head_timeout_s = 0.5

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(settings, backbone=tiny_backbone), http=Quick, log_level="warning",
                            limit_concurrency=64)
    srv = uvicorn.Server(config)
    th = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    try:
        for _ in range(400):
            if srv.started:
                break
            time.sleep(0.05)
        assert srv.started, "the server did not start within 20 s"
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # head never completed
        t0 = time.monotonic()
        for c in idle + [slow]:
            c.settimeout(15)
            assert c.recv(1) == b"", "the server kept a connection without a request head open"
        assert time.monotonic() - t0 < 12  # closed after 0.5 s (a loaded machine gets room)
        ok = socket.create_connection(("127.0.0.1", port))  # a complete request is answered as before
        ok.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        ok.settimeout(5)
        assert ok.recv(12).startswith(b"HTTP/1.1 200")
    finally:
        srv.should_exit = True
        th.join(10)
