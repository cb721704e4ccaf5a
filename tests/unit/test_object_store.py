"""ObjectMaskStore over S3: the real s3fs / botocore client path against an S3-compatible server (moto's server
mode) started by the test on loopback. Atomic replace, ETag freshness across store instances and engines,
deletes seen, truncated and corrupted objects rejected with the local store's errors, open_store's URL choice."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from mask_store.errors import BundleInvalid, BundleTooLarge, InvalidTaskName, StoredBundleCorrupt, TaskNotFound
from mask_store.local import LocalMaskStore
from mask_store.store import MaskStore, open_store
from tests.conftest import make_bundle
from tests.unit.test_local_store import FP, assert_same_bundle, corrupt, make

moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[dev]')")
pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[s3]')")

TEXTS = ["a fine film", "dull and lifeless"]
ROWS = [(t, None) for t in TEXTS]


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3-compatible server on a free loopback port for this module; yields its URL."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_options(s3_endpoint, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return {"endpoint_url": s3_endpoint}


_buckets = iter(range(10**6))


@pytest.fixture
def url(s3_options) -> str:
    """A fresh bucket per test (created by the store on open)."""
    return f"s3://masks-{next(_buckets)}/fleet"


def raw_fs(options):
    """A plain s3fs client on the same server, to write objects behind the store's back."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **options)


def test_open_store_picks_the_backend_by_url(tmp_path, url, s3_options):
    local = open_store(tmp_path.as_uri())
    assert isinstance(local, LocalMaskStore) and local.root == tmp_path
    assert isinstance(open_store(str(tmp_path / "plain")), LocalMaskStore)
    remote = open_store(url, options=s3_options)
    assert type(remote).__name__ == "ObjectMaskStore" and isinstance(remote, MaskStore)
    with pytest.raises(ValueError, match="not host"):
        open_store("file://elsewhere/masks")
    with pytest.raises(ValueError, match="options"):
        open_store(tmp_path.as_uri(), options={"endpoint_url": "x"})
    with pytest.raises(ValueError):
        open_store("nosuchscheme://bucket/x")


def test_crud_and_validation(url, s3_options):
    store = open_store(url, max_bundle_bytes=1 << 20, options=s3_options)
    assert store.tasks() == []
    with pytest.raises(TaskNotFound):
        store.get("pos")
    with pytest.raises(TaskNotFound):
        store.version("pos")
    with pytest.raises(TaskNotFound):
        store.delete("pos")
    data = make("pos")
    bundle, created = store.put("pos", data, FP)
    assert created and store.exists("pos") and store.tasks() == ["pos"]
    assert store.size_bytes("pos") == len(data)
    assert store.header("pos") == bundle.header
    assert_same_bundle(store.get("pos"), bundle)
    assert raw_fs(s3_options).cat_file(store.path("pos")) == data  # byte for byte the local store's file
    _, created = store.put("pos", make("pos", seed=1), FP)
    assert not created
    with pytest.raises(BundleInvalid, match="declares task"):
        store.put("neg", data)
    with pytest.raises(BundleTooLarge):
        open_store(url, max_bundle_bytes=10, options=s3_options).put("pos", data)
    with pytest.raises(InvalidTaskName):
        store.get("../x")
    store.delete("pos")
    assert store.tasks() == [] and not store.exists("pos")


def test_check_callback_refusal_writes_nothing(url, s3_options):
    store = open_store(url, options=s3_options)

    def refuse(bundle):
        raise BundleInvalid("the server cannot serve this one")

    with pytest.raises(BundleInvalid, match="cannot serve"):
        store.put("pos", make("pos"), check=refuse)
    assert store.tasks() == [] and raw_fs(s3_options).find(url) == []


