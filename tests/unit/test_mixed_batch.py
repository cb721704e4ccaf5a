"""Mixed-task batches: ``Engine.logits_mixed`` equals per-task ``logits``, on the CPU path and on the
device tier (emulated on the CPU; on CUDA in the GPU test)."""

from __future__ import annotations

import os

import pytest
import torch

from mask_store.local import LocalMaskStore
from backbone import load_backbone
from service.dispatch import resolve_device
from service.engine import Engine
from service.kernels import sparse_complement, triton_masked
from service.metrics import Metrics
from tests.conftest import make_bundle

ON_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Three single-text tasks with the SAME seed (so the same head) and different sparsities: only the mask
# tells them apart, so a row served with another segment's mask gives other logits. Plus a pairs task
# with three labels and a regression task.
TASKS = {"s0": dict(sparsity=0.0, seed=7), "s10": dict(sparsity=0.1, seed=7), "s50": dict(sparsity=0.5, seed=7),
         "pairs": dict(sparsity=0.2, seed=3, text_pairs=True, labels=("e", "n", "c")),
         "reg": dict(sparsity=0.05, seed=4, labels=())}

ITEMS = [
    ("s10", [("a charming and often affecting journey", None), ("dull", None)]),
    ("pairs", [("The cat sat on the mat.", "A cat was sitting on the mat."), ("yes", "no it is not at all")]),
    ("s50", [("the weights made the rope stretch over the pulley and then some more words", None)]),
    ("s0", [("one", None), ("two words", None), ("three words here", None)]),
    ("s10", [("the same task again, in a later item", None)]),
    ("reg", [("a regression row", None), ("another", None)]),
]


@pytest.fixture
def store(tiny_backbone, tmp_path) -> LocalMaskStore:
    store = LocalMaskStore(tmp_path)
    for task, kw in TASKS.items():
        store.put(task, make_bundle(tiny_backbone, task=task, **kw))
    return store


def per_task_logits(engine: Engine, items) -> list[torch.Tensor]:
    return [engine.logits(task, rows) for task, rows in items]


