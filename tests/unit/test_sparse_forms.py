"""Sparse forms (service/sparse_forms.py): a task that is not hot is served through the shared plain product minus
its sparse correction, which equals its hot product up to float rounding; the warm tier holds the bundle's coded
masks; the hot tier's admission is frequency-based once a sparse form can serve a task, and promotions can run in
the background."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from backbone import load_backbone
from mask_store.format import encode_mask_section, pruned_positions
from service.engine import Engine
from service.kernels import cpu_hot
from service.metrics import Metrics
from service.sparse_forms import SparseForm, csr_from_positions, sparse_product
from tests.conftest import make_store

ROWS = [("a charming and often affecting journey", None), ("dull, flat and lifeless", None)]
TASKS = {"s10": 0.10, "s15": 0.15, "s20": 0.2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("precision", ["int8", "bf16"])
@pytest.mark.parametrize("sparsity", [0.0, 0.03, 0.5])
def test_sparse_product_equals_the_hot_product_of_each_segment(precision, sparsity):
    if cpu_hot.unavailable_reason(precision) is not None:
        pytest.skip(cpu_hot.unavailable_reason(precision))
    gen = torch.Generator().manual_seed(1)
    out, in_ = 96, 64
    w_q = torch.randint(-127, 128, (out, in_), dtype=torch.int8, generator=gen)
    scale = torch.rand(out, generator=gen) * 0.01 + 1e-3
    bias = torch.randn(out, generator=gen)
    x = torch.randn(7, in_, generator=gen) * 3
    masks = [torch.rand(out, in_, generator=gen) >= sparsity for _ in range(2)]
    plain = cpu_hot.materialize(w_q, scale, None, bias, precision)
    forms = [SparseForm({"g": csr_from_positions(w_q, scale, np.flatnonzero(~m.numpy().reshape(-1)), precision)}, 0)
             for m in masks]
    starts = [0, 3, 7]
    got = sparse_product(x, plain, "g", starts, forms)
    for i, m in enumerate(masks):
        want = cpu_hot.hot_linear(x[starts[i]:starts[i + 1]], cpu_hot.materialize(w_q, scale, m, bias, precision))
        # the same stored values and the same activation codes: only the order of float sums differs (bf16: and
        # where the product is rounded to bfloat16, which the hot product does to its whole sum)
        assert _rel(got[starts[i]:starts[i + 1]], want) < (1e-5 if precision == "int8" else 1e-2)
    if sparsity > 0:  # and the masks matter: without the correction the product is another one
        assert _rel(cpu_hot.hot_linear(x, plain)[:3], got[:3]) > 1e-3


@pytest.mark.parametrize("sparsity", [0.0, 0.001, 0.03, 0.5, 0.9, 1.0])
def test_pruned_positions_from_the_coded_section_equal_the_mask_scan(sparsity):
    rng = np.random.default_rng(3)
    mask = rng.random((37, 129)) >= sparsity
    want = np.flatnonzero(~mask.reshape(-1))
    for version in (2, 3):
        coding, section, pruned = encode_mask_section(mask, version)
        got = pruned_positions(coding, section, mask.shape, pruned if version == 3 else None)
        assert got.dtype == np.int64 and np.array_equal(got, want), (version, coding)


@pytest.fixture
def store(tiny_backbone, tmp_path):
    return make_store(tiny_backbone, tmp_path, TASKS)


def _engine(backbone_dir, store, **kw) -> Engine:
    return Engine(load_backbone(backbone_dir), store, Metrics(), cache_bytes=1 << 30, device="cpu", precision="int8",
                  runtime="torch", **kw)


def _metric(engine: Engine, line: str) -> float:
    for row in engine.metrics.render().decode().splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    return 0.0


def test_a_task_not_hot_is_served_through_its_sparse_form_close_to_its_hot_form(tiny_backbone_dir, store):
    sparse = _engine(tiny_backbone_dir, store, hot_promote_after=1000)
    hot = _engine(tiny_backbone_dir, store)
    ref = Engine(load_backbone(tiny_backbone_dir), store, Metrics(), cache_bytes=1 << 30, device="cpu",
                 precision="fp32")
    for task in TASKS:
        got, want, exact = sparse.logits(task, ROWS), hot.logits(task, ROWS), ref.logits(task, ROWS)
        assert sparse.tier(task) == "warm" and hot.tier(task) == "hot"
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)
        torch.testing.assert_close(got, exact, rtol=0.05, atol=0.03)  # the int8 tolerance of the fp32 path
    tier = sparse.compute_tier
    assert len(tier.hot.tasks) == 0 and sorted(tier.sparse.tasks) == sorted(TASKS)
    assert _metric(sparse, 'supermask_hot_admissions_total{decision="sparse"}') == len(TASKS)
    assert _metric(sparse, "supermask_sparse_tasks") == len(TASKS)
    assert _metric(sparse, "supermask_sparse_form_duration_seconds_count") == len(TASKS)
    assert sparse.status()["tiers"]["sparse"]["tasks"] == len(TASKS)
    # the masks matter on this path too
    assert not torch.allclose(sparse.logits("s20", ROWS), sparse.logits("s10", ROWS), atol=1e-3)


def test_sparse_forms_off_builds_the_hot_form_for_the_pass(tiny_backbone_dir, store):
    engine = _engine(tiny_backbone_dir, store, hot_promote_after=1000, sparse_cache_bytes=0)
    engine.logits("s10", ROWS)
    assert engine.compute_tier.sparse is None and "sparse" not in engine.status()["tiers"]
    assert _metric(engine, 'supermask_hot_admissions_total{decision="pass_only"}') == 1


def test_the_warm_tier_holds_the_coded_masks(tiny_backbone_dir, store):
    engine = _engine(tiny_backbone_dir, store)
    entry = engine.warm("s10")
    states = list(entry.layers.values())
    assert states and all(st.coded is not None and st.packed is None for st in states)
    bits = sum((st.shape[0] * st.shape[1] + 7) // 8 for st in states)
    assert sum(st.nbytes() for st in states) < bits  # the coded sections, not one bit per weight
    for st in states:  # and it decodes to the same mask
        flat = np.unpackbits(st.bits().numpy(), count=st.shape[0] * st.shape[1], bitorder="big")
        assert np.array_equal(np.flatnonzero(flat == 0), st.pruned_positions())


def test_a_frequent_hot_task_is_not_evicted_by_a_rarer_one(tiny_backbone_dir, store):
    engine = _engine(tiny_backbone_dir, store)
    engine.hot.capacity_bytes = engine.hot.task_bytes(engine.warm("s10"))  # room for one task
    for _ in range(3):
        engine.logits("s10", ROWS)
    engine.logits("s15", ROWS)  # asked for once: served through its sparse form, s10 stays
    assert list(engine.hot.tasks) == ["s10"] and engine.tier("s15") == "warm" and engine.hot.evictions == 0
    for _ in range(3):
        engine.logits("s15", ROWS)  # now asked for as often as s10: it takes the place
    assert list(engine.hot.tasks) == ["s15"] and engine.hot.evictions == 1


def test_a_background_promotion_serves_the_request_through_the_sparse_form(tiny_backbone_dir, store):
    engine = _engine(tiny_backbone_dir, store, hot_promote_background=True)
    first = engine.logits("s10", ROWS)  # answered at once through its sparse form; the promotion runs beside it
    deadline = time.monotonic() + 30
    while engine.tier("s10") != "hot" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.tier("s10") == "hot"
    assert _metric(engine, 'supermask_hot_admissions_total{decision="promoted"}') == 1
    assert _metric(engine, 'supermask_hot_admissions_total{decision="sparse"}') >= 1
    torch.testing.assert_close(engine.logits("s10", ROWS), first, rtol=0.02, atol=0.02)


def test_a_v2_bundle_is_served_through_its_sparse_form_from_its_packed_bits(tiny_backbone, tiny_backbone_dir, tmp_path):
    """A v2 bundle (packed bits, no coded gaps): the warm form keeps the bits, the sparse form scans them, and the
    answer is the v3 bundle's (the same masks)."""
    from mask_store.format import decode_bundle, encode_bundle
    from mask_store.local import LocalMaskStore
    from tests.conftest import make_bundle

    v3 = decode_bundle(make_bundle(tiny_backbone, "t", sparsity=0.2, seed=5))
    h = v3.header
    masks = {m.name: v3.mask_array(m.name) for m in h.masks}
    v2 = encode_bundle(task="t", problem_type=h.problem_type, labels=list(h.labels), max_seq_length=h.max_seq_length,
                       backbone_fingerprint=h.backbone_fingerprint, masks=masks, head=v3.head, format_version=2)
    answers = {}
    for version, data in (("v2", v2), ("v3", make_bundle(tiny_backbone, "t", sparsity=0.2, seed=5))):
        store = LocalMaskStore(tmp_path / version)
        store.put("t", data, tiny_backbone.fingerprint)
        engine = _engine(tiny_backbone_dir, store, hot_promote_after=1000)
        answers[version] = engine.logits("t", ROWS)
        states = list(engine.warm("t").layers.values())
        assert all((st.packed is not None) == (version == "v2") for st in states)
        assert engine.tier("t") == "warm" and "t" in engine.compute_tier.sparse.tasks
    torch.testing.assert_close(answers["v2"], answers["v3"], rtol=0, atol=0)


