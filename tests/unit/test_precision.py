"""CPU precisions through the engine: fp32 is today's path exactly; bf16 / int8 serve through the hot tier
within a stated tolerance; hot, warm and cold tasks mix in one batch; the hot tier's byte budget holds."""

from __future__ import annotations

import pytest
import torch

from backbone import load_backbone
from service.engine import Engine, resolve_precision
from service.metrics import Metrics
from tests.conftest import make_bundle, make_store

ROWS = [("a charming and often affecting journey", None), ("dull, flat and lifeless", None),
        ("the film is strictly routine", None)]
TASKS = {"s0": 0.0, "s10": 0.10, "s50": 0.5}
# logits of the tiny random model are O(0.1-1); per-token int8 activations and bf16 weights stay within these
TOLERANCE = {"bf16": dict(rtol=0.05, atol=0.03), "int8": dict(rtol=0.05, atol=0.03)}


@pytest.fixture
def store(tiny_backbone, tmp_path):
    return make_store(tiny_backbone, tmp_path, TASKS)


def _engine(backbone_dir, store, precision, **kw) -> Engine:
    """An engine on the torch tiers (the ONNX Runtime int8 tier: tests/unit/test_ort_tier.py)."""
    return Engine(load_backbone(backbone_dir), store, Metrics(), cache_bytes=1 << 30, device="cpu",
                  precision=precision, **{"runtime": "torch", **kw})


def test_fp32_precision_is_todays_path_bit_for_bit(tiny_backbone_dir, store):
    default = _engine(tiny_backbone_dir, store, "fp32")
    assert default.hot is None and default.precision == "fp32"
    for task in TASKS:
        a = default.logits(task, ROWS)
        b = Engine(load_backbone(tiny_backbone_dir), store, Metrics(), cache_bytes=1 << 30, device="cpu").logits(task, ROWS)
        assert torch.equal(a, b)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_low_precision_matches_fp32_within_tolerance_and_masks_matter(tiny_backbone_dir, store, precision):
    ref = _engine(tiny_backbone_dir, store, "fp32")
    low = _engine(tiny_backbone_dir, store, precision)
    assert low.precision == precision and low.hot is not None
    assert all(ml.weight is None for ml in low.layers.values())  # no float32 copy of the masked weights kept
    outs = {t: ref.logits(t, ROWS) for t in TASKS}
    for task in TASKS:
        torch.testing.assert_close(low.logits(task, ROWS), outs[task], **TOLERANCE[precision])
    # the 50 %-pruned mask changes the answer by more than the tolerance, so a path ignoring masks would fail
    assert not torch.allclose(outs["s50"], outs["s0"], **TOLERANCE[precision])
    assert low.tier("s10") == "hot"


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_hot_warm_and_cold_tasks_in_one_mixed_batch_equal_single_task_passes(tiny_backbone_dir, store, precision):
    engine = _engine(tiny_backbone_dir, store, precision)
    one_task = engine.hot.task_bytes(engine.warm("s10"))
    engine.hot.capacity_bytes = one_task  # room for exactly one masked task
    engine.logits("s10", ROWS)  # s10 hot
    engine.warm("s50")  # s50 warm (loaded, not materialised); s0 cold
    assert [engine.tier(t) for t in ("s10", "s50", "s0")] == ["hot", "warm", "cold"]
    alone = {t: _engine(tiny_backbone_dir, store, precision).logits(t, ROWS) for t in ("s10", "s0")}
    alone["s50"] = _engine(tiny_backbone_dir, store, precision, hot_promote_after=1000).logits("s50", ROWS)
    mixed = engine.logits_mixed([("s10", ROWS), ("s50", ROWS), ("s0", ROWS)])
    # s10, asked for twice, keeps its place; s50, asked for once, would evict it, and is too far pruned for a sparse
    # form (service.tiers.base.SPARSE_MAX_PRUNED): its hot form is built for the pass; s0 masks nothing, so it is
    # hot at 0 bytes (the shared base weights)
    assert list(engine.hot.tasks) == ["s10", "s0"] and engine.hot.tasks["s0"].nbytes == 0
    assert not engine.compute_tier.sparse.tasks
    for task, got in zip(("s10", "s50", "s0"), mixed):
        # per-token activation scales: a row's result does not depend on the other rows of its batch
        torch.testing.assert_close(got, alone[task], rtol=1e-5, atol=1e-6)
    assert engine.hot.used_bytes <= engine.hot.capacity_bytes


def test_hot_tier_budget_is_exact_in_bytes(tiny_backbone_dir, store):
    engine = _engine(tiny_backbone_dir, store, "int8")
    sizes = {t: engine.hot.task_bytes(engine.warm(t)) for t in ("s10", "s50")}
    assert sizes["s10"] > 0
    engine.hot.capacity_bytes = sizes["s10"] + sizes["s50"]
    engine.logits("s10", ROWS)
    engine.logits("s50", ROWS)
    assert engine.hot.used_bytes == sizes["s10"] + sizes["s50"] == engine.hot.capacity_bytes
    assert sum(engine.hot.tasks[t].nbytes for t in engine.hot.tasks) == engine.hot.used_bytes
    text = engine.metrics.render().decode()
    assert f"supermask_hot_bytes {float(engine.hot.used_bytes)}" in text
    assert 'supermask_cpu_precision_info{precision="int8"} 1.0' in text
    assert "supermask_hot_promotion_duration_seconds_count" in text


def test_replaced_bundle_is_rematerialised(tiny_backbone, tiny_backbone_dir, store):
    engine = _engine(tiny_backbone_dir, store, "int8")
    before = engine.logits("s10", ROWS)
    store.put("s10", make_bundle(tiny_backbone, task="s10", sparsity=0.6, seed=9))
    after = engine.logits("s10", ROWS)
    want = _engine(tiny_backbone_dir, store, "int8").logits("s10", ROWS)
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before, after, atol=1e-3)


def test_precision_choices_and_refusals(tiny_backbone_dir, store):
    assert resolve_precision("auto") in ("fp32", "bf16", "int8")
    with pytest.raises(ValueError, match="unknown CPU precision 'fp16'"):
        resolve_precision("fp16")
    with pytest.raises(ValueError, match="fp32 CPU path"):
        _engine(tiny_backbone_dir, store, "int8", kernel_path="cpu_dense")


def test_a_promotion_runs_once_outside_the_pass_lock(tiny_backbone_dir, store):
    import threading

    engine = _engine(tiny_backbone_dir, store, "bf16")
    want_hot = engine.logits("s0", ROWS)  # s0 hot
    engine.warm("s50")  # loaded, not yet materialised
    gate, promoted = threading.Event(), []
    real = engine.hot._promote

    def slow_promote(task, entry):
        promoted.append(task)
        assert gate.wait(30), "test gate never opened"
        return real(task, entry)

    engine.hot._promote = slow_promote
    threads = [threading.Thread(target=engine.logits, args=("s50", ROWS)) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        while not promoted:
            threading.Event().wait(0.01)
        # s50 is being materialised (held at the gate): a pass of the hot task runs meanwhile
        assert torch.equal(engine.logits("s0", ROWS), want_hot)
        assert engine.tier("s50") == "warm"
    finally:
        gate.set()
        for t in threads:
            t.join(30)
    assert promoted == ["s50"]  # four requests, one promotion
    assert engine.tier("s50") == "hot"
