"""REST API on a tiny random backbone: predict, upload, list/get/delete, auth, every bad-input case."""

from __future__ import annotations

import hashlib
import json
import struct
import time

import pytest
from fastapi.testclient import TestClient

from mask_store.format import HEADER_DIGEST_BYTES, MAGIC, frame
from service.api.main import create_app
from service.settings import Settings
from tests.conftest import make_bundle

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def snapshot(folder) -> dict[str, str]:
    """Every file in the store with its SHA-256: equal snapshots mean an unchanged store."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def server(tiny_backbone, tmp_path):
    settings = Settings(device="cpu", store_dir=tmp_path / "store", examples_dir=None, admin_token=TOKEN,
                        max_bundle_bytes=200_000, max_inputs_per_request=8, max_input_chars=200)
    app = create_app(settings, backbone=tiny_backbone)
    with TestClient(app) as client:
        client.store_dir = settings.store_dir
        client.backbone = tiny_backbone
        assert client.put("/v1/tasks/toy", content=make_bundle(tiny_backbone, "toy"), headers=AUTH).status_code == 201
        yield client


def test_predict(server):
    r = server.post("/v1/tasks/toy/predict", json={"inputs": ["a lovely film", "a dreadful film"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "toy"
    assert len(body["predictions"]) == 2
    for p in body["predictions"]:
        assert p["label"] in ("neg", "pos")
        assert set(p["scores"]) == {"neg", "pos"}
        assert abs(sum(p["scores"].values()) - 1) < 1e-5
        assert "value" not in p


def test_regression_and_pairs(server):
    bb = server.backbone
    r = server.put("/v1/tasks/sim", content=make_bundle(bb, "sim", labels=(), text_pairs=True), headers=AUTH)
    assert r.status_code == 201, r.text
    r = server.post("/v1/tasks/sim/predict", json={"inputs": [["a man is dancing", "a man dances"]]})
    assert r.status_code == 200, r.text
    assert set(r.json()["predictions"][0]) == {"value"}
    r = server.post("/v1/tasks/sim/predict", json={"inputs": ["not a pair"]})
    assert r.status_code == 422 and "pairs" in r.json()["error"]["message"]


def test_upload_replace_then_predict_changes_answer(server):
    before = server.post("/v1/tasks/toy/predict", json={"inputs": ["a lovely film"]}).json()
    new = make_bundle(server.backbone, "toy", sparsity=0.3, seed=7)
    r = server.put("/v1/tasks/toy", content=new, headers=AUTH)
    assert r.status_code == 200, r.text
    assert abs(r.json()["sparsity"] - 0.3) < 0.05
    after = server.post("/v1/tasks/toy/predict", json={"inputs": ["a lovely film"]}).json()
    assert before["predictions"][0]["scores"] != after["predictions"][0]["scores"]


def test_list_get_delete(server):
    server.put("/v1/tasks/second", content=make_bundle(server.backbone, "second"), headers=AUTH)
    r = server.get("/v1/tasks")
    assert r.status_code == 200
    names = [t["name"] for t in r.json()["tasks"]]
    assert names == ["second", "toy"] and r.json()["count"] == 2
    server.post("/v1/tasks/toy/predict", json={"inputs": ["x"]})
    t = server.get("/v1/tasks/toy").json()
    assert t["labels"] == ["neg", "pos"] and t["resident"] is True
    assert t["bytes"] == (server.store_dir / "toy.smask").stat().st_size
    assert 0 < t["sparsity"] < 0.2 and t["training"] == {"test": True}
    assert server.delete("/v1/tasks/toy", headers=AUTH).status_code == 204
    assert server.get("/v1/tasks/toy").status_code == 404
    assert server.post("/v1/tasks/toy/predict", json={"inputs": ["x"]}).status_code == 404
    assert server.delete("/v1/tasks/toy", headers=AUTH).status_code == 404


def _corrupt(data: bytes) -> bytes:
    """Flip one byte inside the first mask's packed bits."""
    from mask_store.format import decode_header

    _, payload_start = decode_header(data)
    b = bytearray(data)
    b[payload_start + 5] ^= 0xFF
    return bytes(b)


def _edit_header(bundle: bytes, **fields) -> bytes:
    """``bundle`` with header fields replaced (the encoder refuses invalid headers, so edit the JSON and
    re-frame it with a matching header checksum, so that the check under test is the one reached)."""
    (hlen,) = struct.unpack_from("<I", bundle, len(MAGIC))
    start = len(MAGIC) + 4
    header = json.loads(bundle[start:start + hlen]) | fields
    return frame(json.dumps(header).encode(), bundle[start + hlen + HEADER_DIGEST_BYTES:])


def _with_header(header: bytes) -> bytes:
    """A bundle prefix (magic, header length, header checksum) around an arbitrary header."""
    return frame(header, b"")