def test_a_task_pruned_past_the_cutoff_gets_its_hot_form_for_the_pass(tiny_backbone, tiny_backbone_dir, tmp_path):
    from service.tiers.base import SPARSE_MAX_PRUNED

    store = make_store(tiny_backbone, tmp_path, {"dense": 0.5, "light": 0.1})
    assert SPARSE_MAX_PRUNED < 0.5
    engine = _engine(tiny_backbone_dir, store, hot_promote_after=1000)
    hot = _engine(tiny_backbone_dir, store)
    torch.testing.assert_close(engine.logits("dense", ROWS), hot.logits("dense", ROWS), rtol=1e-5, atol=1e-6)
    engine.logits("light", ROWS)
    assert list(engine.compute_tier.sparse.tasks) == ["light"] and not engine.hot.tasks
    assert _metric(engine, 'supermask_hot_admissions_total{decision="pass_only"}') == 1


def test_the_onnxruntime_tier_starts_without_sparse_forms_where_torch_int8_cannot_run(tiny_backbone_dir, store,
                                                                                        monkeypatch):
    from service.kernels import ort_encoder

    if ort_encoder.unavailable_reason() is not None:
        pytest.skip(ort_encoder.unavailable_reason())
    monkeypatch.setattr(cpu_hot, "unavailable_reason", lambda precision: "no oneDNN int8 here (simulated)")
    engine = Engine(load_backbone(tiny_backbone_dir), store, Metrics(), cache_bytes=1 << 30, device="cpu",
                    precision="int8", runtime="onnxruntime", hot_promote_after=1000)
    assert engine.compute_tier.sparse is None and engine.compute_tier.plain == {}
    assert engine.logits("s10", ROWS).shape == (2, 2)  # its session built for the pass
    assert _metric(engine, 'supermask_hot_admissions_total{decision="pass_only"}') == 1