def test_replace_is_atomic_for_concurrent_readers(url, s3_options):
    writer, reader = open_store(url, options=s3_options), open_store(url, options=s3_options)
    versions = [make("pos", seed=s) for s in range(2)]
    writer.put("pos", versions[0])
    expected = {v: open_store(url, options=s3_options).validate("pos", v).header for v in versions}
    seen, errors, stop = set(), [], threading.Event()

    def read():
        while not stop.is_set():
            try:
                b = reader.get("pos")  # fully validated: a partial object would raise BundleInvalid
                seen.add(next(k for k, h in expected.items() if h == b.header))
            except Exception as exc:  # noqa: BLE001 - any failure is a finding
                errors.append(exc)

    t = threading.Thread(target=read)
    t.start()
    for i in range(12):
        writer.put("pos", versions[i % 2])
    stop.set()
    t.join()
    assert errors == []
    assert seen == set(versions)  # the reader saw both versions, each whole
    assert raw_fs(s3_options).find(url) == [writer.path("pos")]  # no temporary key left behind
    assert reader.tasks() == ["pos"]


def test_etag_is_the_freshness_token_across_store_instances(url, s3_options):
    a, b = open_store(url, options=s3_options), open_store(url, options=s3_options)
    a.put("pos", make("pos", seed=0))
    v0 = b.version("pos")
    assert v0 == a.version("pos") == raw_fs(s3_options).info(a.path("pos"))["ETag"]
    assert b.version("pos") == v0  # unchanged object: same token (no write, no drift)
    a.put("pos", make("pos", seed=1))
    assert b.version("pos") != v0
    assert_same_bundle(b.get("pos"), a.validate("pos", make("pos", seed=1)))
    a.delete("pos")
    with pytest.raises(TaskNotFound):
        b.version("pos")


@pytest.mark.parametrize("cut", ["prefix", "header", "payload", "corrupt", "empty"])
@pytest.mark.parametrize("read", ["get", "header"])
def test_truncated_or_corrupted_objects_raise_the_local_errors_and_are_quarantined(url, s3_options, tmp_path, cut,
                                                                                   read):
    moved = []
    store = open_store(url, options=s3_options, on_quarantine=lambda task, reason: moved.append(task))
    local = LocalMaskStore(tmp_path)
    data = make("pos")
    bad = {"prefix": data[:6], "header": data[:40], "payload": data[:-7], "corrupt": corrupt(data),
           "empty": b""}[cut]
    raw_fs(s3_options).pipe_file(store.path("pos"), bad)
    (tmp_path / "pos.smask").write_bytes(bad)
    if read == "header" and cut in ("payload", "corrupt"):  # the header itself is intact: read as locally
        assert store.header("pos") == local.header("pos")
        return
    with pytest.raises(StoredBundleCorrupt) as remote_err:
        getattr(store, read)("pos")
    with pytest.raises(StoredBundleCorrupt) as local_err:
        getattr(local, read)("pos")
    reason = str(local_err.value).split(" is corrupt (")[1].split("); ")[0]
    assert f"is corrupt ({reason}); moved aside" in str(remote_err.value)  # the same check failed, same words
    assert moved == ["pos"] and store.quarantined() == ["pos"] == local.quarantined()
    assert store.tasks() == [] and not store.exists("pos")  # moved aside: it breaks nothing else
    store.put("pos", data)  # a re-upload serves again
    assert_same_bundle(store.get("pos"), local.validate("pos", data))


def test_uploads_stream_through_a_spool_file(url, s3_options):
    store = open_store(url, options=s3_options)
    data = make("pos")
    with store.spool() as (fh, path):
        fh.write(data)
        fh.flush()
        bundle, created = store.put("pos", path)
    assert created and not Path(path).exists() and raw_fs(s3_options).cat_file(store.path("pos")) == data
    with store.spool() as (fh, path):
        fh.write(data[:-3])
        fh.flush()
        with pytest.raises(BundleInvalid):
            store.put("pos", path)
    assert raw_fs(s3_options).cat_file(store.path("pos")) == data  # a refused upload changes nothing


def test_seed_from_fills_only_an_empty_store(url, s3_options, tmp_path):
    src = tmp_path / "examples"
    src.mkdir()
    (src / "pos.smask").write_bytes(make("pos"))
    (src / "broken.smask").write_bytes(b"junk")
    store = open_store(url, options=s3_options)
    assert store.seed_from(src) == ["pos"]
    store.delete("pos")
    store.put("neg", make("neg"))
    assert store.seed_from(src) == [] and store.tasks() == ["neg"]


