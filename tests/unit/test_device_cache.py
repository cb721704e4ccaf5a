"""Device tier of the task cache: slot LRU, pinned tasks, exact swap-in contents, invalidation, metrics (on the CPU)."""

from __future__ import annotations

import pytest
import torch

from service.device_cache import DeviceSlotsExhausted, DeviceTaskCache
from service.kernels.packing import pack_bits, unpack_bits
from service.kernels.triton_masked import relayout_mask, relayout_mask_inverse
from service.metrics import Metrics

SHAPES = {"l0": (5, 40), "l1": (8, 16), "l2": (3, 33)}  # [out, in]: ragged words, odd bit counts


def _masks(seed: int, sparsity: float = 0.3) -> dict[str, torch.Tensor]:
    """Packed uint8 masks per module, as the host tier holds them."""
    g = torch.Generator().manual_seed(seed)
    return {n: pack_bits(torch.rand(shape, generator=g) >= sparsity) for n, shape in SHAPES.items()}


def _swap_ins(metrics: Metrics, task: str) -> float:
    v = metrics.registry.get_sample_value("supermask_device_swap_in_duration_seconds_count", {"task": task})
    return 0.0 if v is None else v


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def cache(metrics) -> DeviceTaskCache:
    return DeviceTaskCache(SHAPES, slots=2, device="cpu", metrics=metrics)


def test_slot_tensors_are_preallocated(cache):
    for name, (out, in_) in SHAPES.items():
        assert cache.words[name].shape == (2, out, (in_ + 31) // 32)
        assert cache.words[name].dtype == torch.int32
    assert cache.nbytes() == sum(w.numel() * 4 for w in cache.words.values())
    with pytest.raises(ValueError, match="> 0"):
        DeviceTaskCache(SHAPES, slots=0, device="cpu")


def test_lru_eviction_order(cache, metrics):
    sa, sb = cache.acquire("a", _masks(1)), cache.acquire("b", _masks(2))
    assert {sa, sb} == {0, 1}
    assert cache.acquire("a", _masks(1)) == sa  # hit: same slot, no swap-in, a becomes most recent
    assert _swap_ins(metrics, "a") == 1.0
    assert cache.resident() == ["b", "a"]
    sc = cache.acquire("c", _masks(3))  # evicts b, the least recently used
    assert sc == sb
    assert cache.lookup("b") is None and cache.lookup("a") == sa
    assert cache.resident() == ["a", "c"]
    assert cache.acquire("b", _masks(2)) == sa  # now a is the least recently used
    assert cache.resident() == ["c", "b"]
    assert _swap_ins(metrics, "b") == 2.0
    assert metrics.registry.get_sample_value("supermask_device_resident_tasks") == 2.0


def test_tasks_in_use_are_not_evicted(cache):
    cache.acquire("a", _masks(1))
    sb = cache.acquire("b", _masks(2))
    # a is the LRU, but the batch being built uses it: b is evicted instead
    assert cache.acquire("c", _masks(3), in_use={"a", "c"}) == sb
    assert cache.resident() == ["a", "c"]
    with pytest.raises(DeviceSlotsExhausted, match="all 2 device mask slots"):
        cache.acquire("d", _masks(4), in_use={"a", "c", "d"})
    assert cache.resident() == ["a", "c"]  # nothing changed


def test_swap_in_writes_exactly_the_relayout(cache):
    ma, mb = _masks(1, 0.1), _masks(2, 0.6)
    slot = cache.acquire("a", ma)
    for name, (out, in_) in SHAPES.items():
        assert torch.equal(cache.words[name][slot], relayout_mask(ma[name], out, in_))
        assert torch.equal(relayout_mask_inverse(cache.words[name][slot], out, in_), unpack_bits(ma[name], (out, in_)))
    cache.acquire("x", _masks(5))
    cache.acquire("x", _masks(5))
    other = cache.acquire("b", mb)  # evicts a: b's bits overwrite a's slot completely
    assert other == slot
    for name, (out, in_) in SHAPES.items():
        assert torch.equal(cache.words[name][slot], relayout_mask(mb[name], out, in_))
        assert not torch.equal(cache.words[name][slot], relayout_mask(ma[name], out, in_))


def test_module_without_mask_keeps_every_weight(cache):
    masks = _masks(1)
    del masks["l2"]
    slot = cache.acquire("a", masks)
    out, in_ = SHAPES["l2"]
    assert relayout_mask_inverse(cache.words["l2"][slot], out, in_).all()
    all_ones = pack_bits(torch.ones(out, in_, dtype=torch.bool))
    assert torch.equal(cache.words["l2"][slot], relayout_mask(all_ones, out, in_))
    with pytest.raises(ValueError, match="does not have"):
        cache.acquire("b", {"nope": masks["l0"]})


def test_invalidate_frees_the_slot(cache, metrics):
    sa = cache.acquire("a", _masks(1))
    sb = cache.acquire("b", _masks(2))
    assert cache.invalidate("a") is True
    assert cache.lookup("a") is None and cache.free == [sa]
    assert metrics.registry.get_sample_value("supermask_device_resident_tasks") == 1.0
    assert cache.invalidate("a") is False
    assert cache.acquire("c", _masks(3)) == sa  # the free slot, no eviction
    assert cache.lookup("b") == sb
    assert cache.release("b") is True and cache.resident() == ["c"]
    cache.acquire("a", _masks(1))  # re-acquired after invalidation: swapped in again
    assert _swap_ins(metrics, "a") == 2.0


def test_failed_swap_in_leaves_the_slot_free(cache):
    bad = _masks(1)
    bad["l1"] = bad["l1"][:-1]  # one byte short
    with pytest.raises(ValueError, match="packed bytes"):
        cache.acquire("a", bad)
    assert cache.lookup("a") is None and sorted(cache.free) == [0, 1]


def test_pruned_csr_per_slot_when_weights_given():
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(shape, generator=g) for n, shape in SHAPES.items()}
    cache = DeviceTaskCache(SHAPES, slots=2, device="cpu", weights=weights)
    masks = _masks(1)
    slot = cache.acquire("a", masks)
    for name, shape in SHAPES.items():
        keep = unpack_bits(masks[name], shape)
        assert torch.equal(cache.pruned[name][slot].to_dense(), torch.where(keep, 0.0, weights[name]))
    cache.invalidate("a")
    assert all(cache.pruned[name][slot] is None for name in SHAPES)