@pytest.mark.parametrize(
    "case,status,reason",
    [
        ("malformed", 422, "not a supermask bundle"),
        ("truncated", 422, "truncated"),
        ("corrupted", 422, "checksum"),
        ("wrong_name", 422, "declares task"),
        ("other_backbone", 409, "backbone"),
        ("too_large", 413, "larger than the limit"),
        ("bad_task_name", 422, "not allowed"),
        ("too_long_sequences", 422, "position embeddings"),
        ("duplicate_labels", 422, "distinct"),
        ("huge_json_int", 422, "not valid UTF-8 JSON"),
        ("deep_json", 422, "not valid UTF-8 JSON"),
    ],
)
def test_bad_uploads_leave_store_and_server_unchanged(server, case, status, reason):
    bb = server.backbone
    good = make_bundle(bb, "toy", sparsity=0.2, seed=3)
    body, task = {
        "malformed": (b"hello, not a bundle at all", "toy"),
        "truncated": (good[: len(good) - 100], "toy"),
        "corrupted": (_corrupt(good), "toy"),
        "wrong_name": (make_bundle(bb, "other"), "toy"),
        "other_backbone": (make_bundle(bb, "toy", fingerprint="ab" * 32), "toy"),
        "too_large": (b"\0" * 200_001, "toy"),
        "bad_task_name": (good, "bad name!"),
        "too_long_sequences": (make_bundle(bb, "toy", max_seq_length=bb.model.config.max_position_embeddings + 1),
                               "toy"),
        "duplicate_labels": (_edit_header(good, labels=["pos", "pos"]), "toy"),
        "huge_json_int": (_with_header(b'{"task": ' + b"1" * 5000 + b"}"), "toy"),
        "deep_json": (_with_header(b"[" * 50_000 + b"]" * 50_000), "toy"),
    }[case]
    before_store = snapshot(server.store_dir)
    before_pred = server.post("/v1/tasks/toy/predict", json={"inputs": ["steady"]}).json()
    r = server.put(f"/v1/tasks/{task}", content=body, headers=AUTH)
    assert r.status_code == status, r.text
    assert reason in r.json()["error"]["message"]
    assert snapshot(server.store_dir) == before_store
    assert server.post("/v1/tasks/toy/predict", json={"inputs": ["steady"]}).json() == before_pred


@pytest.mark.parametrize(
    "headers,status",
    [({}, 401), ({"Authorization": "Bearer wrong"}, 403), ({"Authorization": "Basic abc"}, 401)],
)
def test_admin_auth(server, headers, status):
    before = snapshot(server.store_dir)
    assert server.put("/v1/tasks/new", content=make_bundle(server.backbone, "new"), headers=headers).status_code == status
    assert server.delete("/v1/tasks/toy", headers=headers).status_code == status
    assert snapshot(server.store_dir) == before


def test_admin_disabled_without_token(tiny_backbone, tmp_path):
    app = create_app(Settings(device="cpu", store_dir=tmp_path, examples_dir=None, admin_token=None), backbone=tiny_backbone)
    with TestClient(app) as client:
        r = client.put("/v1/tasks/toy", content=make_bundle(tiny_backbone, "toy"), headers=AUTH)
        assert r.status_code == 403 and "SUPERMASK_ADMIN_TOKEN" in r.json()["error"]["message"]
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "payload,reason",
    [
        ({"inputs": []}, "empty"),
        ({"inputs": ["x"] * 9}, "limit of 8"),
        ({"inputs": ["y" * 201]}, "limit of 200"),
        ({"inputs": [""]}, "empty text"),
        ({"inputs": [["a", "b", "c"]]}, "3 texts"),
        ({"inputs": 3}, "inputs"),  # one text alone is one input now; a number is not
        ({}, "inputs"),
    ],
)
def test_bad_inputs(server, payload, reason):
    r = server.post("/v1/tasks/toy/predict", json=payload)
    assert r.status_code == 422, r.text
    assert reason in r.json()["error"]["message"]


def test_unknown_task_404(server):
    r = server.post("/v1/tasks/nope/predict", json={"inputs": ["x"]})
    assert r.status_code == 404 and r.json()["error"]["type"] == "TaskNotFound"
    assert server.get("/v1/tasks/nope").status_code == 404


def test_health_and_metrics(server):
    h = server.get("/healthz").json()
    assert h["status"] == "ok" and h["backbone_fingerprint"] == server.backbone.fingerprint and h["tasks"] == 1
    server.post("/v1/tasks/toy/predict", json={"inputs": ["x"]})
    server.post("/v1/tasks/toy/predict", json={"inputs": ["y"]})
    text = server.get("/metrics").text
    assert 'supermask_request_duration_seconds_count{task="toy"} 2.0' in text
    assert 'supermask_cache_misses_total{task="toy"} 1.0' in text
    assert 'supermask_cache_hits_total{task="toy"} 1.0' in text
    assert 'supermask_task_load_duration_seconds_count{task="toy"} 1.0' in text
    assert "supermask_resident_tasks 1.0" in text
    assert 'supermask_resident_task_bytes{task="toy"}' in text
    for name in ("supermask_backbone_bytes", "supermask_process_resident_memory_bytes", "supermask_cache_bytes"):
        line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
        assert float(line.split()[1]) > 0, line