def test_stale_temporaries_are_removed_on_open_fresh_ones_kept(url, s3_options, monkeypatch):
    import mask_store.remote as remote

    store = open_store(url, options=s3_options)
    fs = raw_fs(s3_options)
    tmp = f"{store.root}/{remote.TMP_DIR}/pos.deadbeef"
    fs.pipe_file(tmp, b"partial upload")
    open_store(url, options=s3_options)
    assert fs.exists(tmp)  # young: may be another replica's upload in progress
    monkeypatch.setattr(remote, "STALE_TMP_SECONDS", -1.0)
    open_store(url, options=s3_options)
    assert not fs.exists(tmp)
    assert store.tasks() == []


def test_two_engines_on_one_bucket_see_each_others_replace_and_delete(tiny_backbone_dir, url, s3_options):
    from backbone import load_backbone
    from service.engine import Engine, PredictRequest
    from service.metrics import Metrics

    engines = [Engine(load_backbone(tiny_backbone_dir), open_store(url, options=s3_options), Metrics(),
                      cache_bytes=1 << 30, device="cpu") for _ in range(2)]
    bb = engines[0].backbone
    old, new = make_bundle(bb, task="toy", seed=1), make_bundle(bb, task="toy", seed=2, labels=("a", "b", "c"))
    engines[0].register("toy", old)
    first = [e.logits("toy", ROWS) for e in engines]
    np.testing.assert_allclose(first[0].numpy(), first[1].numpy(), rtol=1e-5, atol=1e-6)
    engines[1].register("toy", new)  # through the other replica: engine 0 is not told
    preds = engines[0].predict(PredictRequest("toy", tuple(ROWS)))
    assert all(set(p["scores"]) == {"a", "b", "c"} for p in preds)
    np.testing.assert_allclose(engines[0].logits("toy", ROWS).numpy(), engines[1].logits("toy", ROWS).numpy(),
                               rtol=1e-5, atol=1e-6)
    engines[1].delete("toy")
    with pytest.raises(TaskNotFound):
        engines[0].logits("toy", ROWS)
    assert not engines[0].is_resident("toy")


def test_api_over_s3_serves_and_rejects_a_truncated_object_with_422(tiny_backbone, url, s3_options):
    from fastapi.testclient import TestClient

    from service.api.main import create_app
    from service.settings import Settings

    settings = Settings(device="cpu", store_url=url, store_options=s3_options, examples_dir=None,
                        admin_token="t0ken", batching=False)
    auth = {"Authorization": "Bearer t0ken"}
    with TestClient(create_app(settings, backbone=tiny_backbone)) as client:
        data = make_bundle(tiny_backbone, task="toy")
        assert client.put("/v1/tasks/toy", content=data, headers=auth).status_code == 201
        r = client.post("/v1/tasks/toy/predict", json={"inputs": TEXTS})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2
        assert client.get("/v1/tasks").json()["count"] == 1
        assert client.get("/v1/tasks/toy").json()["bytes"] == len(data)
        raw_fs(s3_options).pipe_file(f"{url}/toy.smask", data[:-100])  # truncated behind the server's back
        r = client.post("/v1/tasks/toy/predict", json={"inputs": TEXTS})
        assert r.status_code == 500 and r.json()["error"]["type"] == "StoredBundleCorrupt"  # as for a local file
        assert "truncated" in r.json()["error"]["message"]
        health = client.get("/healthz").json()
        assert health["status"] == "degraded" and health["quarantined"] == ["toy"]
        assert "supermask_quarantined_bundles_total 1.0" in client.get("/metrics").text
        assert client.post("/v1/tasks/toy/predict", json={"inputs": TEXTS}).status_code == 404  # moved aside
        assert client.put("/v1/tasks/toy", content=data, headers=auth).status_code == 201
        assert client.delete("/v1/tasks/toy", headers=auth).status_code == 204
        assert client.post("/v1/tasks/toy/predict", json={"inputs": TEXTS}).status_code == 404


# ---- servers sharing a store: quarantine moves only the judged version; a stored object naming another task ----


