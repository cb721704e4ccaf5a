"""LocalMaskStore: CRUD, validation on upload, atomic writes, stray temp files, seeding. No torch."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import pytest

import mask_store.local as local_mod
from mask_store.errors import (BackboneMismatch, BundleInvalid, BundleTooLarge, InvalidTaskName, StoredBundleCorrupt,
                               StoreFull, StoreUnavailable, TaskNotFound)
from mask_store.format import HEAD_BIAS, HEAD_WEIGHT, decode_bundle, encode_bundle
from mask_store.local import LocalMaskStore, check_task_name

FP = "a" * 64
OTHER_FP = "b" * 64
HIDDEN = 8


def make(task: str, seed: int = 0, fingerprint: str = FP) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_bundle(
        task=task,
        problem_type="single_label_classification",
        labels=["neg", "pos"],
        max_seq_length=64,
        backbone_fingerprint=fingerprint,
        masks={"l0.weight": rng.random((8, 4)) > 0.3, "l1.weight": rng.random((16, 8)) > 0.3},
        head={HEAD_WEIGHT: rng.normal(size=(2, HIDDEN)), HEAD_BIAS: rng.normal(size=(2,))},
    )


def corrupt(data: bytes) -> bytes:
    bad = bytearray(data)
    bad[-10] ^= 0xFF  # inside the head blob -> checksum mismatch
    return bytes(bad)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every entry in the store directory (hidden files included), name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def assert_same_bundle(a, b):
    assert a.header == b.header
    assert a.masks == b.masks
    assert a.size_bytes == b.size_bytes
    assert set(a.head) == set(b.head)
    for k in a.head:
        np.testing.assert_array_equal(a.head[k], b.head[k])


@pytest.fixture
def store(tmp_path) -> LocalMaskStore:
    return LocalMaskStore(tmp_path / "store")


# ---------------------------------------------------------------------------------------------
# basic operations
# ---------------------------------------------------------------------------------------------


def test_new_store_is_empty_and_root_created(tmp_path):
    s = LocalMaskStore(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    assert s.tasks() == []


def test_put_get_header_size_delete(store):
    data = make("sst2")
    bundle, created = store.put("sst2", data)
    assert created is True
    assert bundle.header.task == "sst2"
    assert store.path("sst2").read_bytes() == data  # stored byte-for-byte
    assert store.exists("sst2")

    data2 = make("sst2", seed=1)
    assert data2 != data
    bundle2, created2 = store.put("sst2", data2)
    assert created2 is False
    assert store.path("sst2").read_bytes() == data2

    store.put("cola", make("cola"))
    store.put("MRPC", make("MRPC"))
    assert store.tasks() == sorted(["sst2", "cola", "MRPC"]) == ["MRPC", "cola", "sst2"]

    assert store.header("sst2") == decode_bundle(data2).header
    assert_same_bundle(store.get("sst2"), decode_bundle(data2))
    assert_same_bundle(store.get("sst2"), bundle2)
    assert store.size_bytes("sst2") == len(data2)

    store.delete("sst2")
    assert store.tasks() == ["MRPC", "cola"]
    assert not store.exists("sst2")
    with pytest.raises(TaskNotFound, match="sst2"):
        store.get("sst2")
    with pytest.raises(TaskNotFound, match="sst2"):
        store.header("sst2")
    with pytest.raises(TaskNotFound, match="sst2"):
        store.delete("sst2")
    with pytest.raises(TaskNotFound, match="sst2"):
        store.size_bytes("sst2")


def test_tasks_ignores_other_files(store):
    store.put("t1", make("t1"))
    (store.root / "README.txt").write_text("not a bundle")
    assert store.tasks() == ["t1"]


def test_put_matching_fingerprint_accepted(store):
    _, created = store.put("t1", make("t1"), backbone_fingerprint=FP)
    assert created and store.tasks() == ["t1"]


# ---------------------------------------------------------------------------------------------
# rejected uploads leave the store unchanged
# ---------------------------------------------------------------------------------------------


def test_name_differs_from_declared_task(store):
    store.put("keep", make("keep"))
    before = snapshot(store.root)
    with pytest.raises(BundleInvalid, match=r"declares task 'sst2' but was uploaded as 'cola'"):
        store.put("cola", make("sst2"))
    assert snapshot(store.root) == before
    assert store.tasks() == ["keep"]


def test_backbone_mismatch(store):
    store.put("keep", make("keep"))
    before = snapshot(store.root)
    with pytest.raises(BackboneMismatch) as exc:
        store.put("t1", make("t1", fingerprint=OTHER_FP), backbone_fingerprint=FP)
    assert exc.value.bundle_fingerprint == OTHER_FP and exc.value.backbone_fingerprint == FP
    assert snapshot(store.root) == before


def test_backbone_mismatch_on_replace_keeps_old(store):
    old = make("t1")
    store.put("t1", old)
    before = snapshot(store.root)
    with pytest.raises(BackboneMismatch):
        store.put("t1", make("t1", seed=2, fingerprint=OTHER_FP), backbone_fingerprint=FP)
    assert snapshot(store.root) == before
    assert store.path("t1").read_bytes() == old


def test_oversize(tmp_path):
    data = make("t1")
    s = LocalMaskStore(tmp_path / "s", max_bundle_bytes=len(data) - 1)
    s.put("keep", _small_enough(s))
    before = snapshot(s.root)
    with pytest.raises(BundleTooLarge) as exc:
        s.put("t1", data)
    assert exc.value.size_bytes == len(data) and exc.value.limit_bytes == len(data) - 1
    assert snapshot(s.root) == before


def _small_enough(s: LocalMaskStore) -> bytes:
    """A bundle that fits under s.max_bundle_bytes (fewer masks than make())."""
    rng = np.random.default_rng(5)
    data = encode_bundle(task="keep", problem_type="regression", labels=[], max_seq_length=8,
                         backbone_fingerprint=FP, masks={"l0.weight": rng.random((2, 2)) > 0.5},
                         head={HEAD_WEIGHT: np.zeros((1, HIDDEN)), HEAD_BIAS: np.zeros(1)})
    assert len(data) <= s.max_bundle_bytes
    return data


def test_oversize_limit_is_inclusive(tmp_path):
    data = make("t1")
    s = LocalMaskStore(tmp_path / "s", max_bundle_bytes=len(data))
    _, created = s.put("t1", data)
    assert created and s.tasks() == ["t1"]


def test_corrupted_bundle(store):
    store.put("keep", make("keep"))
    before = snapshot(store.root)
    with pytest.raises(BundleInvalid, match="checksum mismatch"):
        store.put("t1", corrupt(make("t1")))
    with pytest.raises(BundleInvalid):
        store.put("t1", b"not a bundle at all")
    assert snapshot(store.root) == before


def test_replace_with_corrupted_keeps_old_bytes(store):
    old = make("t1")
    store.put("t1", old)
    before = snapshot(store.root)
    with pytest.raises(BundleInvalid):
        store.put("t1", corrupt(make("t1", seed=9)))
    with pytest.raises(BundleInvalid):
        store.put("t1", make("t1", seed=9)[:-1])  # truncated
    assert snapshot(store.root) == before
    assert store.path("t1").read_bytes() == old
    assert_same_bundle(store.get("t1"), decode_bundle(old))


def test_validate_does_not_store(store):
    b = store.validate("t1", make("t1"), backbone_fingerprint=FP)
    assert b.header.task == "t1"
    assert store.tasks() == [] and list(store.root.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# task names
# ---------------------------------------------------------------------------------------------

BAD_NAMES = ["../x", "", "a/b", ".hidden", "x" * 65, "..", "a b", "a\\b", "-lead"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_task_names(store, name):
    with pytest.raises(InvalidTaskName):
        check_task_name(name)
    with pytest.raises(InvalidTaskName):
        store.put(name, make("ok"))
    with pytest.raises(InvalidTaskName):
        store.get(name)
    with pytest.raises(InvalidTaskName):
        store.header(name)
    with pytest.raises(InvalidTaskName):
        store.delete(name)
    assert list(store.root.iterdir()) == []


@pytest.mark.parametrize("name", ["a", "x" * 64, "SST-2", "sts_b.v1", "9lives"])
def test_valid_task_names(name):
    assert check_task_name(name) == name


def test_task_name_with_trailing_newline_rejected():
    with pytest.raises(InvalidTaskName):
        check_task_name("abc\n")


# ---------------------------------------------------------------------------------------------
# crash safety
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fail_at", ["replace", "fsync"])
def test_failed_write_keeps_old_bundle_and_leaves_no_temp_file(store, monkeypatch, fail_at):
    old = make("t1")
    store.put("t1", old)
    before = snapshot(store.root)
    calls = []

    def boom(*args, **kwargs):
        calls.append(args)
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(local_mod.os, fail_at, boom)
    with pytest.raises(StoreFull, match="disk is full.*simulated"):  # typed: the API answers 507
        store.put("t1", make("t1", seed=3))
    monkeypatch.undo()

    assert calls, f"os.{fail_at} was never called: the simulated crash did not happen"
    assert snapshot(store.root) == before  # old bytes intact, no '.tmp-*' left behind
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]
    assert store.path("t1").read_bytes() == old
    assert store.tasks() == ["t1"]


def test_failed_write_of_new_task_leaves_nothing(store, monkeypatch):
    monkeypatch.setattr(local_mod.os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError("simulated")))
    with pytest.raises(StoreUnavailable, match="simulated"):
        store.put("t1", make("t1"))
    monkeypatch.undo()
    assert list(store.root.iterdir()) == []
    assert store.tasks() == []


def test_only_stale_temp_files_removed_on_open(tmp_path):
    """Opening a store sweeps crashed writers' temporary files (old ones, or a dead process's on this
    host) and leaves a live writer's alone: a second server opening a shared store mid-upload used to
    delete every '.tmp-*' and fail that upload with FileNotFoundError."""
    import os
    import subprocess
    import sys

    root = tmp_path / "store"
    LocalMaskStore(root).put("t1", make("t1"))
    old = time.time() - local_mod.STALE_TMP_SECONDS - 60
    for name in (".tmp-abc123", ".tmp-xyz.smask"):  # unknown writer, old: removed by age
        (root / name).write_bytes(b"partial")
        os.utime(root / name, (old, old))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_name = f".tmp-{local_mod._HOST_ID}-{int(dead.stdout)}-aa"  # a writer of this host that exited
    (root / dead_name).write_bytes(b"partial")
    live_name = f".tmp-{local_mod._HOST_ID}-{os.getpid()}-bb"  # this process: a writer in progress
    (root / live_name).write_bytes(b"partial")
    foreign = ".tmp-0123abcd-1-cc"  # another host's writer, recent: may be alive
    (root / foreign).write_bytes(b"partial")
    s = LocalMaskStore(root)
    assert sorted(p.name for p in root.iterdir()) == sorted([foreign, live_name, "t1.smask"])
    assert s.tasks() == ["t1"]


def test_upload_survives_another_store_opening_mid_write(tmp_path, monkeypatch):
    """A store opened while another's atomic write sits between 'temp written' and 'rename' keeps it."""
    root = tmp_path / "store"
    writer = LocalMaskStore(root)
    real_replace = local_mod.os.replace
    opened = []

    def replace_after_another_open(src, dst):
        opened.append(LocalMaskStore(root))  # e.g. a second worker starting now
        return real_replace(src, dst)

    monkeypatch.setattr(local_mod.os, "replace", replace_after_another_open)
    writer.put("t1", make("t1"))
    assert opened and writer.tasks() == ["t1"]
    assert decode_bundle(writer.path("t1").read_bytes()).header.task == "t1"