def _assert_all_close(got, want, rtol=1e-4, atol=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


def test_mixed_equals_per_task_on_cpu(tiny_backbone, store):
    engine = Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu")
    want = per_task_logits(engine, ITEMS)
    passes = []
    hook = tiny_backbone.model.register_forward_hook(lambda m, a, o: passes.append(1))
    got = engine.logits_mixed(ITEMS)
    hook.remove()
    assert len(passes) == 1  # 11 rows of 5 tasks: one forward pass
    _assert_all_close(got, want)
    assert [g.shape[1] for g in got] == [2, 3, 2, 2, 2, 1]
    # the masks matter: the same rows through the other masks (same head) give other logits
    rows = ITEMS[0][1]
    a, b, c = (engine.logits(t, rows) for t in ("s0", "s10", "s50"))
    assert (a - b).abs().max() > 1e-4 and (b - c).abs().max() > 1e-4


def test_mixed_chunks_by_max_batch_size(tiny_backbone, store):
    engine = Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu", max_batch_size=3)
    passes = []
    hook = tiny_backbone.model.register_forward_hook(lambda m, a, o: passes.append(1))
    got = engine.logits_mixed(ITEMS)
    hook.remove()
    assert len(passes) == 4  # ceil(11 rows / 3)
    _assert_all_close(got, per_task_logits(engine, ITEMS))


def test_mixed_preserves_order_and_repeated_tasks(tiny_backbone, store):
    engine = Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu")
    forward = engine.logits_mixed(ITEMS)
    backward = engine.logits_mixed(ITEMS[::-1])
    _assert_all_close(backward[::-1], forward)
    same = engine.logits_mixed([("s10", [("x y z", None)]), ("s10", [("x y z", None)]), ("s50", [("x y z", None)])])
    torch.testing.assert_close(same[0], same[1])
    assert (same[0] - same[2]).abs().max() > 1e-4


# ---- device tier, emulated on the CPU ----------------------------------------------------------

@pytest.mark.parametrize("path", [
    "reference",
    "gpu_complement",
    pytest.param("triton_fused", marks=pytest.mark.skipif(
        not (triton_masked.HAS_TRITON and INTERPRET), reason="needs triton and TRITON_INTERPRET=1 (no CUDA)")),
])
def test_device_tier_equals_cpu_path(tiny_backbone, tiny_backbone_dir, store, monkeypatch, path):
    want = per_task_logits(Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu"), ITEMS)
    calls = []
    for mod, fn in ((triton_masked, "segmented_masked_linear_triton"),
                    (sparse_complement, "segmented_complement_linear")):
        orig = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _o=orig, _n=fn, **k: calls.append(_n) or _o(*a, **k))
    metrics = Metrics()
    engine = Engine(load_backbone(tiny_backbone_dir), store, metrics, cache_bytes=1 << 30, device="cpu",
                    emulate_device_path=path)
    got = engine.logits_mixed(ITEMS)
    _assert_all_close(got, want)
    n_layers = len(engine.layers)
    expected = {"triton_fused": ["segmented_masked_linear_triton"] * n_layers,
                "gpu_complement": ["segmented_complement_linear"] * n_layers, "reference": []}[path]
    assert calls == expected  # one segmented call per masked layer for the whole mixed batch
    assert sorted(engine.device_cache.resident()) == sorted(TASKS)
    # host tier holds packed bits only for masks that prune something
    assert engine.cache.tasks["s0"].layers == {}
    states = engine.cache.tasks["s50"].layers.values()
    assert len(states) == len(engine.layers)
    assert all(st.path == "device" and st.packed.dtype == torch.uint8 for st in states)
    text = metrics.render().decode()
    assert 'supermask_device_swap_in_duration_seconds_count{task="s10"} 1.0' in text
    assert "supermask_device_resident_tasks 5.0" in text
    # single-task logits go through the same path
    torch.testing.assert_close(engine.logits("pairs", ITEMS[1][1]), want[1], rtol=1e-4, atol=1e-5)


def test_device_tier_with_fewer_slots_than_tasks(tiny_backbone, tiny_backbone_dir, store):
    want = per_task_logits(Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu"), ITEMS)
    engine = Engine(load_backbone(tiny_backbone_dir), store, Metrics(), cache_bytes=1 << 30, device="cpu",
                    device_slots=2, emulate_device_path="gpu_complement")
    passes = []
    engine.backbone.model.register_forward_hook(lambda m, a, o: passes.append(1))
    got = engine.logits_mixed(ITEMS)
    assert len(passes) == 3  # 5 tasks, at most 2 per pass
    _assert_all_close(got, want)
    assert len(engine.device_cache.resident()) == 2
    # replacing a task drops its slot; the next call swaps the new masks in
    engine.invalidate("reg")
    assert engine.device_cache.lookup("reg") is None and not engine.is_resident("reg")


def test_slot_left_from_before_a_host_eviction_is_not_served_after_a_replacement(tiny_backbone, tiny_backbone_dir,
                                                                                 store):
    """A task evicted from the host tier keeps its GPU slot; if its bundle is then replaced, the next request
    must run the new masks, not the slot's old ones with the new head."""
    mask_bytes = sum((q.numel() + 7) // 8 for q in tiny_backbone.qweight.values())
    one = mask_bytes + (2 * tiny_backbone.hidden_size + 2) * 4
    rows = [("a charming and affecting journey", None)]
    for t in ("a", "b", "c"):
        store.put(t, make_bundle(tiny_backbone, task=t, sparsity=0.3, seed=1))
    engine = Engine(load_backbone(tiny_backbone_dir), store, Metrics(), cache_bytes=2 * one + 200, device="cpu",
                    device_slots=2, emulate_device_path="reference")
    engine.logits("a", rows)
    engine.logits("b", rows)
    engine.warm("c")  # the host tier holds two tasks: "a" leaves it, its slot stays
    assert not engine.is_resident("a") and engine.device_cache.lookup("a") is not None
    store.put("a", make_bundle(tiny_backbone, task="a", sparsity=0.9, seed=1))  # same head, other masks
    want = Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu").logits("a", rows)
    torch.testing.assert_close(engine.logits("a", rows), want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not (triton_masked.HAS_TRITON and INTERPRET), reason="needs triton and TRITON_INTERPRET=1")
def test_matrix_without_a_csr_in_some_slot_runs_fused_instead_of_uncorrected(tiny_backbone, tiny_backbone_dir,
                                                                             store, monkeypatch):
    """The complement path subtracts nothing for a slot whose CSR was not built (None also means "nothing
    pruned"); the engine must then take the fused kernel for that matrix, never give the unmasked product."""
    want = per_task_logits(Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu"), ITEMS)
    engine = Engine(load_backbone(tiny_backbone_dir), store, Metrics(), cache_bytes=1 << 30, device="cpu",
                    emulate_device_path="gpu_complement")
    engine.device_cache.csr_max_sparsity = 0.15  # s0, s10, reg get CSRs; s50 and pairs do not
    calls = []
    for mod, fn in ((triton_masked, "segmented_masked_linear_triton"),
                    (sparse_complement, "segmented_complement_linear")):
        orig = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _o=orig, _n=fn, **k: calls.append(_n) or _o(*a, **k))
    _assert_all_close(engine.logits_mixed(ITEMS), want)
    assert set(calls) == {"segmented_masked_linear_triton"}  # every matrix of the mixed batch fell back
    calls.clear()
    _assert_all_close([engine.logits("s10", ITEMS[0][1])], [want[0]])
    assert set(calls) == {"segmented_complement_linear"}  # a batch whose slots all have CSRs keeps the path


def test_forced_complement_path_that_cannot_run_is_refused_at_start(tiny_backbone, store, monkeypatch):
    monkeypatch.setattr(sparse_complement, "complement_unsupported", lambda device, dtype: "NotImplementedError: no")
    with pytest.raises(ValueError, match="'gpu_complement' cannot run .*NotImplementedError: no"):
        Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu",
               emulate_device_path="gpu_complement")


def test_device_tier_checks_host_capacity(tiny_backbone, store):
    mask_bytes = sum((q.numel() + 7) // 8 for q in tiny_backbone.qweight.values())
    one = mask_bytes + (2 * tiny_backbone.hidden_size + 2) * 4
    with pytest.raises(ValueError, match=f"cache_bytes is {4 * one - 1}, device_slots 4 x {one} = {4 * one}"):
        Engine(tiny_backbone, store, Metrics(), cache_bytes=4 * one - 1, device="cpu", device_slots=4,
               emulate_device_path="reference")
    Engine(tiny_backbone, store, Metrics(), cache_bytes=4 * one, device="cpu", device_slots=4,
           emulate_device_path="reference")


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto", "cpu_dense").type == "cpu"  # a CPU kernel path is the off-switch for CUDA
    assert resolve_device("auto").type == ("cuda" if ON_CUDA else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not ON_CUDA:
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    else:
        with pytest.raises(ValueError, match="runs on the CPU"):
            resolve_device("cuda", "cpu_complement")


# ---- CUDA ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kernel_path", ["auto", "triton_fused", "gpu_complement", "reference"])
def test_cuda_engine_matches_cpu_engine(tiny_backbone, tiny_backbone_dir, store, kernel_path):
    if kernel_path == "triton_fused" and not triton_masked.HAS_TRITON:
        pytest.skip("needs triton")
    want = per_task_logits(Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu"), ITEMS)
    metrics = Metrics()
    engine = Engine(load_backbone(tiny_backbone_dir), store, metrics, cache_bytes=1 << 30, device="cuda",
                    device_slots=3, kernel_path=kernel_path)
    assert next(engine.backbone.model.parameters()).dtype == torch.float16
    got = engine.logits_mixed(ITEMS)
    for g, w in zip(got, want):  # float16 activations and weights
        assert g.device.type == "cpu" and g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * float(w.abs().max().clamp_min(1.0)))
    assert len(engine.device_cache.resident()) == 3
    assert all(st.packed.is_pinned() for st in engine.cache.tasks["s50"].layers.values())
    assert metrics.registry.get_sample_value("supermask_gpu_memory_allocated_bytes") > 0
    assert metrics.registry.get_sample_value("supermask_gpu_memory_reserved_bytes") > 0
    assert metrics.registry.get_sample_value("supermask_device_swap_in_duration_seconds_count", {"task": "s10"}) >= 1


def test_mixed_rows_of_very_different_lengths_run_in_separate_passes(tiny_backbone, store):
    """A 3-token row is not padded to a 100-token one: length classes split the pass, results unchanged."""
    store.put("long", make_bundle(tiny_backbone, task="long", sparsity=0.1, seed=7, max_seq_length=128))
    engine = Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu")
    items = [("s10", [("short one", None)]), ("long", [(" ".join(["word"] * 100), None), ("tiny", None)]),
             ("s50", [("also short", None)])]
    passes = []
    hook = tiny_backbone.model.register_forward_hook(lambda m, a, o: passes.append(tuple(o.last_hidden_state.shape[:2])))
    got = engine.logits_mixed(items)
    hook.remove()
    _assert_all_close(got, per_task_logits(engine, items))
    # the three short rows of three tasks share one pass; the ~100-token row gets its own
    assert sorted(passes) == [(1, 102), (3, 4)]  # [rows, tokens]: short rows padded to 4 tokens, not 102