def test_examples_preloaded_into_empty_store(tiny_backbone, tmp_path):
    examples = tmp_path / "examples"
    examples.mkdir()
    (examples / "ex.smask").write_bytes(make_bundle(tiny_backbone, "ex"))
    app = create_app(Settings(device="cpu", store_dir=tmp_path / "store", examples_dir=examples), backbone=tiny_backbone)
    with TestClient(app) as client:
        assert [t["name"] for t in client.get("/v1/tasks").json()["tasks"]] == ["ex"]
        assert client.post("/v1/tasks/ex/predict", json={"inputs": ["x"]}).status_code == 200


def test_upload_too_large_for_the_cache_is_refused_before_it_is_stored(tiny_backbone, tmp_path):
    settings = Settings(device="cpu", store_dir=tmp_path / "store", examples_dir=None, admin_token=TOKEN, cache_bytes=4096)
    with TestClient(create_app(settings, backbone=tiny_backbone)) as client:
        r = client.put("/v1/tasks/toy", content=make_bundle(tiny_backbone, "toy", sparsity=0.3), headers=AUTH)
        assert r.status_code == 507 and "cache" in r.json()["error"]["message"], r.text
        assert list((tmp_path / "store").iterdir()) == []


def test_list_skips_unreadable_and_misnamed_bundles(server):
    (server.store_dir / "broken.smask").write_bytes(b"SUPMASK1 not a header")
    (server.store_dir / "My Task.smask").write_bytes(make_bundle(server.backbone, "toy"))
    r = server.get("/v1/tasks")
    assert r.status_code == 200, r.text
    assert [t["name"] for t in r.json()["tasks"]] == ["toy"]
    health = server.get("/healthz").json()  # broken.smask was quarantined when the list read it
    assert health["tasks"] == 1 and health["status"] == "degraded" and health["quarantined"] == ["broken"]
    assert not (server.store_dir / "broken.smask").exists()


@pytest.mark.parametrize("batching", [True, False])
def test_a_bf16_server_reports_precision_and_tiers_and_matches_fp32(tiny_backbone, tiny_backbone_dir, tmp_path,
                                                                     batching):
    from backbone import load_backbone

    texts = ["a lovely film", "a dreadful film"]
    answers = {}
    for precision, bb in (("fp32", tiny_backbone), ("bf16", load_backbone(tiny_backbone_dir))):
        settings = Settings(device="cpu", store_dir=tmp_path / precision, examples_dir=None, admin_token=TOKEN,
                            cpu_precision=precision, batching=batching)
        with TestClient(create_app(settings, backbone=bb)) as client:
            assert client.put("/v1/tasks/toy", content=make_bundle(bb, "toy"), headers=AUTH).status_code == 201
            assert client.get("/v1/tasks/toy").json()["tier"] == "cold"  # uploaded, not loaded yet
            r = client.post("/v1/tasks/toy/predict", json={"inputs": texts})
            assert r.status_code == 200, r.text
            answers[precision] = r.json()["predictions"]
            health = client.get("/healthz").json()
            assert health["precision"] == precision
            assert client.get("/v1/tasks/toy").json()["tier"] == "warm"  # bf16: asked for once, its sparse form served
            if precision == "bf16":
                assert health["hot_tasks"] == 0 and health["tiers"]["sparse"]["tasks"] == 1
                # the second request earns it a place (SUPERMASK_HOT_PROMOTE_AFTER=2), promoted in the background
                assert client.post("/v1/tasks/toy/predict", json={"inputs": texts}).status_code == 200
                deadline = time.monotonic() + 30
                while client.get("/v1/tasks/toy").json()["tier"] != "hot" and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert client.get("/v1/tasks/toy").json()["tier"] == "hot"
                assert client.get("/healthz").json()["hot_tasks"] == 1
            else:
                assert health["hot_tasks"] is None and "sparse" not in health["tiers"]
    for a, b in zip(answers["fp32"], answers["bf16"]):
        assert a["label"] == b["label"]
        assert b["scores"] == pytest.approx(a["scores"], abs=0.02)


def test_startup_moves_the_loaded_objects_out_of_the_collectors_reach(tiny_backbone, tmp_path):
    """Start-up freezes what it loaded (gc.freeze): a full collection no longer walks the backbone and the libraries
    (~100 ms with the GIL held in the default server)."""
    import gc

    gc.unfreeze()
    app = create_app(Settings(device="cpu", store_dir=tmp_path / "store", examples_dir=None), backbone=tiny_backbone)
    assert gc.get_freeze_count() == 0  # building the app freezes nothing: start-up does
    with TestClient(app) as client:
        assert gc.get_freeze_count() > 10_000
        assert client.get("/healthz").status_code == 200
    assert gc.get_freeze_count() == 0  # shutdown unfreezes