# ---------------------------------------------------------------------------------------------
# seeding from the shipped examples
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def examples(tmp_path) -> Path:
    d = tmp_path / "examples"
    d.mkdir()
    (d / "sst2.smask").write_bytes(make("sst2"))
    (d / "cola.smask").write_bytes(make("cola", seed=1))
    (d / "broken.smask").write_bytes(b"SUPMASK1garbage")
    (d / "renamed.smask").write_bytes(make("other"))  # declares a different task
    (d / "notes.txt").write_text("ignored")
    return d


def test_seed_from_into_empty_store(store, examples):
    copied = store.seed_from(examples)
    assert copied == ["cola", "sst2"]
    assert store.tasks() == ["cola", "sst2"]
    assert store.path("sst2").read_bytes() == (examples / "sst2.smask").read_bytes()
    assert store.path("cola").read_bytes() == (examples / "cola.smask").read_bytes()


def test_seed_from_leaves_nonempty_store_alone(store, examples):
    store.put("mine", make("mine"))
    before = snapshot(store.root)
    assert store.seed_from(examples) == []
    assert snapshot(store.root) == before


def test_seed_from_missing_directory(store, tmp_path):
    assert store.seed_from(tmp_path / "nope") == []
    assert store.tasks() == []


def test_seed_from_respects_size_limit(tmp_path, examples):
    s = LocalMaskStore(tmp_path / "s", max_bundle_bytes=10)
    assert s.seed_from(examples) == []
    assert s.tasks() == []