def test_object_naming_another_task_is_refused_and_quarantined(url, s3_options):
    store = open_store(url, options=s3_options)
    store.put("pos", make("pos"))
    raw_fs(s3_options).pipe_file(store.path("neg"), make("pos", seed=2))  # copied under another key
    with pytest.raises(StoredBundleCorrupt, match="declares task 'pos' but is stored as 'neg'"):
        store.get("neg")
    assert store.tasks() == ["pos"] and store.quarantined() == ["neg"]
    raw_fs(s3_options).pipe_file(store.path("neg"), make("pos", seed=3))
    with pytest.raises(StoredBundleCorrupt):
        store.header("neg")
    assert store.tasks() == ["pos"]


def test_label_bounds_apply_to_object_store_uploads(url, s3_options):
    from tests.unit.test_local_store import _labelled

    store = open_store(url, options=s3_options)
    store.max_labels = 4
    with pytest.raises(BundleInvalid, match="SUPERMASK_MAX_LABELS"):
        store.put("many", _labelled("many", [f"l{i}" for i in range(5)]))
    assert store.tasks() == []


@pytest.mark.parametrize("read", ["get", "header"])
def test_quarantine_never_removes_another_servers_newer_upload(url, s3_options, read):
    """Server A judged a corrupt object; server B re-uploads the task while A moves the object aside (between
    A's version check and its delete): B's acknowledged upload must stay, and the quarantine copy must hold the
    corrupt bytes A judged, never B's."""
    a = open_store(url, options=s3_options)
    b = open_store(url, options=s3_options)
    good, bad = make("pos", seed=5), make("pos")[:40]
    raw_fs(s3_options).pipe_file(a.path("pos"), bad)
    uploaded = []

    def b_uploads_first(real):
        def call(*args, **kwargs):
            if not uploaded:  # A's first write of the quarantine copy: B's upload lands just before it
                uploaded.append(b.put("pos", good))
            return real(*args, **kwargs)
        return call

    for name in ("cp_file", "pipe_file", "call_s3"):  # a.fs is A's own client (skip_instance_cache)
        setattr(a.fs, name, b_uploads_first(getattr(a.fs, name)))
    with pytest.raises(StoredBundleCorrupt):
        getattr(a, read)("pos")
    assert uploaded, "the race was not staged"
    assert_same_bundle(b.get("pos"), a.validate("pos", good))  # B's upload survived
    fs = raw_fs(s3_options)
    for key in fs.ls(f"{a.root}/.quarantine", detail=False) if fs.exists(f"{a.root}/.quarantine") else []:
        assert fs.cat_file(key) == bad  # nothing but the judged bytes was ever quarantined


def test_shared_store_race_loses_no_acknowledged_upload(url, s3_options):
    """Rounds of: an object corrupted in place; server A reads it while server B re-uploads. After each round the
    acknowledged upload is stored intact and the quarantine holds only corrupt bytes (``benchmarks/abuse.py
    --store-rounds 500`` runs this at length)."""
    a = open_store(url, options=s3_options)
    b = open_store(url, options=s3_options)
    fs = raw_fs(s3_options)
    lost = []
    for i in range(40):
        good = make("pos", seed=i)
        fs.pipe_file(a.path("pos"), good[: 40 + i])
        done = threading.Event()

        def reader():
            try:
                a.get("pos")
            except (StoredBundleCorrupt, TaskNotFound):
                pass
            done.set()

        th = threading.Thread(target=reader)
        th.start()
        b.put("pos", good)  # acknowledged
        th.join(10)
        try:
            stored = b.get("pos")
        except (TaskNotFound, StoredBundleCorrupt):
            lost.append(i)
            continue
        if stored.header != a.validate("pos", good).header:
            lost.append(i)
    assert lost == []
    valid = 0
    if fs.exists(f"{a.root}/.quarantine"):
        for key in fs.ls(f"{a.root}/.quarantine", detail=False):
            try:
                a.validate("pos", fs.cat_file(key))
                valid += 1
            except BundleInvalid:
                pass
    assert valid == 0, f"{valid} valid bundles were quarantined as corrupt"