def test_csr_only_for_matrices_the_automatic_rule_can_run_on_the_complement_path():
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(shape, generator=g) for n, shape in SHAPES.items()}
    cache = DeviceTaskCache(SHAPES, slots=2, device="cpu", weights=weights, csr_max_sparsity=0.02)
    masks = _masks(1)
    # l0 is lightly pruned (per the header), l1 heavily; l2 has no entry in the sparsity map: not built
    slot = cache.acquire("a", masks, sparsity={"l0": 0.01, "l1": 0.3})
    assert cache.pruned["l0"][slot] is not None and cache.pruned["l1"][slot] is None and cache.pruned["l2"][slot] is None
    assert cache.has_pruned("l0", [slot]) and not cache.has_pruned("l1", [slot]) and not cache.has_pruned("l2", [slot])
    # a module without a mask keeps every weight: nothing to subtract, ready as it is
    other = cache.acquire("b", {"l0": masks["l0"]}, sparsity={"l0": 0.5})
    assert cache.has_pruned("l1", [other]) and not cache.has_pruned("l0", [other])
    assert not cache.has_pruned("l0", [slot, other]) and cache.has_pruned("l0", [slot])
    cache.invalidate("a")  # a freed slot is never ready: the next task's CSRs are not built yet
    assert not cache.has_pruned("l0", [slot])
    # without a threshold (forced gpu_complement) or without sparsities, every CSR is built
    full = DeviceTaskCache(SHAPES, slots=1, device="cpu", weights=weights)
    s0 = full.acquire("a", masks, sparsity={"l0": 0.9, "l1": 0.9, "l2": 0.9})
    assert all(full.has_pruned(n, [s0]) for n in SHAPES)
    # without weights no CSR is ever ready (complement path unavailable)
    bare = DeviceTaskCache(SHAPES, slots=1, device="cpu")
    assert not bare.has_pruned("l1", [bare.acquire("a", {"l0": masks["l0"]})])


def test_swap_in_duration_metric_and_gpu_gauges(cache, metrics):
    cache.acquire("a", _masks(1))
    assert cache.last_swap_in_seconds > 0
    text = metrics.render().decode()
    assert 'supermask_device_swap_in_duration_seconds_count{task="a"} 1.0' in text
    assert "supermask_device_resident_tasks 1.0" in text
    assert "supermask_gpu_memory_allocated_bytes" in text and "supermask_gpu_memory_reserved_bytes" in text
    if not torch.cuda.is_available():
        assert metrics.registry.get_sample_value("supermask_gpu_memory_allocated_bytes") == 0.0
        assert metrics.registry.get_sample_value("supermask_gpu_memory_reserved_bytes") == 0.0