def test_the_onnxruntime_tiers_sparse_pass_pads_lengths_to_a_bucket_and_answers_the_same(tiny_backbone_dir, store):
    from service.kernels import ort_encoder
    from service.tiers import onnxruntime as ort_tier

    if ort_encoder.unavailable_reason() is not None:
        pytest.skip(ort_encoder.unavailable_reason())
    padded = ort_tier.pad_to_bucket({"input_ids": torch.ones(2, 5, dtype=torch.int64),
                                     "attention_mask": torch.ones(2, 5, dtype=torch.int64)}, 16)
    assert padded["input_ids"].shape == (2, 16) and int(padded["attention_mask"].sum()) == 10
    engines = {}
    for bucket in (1, 16):
        ort_tier.SPARSE_LENGTH_BUCKET, before = bucket, ort_tier.SPARSE_LENGTH_BUCKET
        try:
            engine = Engine(load_backbone(tiny_backbone_dir), store, Metrics(), cache_bytes=1 << 30, device="cpu",
                            precision="int8", runtime="onnxruntime", hot_promote_after=1000)
            engines[bucket] = engine.logits("s10", ROWS)
        finally:
            ort_tier.SPARSE_LENGTH_BUCKET = before
    torch.testing.assert_close(engines[16], engines[1], rtol=1e-5, atol=1e-5)


def test_a_task_past_the_cutoff_is_counted_once_and_falls_back_to_its_sparse_form_when_its_build_fails(
        tiny_backbone, tiny_backbone_dir, tmp_path):
    store = make_store(tiny_backbone, tmp_path, {"dense": 0.5})
    engine = _engine(tiny_backbone_dir, store, hot_promote_after=3)
    engine.logits("dense", ROWS)
    assert engine.hot._freq["dense"] == 1.0 and engine.hot._seen["dense"] == [1]  # one request, counted once

    def fail(task, entry):
        raise MemoryError("no room for the hot form")

    engine.hot._promote = fail
    got = engine.logits("dense", ROWS)  # its hot form for the pass fails: its sparse form answers
    assert got.shape == (2, 2) and list(engine.compute_tier.sparse.tasks) == ["dense"]
    assert _metric(engine, 'supermask_hot_admissions_total{decision="sparse"}') == 1


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_csr_from_positions_holds_the_plain_weights_at_the_positions(strided, precision):
    """The CSR equals the dense plain weight (W_q · scale, bf16-rounded for bf16) at the positions and 0 elsewhere,
    rows without a position included, for a contiguous weight and a strided view of a wider one."""
    gen = torch.Generator().manual_seed(3)
    wide = torch.randint(-127, 128, (7, 20), dtype=torch.int8, generator=gen)
    w_q = wide[:, 2:15] if strided else wide[:, :13].contiguous()
    assert w_q.is_contiguous() is not strided
    scale = torch.rand(7, generator=gen) + 0.5
    keep = torch.rand(7, 13, generator=gen) > 0.3
    keep[2] = True  # a row with no pruned weight
    positions = np.flatnonzero(~keep.numpy().reshape(-1))
    csr = csr_from_positions(w_q, scale, positions, precision)
    want = w_q.float() * scale[:, None]
    if precision == "bf16":
        want = want.to(torch.bfloat16).float()
    torch.testing.assert_close(csr.to_dense(), torch.where(keep, 0.0, want), rtol=0, atol=0)
    assert csr_from_positions(w_q, scale, positions[:0], precision) is None