def test_spooled_upload_is_validated_from_the_file_and_renamed_into_place(store):
    """An upload streamed into the spool file is stored by renaming that very file (no second copy)."""
    import os

    data = make("t1")
    with store.spool() as (fh, path):
        fh.write(data[:100])
        fh.write(data[100:])
        fh.flush()
        inode = os.stat(path).st_ino
        bundle, created = store.put("t1", path)
    assert created and bundle.header.task == "t1"
    assert store.path("t1").stat().st_ino == inode and store.path("t1").read_bytes() == data
    assert not [p for p in store.root.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("content", [b"", b"SUPMASK2", None])
def test_rejected_spooled_upload_leaves_nothing(store, content):
    good = make("t1")
    store.put("t1", good)
    data = content if content is not None else good[:-5]
    with pytest.raises(BundleInvalid):
        with store.spool() as (fh, path):
            fh.write(data)
            fh.flush()
            store.put("t1", path)
    assert sorted(p.name for p in store.root.iterdir()) == ["t1.smask"]
    assert store.path("t1").read_bytes() == good


# ---- label-set bounds, a stored file naming another task, quarantine racing another server's upload ------------


def _labelled(task: str, labels: list[str]) -> bytes:
    rng = np.random.default_rng(0)
    n = len(labels)
    return encode_bundle(task=task, problem_type="single_label_classification", labels=labels, max_seq_length=64,
                         backbone_fingerprint=FP, masks={"l0.weight": rng.random((8, 4)) > 0.3},
                         head={HEAD_WEIGHT: rng.normal(size=(n, HIDDEN)), HEAD_BIAS: rng.normal(size=(n,))})


def test_label_set_bounds_refuse_many_or_long_labels_and_store_nothing(tmp_path):
    s = LocalMaskStore(tmp_path / "store", max_labels=8, max_label_chars=12)
    with pytest.raises(BundleInvalid, match=r"9 labels, more than the limit of 8 \(SUPERMASK_MAX_LABELS\)"):
        s.put("many", _labelled("many", [f"l{i}" for i in range(9)]))
    with pytest.raises(BundleInvalid, match=r"13 characters, more than the limit of 12 \(SUPERMASK_MAX_LABEL_CHARS"):
        s.put("long", _labelled("long", ["short", "x" * 13]))
    assert s.tasks() == [] and list(s.root.iterdir()) == []
    s.put("ok", _labelled("ok", [f"l{i}" for i in range(8)]))  # at the bound: accepted
    assert s.tasks() == ["ok"]
    default = LocalMaskStore(tmp_path / "default")  # the defaults bound 4,096 labels of 256 characters
    with pytest.raises(BundleInvalid, match="SUPERMASK_MAX_LABELS"):
        default.validate("big", _labelled("big", [f"{i:0>256}" for i in range(4096)]))


def test_stored_file_naming_another_task_is_refused_and_quarantined(store):
    store.put("pos", make("pos"))
    (store.root / "neg.smask").write_bytes(make("pos", seed=3))  # copied under another name, behind the store
    with pytest.raises(StoredBundleCorrupt, match="declares task 'pos' but is stored as 'neg'"):
        store.header("neg")
    assert "neg" not in store.tasks() and store.quarantined() == ["neg"]
    (store.root / "neg2.smask").write_bytes(make("pos", seed=4))
    with pytest.raises(StoredBundleCorrupt):
        store.get("neg2")
    assert store.quarantined() == ["neg", "neg2"] and store.tasks() == ["pos"]


def test_quarantine_never_moves_another_servers_newer_upload(tmp_path, monkeypatch):
    """Server A judged a corrupt file; server B (another store on the directory) replaces it with a valid upload
    just after A's "is it still the file I read?" check: B's upload must survive, only the corrupt bytes move."""
    import threading

    a, b = LocalMaskStore(tmp_path / "shared"), LocalMaskStore(tmp_path / "shared")
    good = make("t", seed=7)
    (a.root / "t.smask").write_bytes(corrupt(make("t")))
    real_identity, fired = local_mod._identity, []

    def identity_then_b_uploads(st):
        if not fired:  # the first identity check is quarantine's: B uploads right after its stat
            fired.append(True)
            th = threading.Thread(target=b.put, args=("t", good))
            th.start()
            th.join(0.5)  # B blocks when A holds the store's lock (the fix); finishes at once without it
            fired.append(th)
        return real_identity(st)

    monkeypatch.setattr(local_mod, "_identity", identity_then_b_uploads)
    with pytest.raises(StoredBundleCorrupt):
        a.get("t")
    fired[1].join(10)
    monkeypatch.undo()
    assert_same_bundle(b.get("t"), decode_bundle(good))  # B's acknowledged upload is there
    moved = [p for p in a.root.iterdir() if ".corrupt-" in p.name]
    assert len(moved) == 1 and moved[0].read_bytes() == corrupt(make("t"))  # only the judged bytes moved
