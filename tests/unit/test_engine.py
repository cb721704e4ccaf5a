"""Engine: served masked forward equals a reference model with materialised deq(W_q) ⊙ μ; the task cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mask_store.errors import BackboneMismatch, TaskNotFound
from mask_store.format import HEAD_BIAS, HEAD_WEIGHT, decode_bundle
from mask_store.local import LocalMaskStore
from backbone import dequantize, load_backbone, mean_pool
from service.engine import Engine, PredictRequest
from service.tasks import choose_path
from service.errors import InputInvalid
from service.metrics import Metrics
from tests.conftest import make_bundle

TEXTS = [("a charming and often affecting journey", None), ("dull, flat and lifeless", None),
         ("the weights made the rope stretch over the pulley", None)]


def reference_logits(backbone_dir, bundle_bytes: bytes, rows) -> torch.Tensor:
    """Independent reference: a freshly loaded backbone whose masked weights are set to deq(W_q) ⊙ μ."""
    bb = load_backbone(backbone_dir)
    bundle = decode_bundle(bundle_bytes)
    for name in bb.masked:
        mask = torch.from_numpy(bundle.mask_array(f"{name}.weight"))
        bb.model.get_submodule(name).weight.data = dequantize(bb.qweight[name], bb.scale[name]) * mask
    enc = bb.tokenizer([r[0] for r in rows], truncation=True, max_length=bundle.header.max_seq_length,
                       padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = bb.model(**enc).last_hidden_state
        pooled = mean_pool(hidden, enc["attention_mask"])
        return pooled @ torch.from_numpy(bundle.head[HEAD_WEIGHT]).t() + torch.from_numpy(bundle.head[HEAD_BIAS])


@pytest.mark.parametrize("kernel_path", ["auto", "cpu_complement", "cpu_dense", "reference"])
@pytest.mark.parametrize("sparsity", [0.0, 0.01, 0.13, 0.5])
def test_served_forward_equals_materialised_reference(tiny_backbone, tiny_backbone_dir, tmp_path, kernel_path,
                                                      sparsity):
    data = make_bundle(tiny_backbone, sparsity=sparsity, seed=int(sparsity * 100))
    store = LocalMaskStore(tmp_path)
    store.put("toy", data)
    engine = Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu", kernel_path=kernel_path)
    got = engine.logits("toy", TEXTS)
    want = reference_logits(tiny_backbone_dir, data, TEXTS)
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if sparsity > 0:  # the mask must matter: the same head over the unmasked backbone gives other logits
        all_ones = make_bundle(tiny_backbone, sparsity=0.0, seed=int(sparsity * 100))
        assert decode_bundle(all_ones).head[HEAD_WEIGHT].tolist() == decode_bundle(data).head[HEAD_WEIGHT].tolist()
        assert not torch.allclose(got, reference_logits(tiny_backbone_dir, all_ones, TEXTS), atol=1e-4)


def test_mask_changes_output(tiny_backbone, tmp_path):
    store = LocalMaskStore(tmp_path)
    dense = make_bundle(tiny_backbone, task="dense", sparsity=0.0, seed=1)
    sparse = make_bundle(tiny_backbone, task="sparse", sparsity=0.3, seed=1)  # same head (same seed)
    assert decode_bundle(dense).head[HEAD_WEIGHT].tolist() == decode_bundle(sparse).head[HEAD_WEIGHT].tolist()
    store.put("dense", dense)
    store.put("sparse", sparse)
    engine = Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu")
    a, b = engine.logits("dense", TEXTS), engine.logits("sparse", TEXTS)
    assert (a - b).abs().max() > 1e-3


def test_backbone_not_copied_per_task(tiny_backbone, tmp_path):
    store = LocalMaskStore(tmp_path)
    store.put("t1", make_bundle(tiny_backbone, task="t1", sparsity=0.05))
    engine = Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu")
    ptrs = {n: engine.layers[n].weight.data_ptr() for n in engine.layers}
    engine.logits("t1", TEXTS)
    entry = engine.cache.tasks["t1"]
    assert {n: engine.layers[n].weight.data_ptr() for n in engine.layers} == ptrs
    # the resident task holds only the pruned entries (~5 %) plus the head, far less than the backbone's weights
    masked_bytes = sum(engine.layers[n].weight.numel() * 4 for n in engine.layers)
    assert 0 < entry.nbytes < 0.2 * masked_bytes


def test_cache_is_lru_bounded_in_bytes(tiny_backbone, tmp_path):
    store = LocalMaskStore(tmp_path)
    for i in range(3):
        store.put(f"t{i}", make_bundle(tiny_backbone, task=f"t{i}", sparsity=0.1, seed=i))
    probe = Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu")
    one = probe.build_task(store.get("t0")).nbytes
    tiny2 = load_backbone(tiny_backbone.path)
    metrics = Metrics()
    engine = Engine(tiny2, store, metrics, cache_bytes=int(2.5 * one), device="cpu")
    engine.logits("t0", TEXTS[:1])
    engine.logits("t1", TEXTS[:1])
    engine.logits("t0", TEXTS[:1])  # t0 now most recent
    engine.logits("t2", TEXTS[:1])  # evicts t1
    assert list(engine.cache.tasks) == ["t0", "t2"]
    assert engine.cache.used_bytes <= int(2.5 * one)
    text = metrics.render().decode()
    assert "supermask_cache_evictions_total 1.0" in text
    assert 'supermask_cache_hits_total{task="t0"} 1.0' in text
    assert 'supermask_cache_misses_total{task="t0"} 1.0' in text
    assert "supermask_resident_tasks 2.0" in text


def test_choose_path():
    assert choose_path(0.0, "auto") == "none"
    assert choose_path(0.05, "auto") == "complement"
    assert choose_path(0.6, "auto") == "dense"
    assert choose_path(0.05, "cpu_dense") == "dense"
    assert choose_path(0.05, "reference") == "reference"


def test_errors(tiny_backbone, tmp_path):
    store = LocalMaskStore(tmp_path)
    engine = Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu")
    with pytest.raises(TaskNotFound):
        engine.logits("missing", TEXTS)
    bad = make_bundle(tiny_backbone, task="other", fingerprint="0" * 64)
    (tmp_path / "other.smask").write_bytes(bad)  # bypass the store's check, as a stale file would
    with pytest.raises(BackboneMismatch):
        engine.logits("other", TEXTS)
    store.put("pairs", make_bundle(tiny_backbone, task="pairs", text_pairs=True))
    with pytest.raises(InputInvalid, match="pairs"):
        engine.predict(PredictRequest("pairs", (("only one text", None),)))
    with pytest.raises(TaskNotFound):
        engine.predict(PredictRequest("missing", (("x", None),)))
    engine.predict(PredictRequest("pairs", (("a", "b"), ("c", "d"))))
    # failed predicts are counted under the task's name, or "_unknown" for a name the store lacks
    count = engine.metrics.registry.get_sample_value
    assert count("supermask_requests_total", {"task": "pairs", "outcome": "error"}) == 1
    assert count("supermask_requests_total", {"task": "_unknown", "outcome": "error"}) == 1
    assert count("supermask_requests_total", {"task": "pairs", "outcome": "ok"}) == 1
    assert count("supermask_request_duration_seconds_count", {"task": "pairs"}) == 1  # the ok one only
    assert count("supermask_inference_rows_sum", {"task": "pairs"}) == 2


def test_predict_output_shape(tiny_backbone, tmp_path):
    store = LocalMaskStore(tmp_path)
    store.put("toy", make_bundle(tiny_backbone))
    store.put("reg", make_bundle(tiny_backbone, task="reg", labels=()))
    engine = Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu", max_batch_size=2)
    preds = engine.predict(PredictRequest("toy", tuple(TEXTS)))
    assert len(preds) == 3
    for p in preds:
        assert set(p) == {"label", "score", "scores"}
        assert p["label"] in ("neg", "pos")
        assert abs(sum(p["scores"].values()) - 1) < 1e-5
        assert p["score"] == max(p["scores"].values())
    # chunking by max_batch_size (2 rows per pass here) gives the same answer as one pass
    one_pass = Engine(load_backbone(tiny_backbone.path), store, Metrics(), cache_bytes=1 << 30, device="cpu", max_batch_size=8)
    torch.testing.assert_close(engine.logits("toy", TEXTS), one_pass.logits("toy", TEXTS), rtol=1e-4, atol=1e-5)
    reg = engine.predict(PredictRequest("reg", tuple(TEXTS)))
    assert all(set(p) == {"value"} and np.isfinite(p["value"]) for p in reg)


def test_a_replacement_or_deletion_by_another_worker_is_served_without_invalidate(tiny_backbone, tiny_backbone_dir,
                                                                                  tmp_path):
    # two store objects over one directory, as two server workers: only the other one sees the upload
    mine, other = LocalMaskStore(tmp_path), LocalMaskStore(tmp_path)
    metrics = Metrics()
    engine = Engine(tiny_backbone, mine, metrics, cache_bytes=1 << 30, device="cpu")
    other.put("toy", make_bundle(tiny_backbone, seed=1))
    engine.logits("toy", TEXTS)
    engine.logits("toy", TEXTS)
    hits = metrics.registry.get_sample_value
    assert hits("supermask_cache_hits_total", {"task": "toy"}) == 1  # unchanged file: a plain hit
    new = make_bundle(tiny_backbone, seed=2, labels=("a", "b", "c"))
    other.put("toy", new)
    preds = engine.predict(PredictRequest("toy", tuple(TEXTS)))
    assert all(set(p["scores"]) == {"a", "b", "c"} for p in preds)
    torch.testing.assert_close(engine.logits("toy", TEXTS), reference_logits(tiny_backbone_dir, new, TEXTS),
                               rtol=1e-4, atol=1e-5)
    other.delete("toy")
    with pytest.raises(TaskNotFound):
        engine.logits("toy", TEXTS)
    assert not engine.is_resident("toy") and engine.cache.used_bytes == 0
