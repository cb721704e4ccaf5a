"""The hot tier's residency policy: pinned tasks are never evicted, a task is kept hot from its N-th request
within a window (before that its form serves its own pass only), and /healthz and the metrics report each tier's
tasks, bytes, budget and evictions."""

from __future__ import annotations

import pytest

from backbone import load_backbone
from service.engine import Engine
from service.metrics import Metrics
from service.tasks import LoadedTask, TaskCache
from tests.conftest import make_store

ROWS = [("a charming and often affecting journey", None), ("dull, flat and lifeless", None)]
TASKS = {"s10": 0.10, "s20": 0.2, "s15": 0.15}
#: a task's logits through its sparse form against its hot form: the same int8 products up to float rounding,
#: which can move a token's activation code by one step in a later layer
INT8_ATOL = 0.05


@pytest.fixture
def store(tiny_backbone, tmp_path):
    return make_store(tiny_backbone, tmp_path, TASKS)


@pytest.fixture(params=["torch", "onnxruntime"])
def runtime(request):
    from service.kernels import ort_encoder

    if request.param == "onnxruntime" and ort_encoder.unavailable_reason() is not None:
        pytest.skip(ort_encoder.unavailable_reason())
    return request.param


def _engine(backbone_dir, store, runtime, **kw) -> Engine:
    kw.setdefault("hot_promote_background", False)  # promotions on the request path: the assertions below see them
    return Engine(load_backbone(backbone_dir), store, Metrics(), cache_bytes=1 << 30, device="cpu", precision="int8",
                  runtime=runtime, **kw)


def _metric(engine: Engine, line: str) -> float:
    for row in engine.metrics.render().decode().splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    return 0.0


def test_a_pinned_task_is_never_evicted(tiny_backbone_dir, store, runtime):
    engine = _engine(tiny_backbone_dir, store, runtime, pinned_tasks=["s10"])
    engine.hot.capacity_bytes = engine.hot.task_bytes(engine.warm("s10"))  # room for one task
    want = {t: engine.logits(t, ROWS) for t in ("s20", "s10")}  # s20 hot, then evicted for the pinned s10
    assert list(engine.hot.tasks) == ["s10"] and engine.hot.evictions == 1
    for task in ("s20", "s15"):  # no room beside the pinned task: served through its sparse form
        got = engine.logits(task, ROWS)
        assert list(engine.hot.tasks) == ["s10"] and engine.tier(task) == "warm"
    assert engine.logits("s20", ROWS).allclose(want["s20"], atol=INT8_ATOL)  # sparse form against hot form
    assert _metric(engine, 'supermask_hot_admissions_total{decision="sparse"}') >= 2
    assert _metric(engine, 'supermask_hot_admissions_total{decision="pass_only"}') == 0
    assert _metric(engine, "supermask_hot_evictions_total") == 1
    status = engine.status()["tiers"]
    assert status["hot"]["pinned"] == ["s10"] and status["hot"]["tasks"] == 1 and status["hot"]["evictions"] == 1
    assert status["hot"]["bytes"] <= status["hot"]["capacity_bytes"]
    assert status["warm"]["tasks"] == 3 and status["warm"]["evictions"] == 0
    assert got.shape == (2, 2)


def test_a_task_is_kept_hot_from_its_second_request(tiny_backbone_dir, store, runtime):
    engine = _engine(tiny_backbone_dir, store, runtime, hot_promote_after=2)
    first = engine.logits("s10", ROWS)
    assert engine.tier("s10") == "warm"  # seen once: served through its sparse form
    assert _metric(engine, 'supermask_hot_admissions_total{decision="sparse"}') == 1
    second = engine.logits("s10", ROWS)
    assert engine.tier("s10") == "hot" and second.allclose(first, atol=INT8_ATOL)
    assert _metric(engine, 'supermask_hot_admissions_total{decision="promoted"}') == 1
    engine.logits("s20", ROWS)  # a one-off task evicts nothing
    assert list(engine.hot.tasks) == ["s10"] and engine.hot.evictions == 0


def test_task_cache_put_skips_pinned_entries():
    def entry(n: int) -> LoadedTask:
        return LoadedTask(header=None, layers={}, head_weight=None, head_bias=None, nbytes=n)

    cache = TaskCache(100)
    assert cache.put("a", entry(40), pinned={"a"}) == []
    assert cache.put("b", entry(40), pinned={"a"}) == []
    assert cache.put("c", entry(40), pinned={"a"}) == ["b"]  # the least recently used unpinned entry goes
    assert cache.put("d", entry(70), pinned={"a"}) is None  # 40 pinned + 70 > 100: not inserted, nothing evicted
    assert list(cache.tasks) == ["a", "c"] and cache.used_bytes == 80
    assert cache.put("e", entry(70), pinned={"a", "e"}) == ["c"]  # a pinned task goes in even over the budget
    assert list(cache.tasks) == ["a", "e"] and cache.used_bytes == 110


def test_settings_read_the_policy(monkeypatch):
    from service.settings import Settings

    monkeypatch.setenv("SUPERMASK_PINNED_TASKS", "SST-2, CoLA,")
    monkeypatch.setenv("SUPERMASK_HOT_PROMOTE_AFTER", "2")
    s = Settings()
    assert s.pinned_tasks == ["SST-2", "CoLA"] and s.hot_promote_after == 2
    monkeypatch.setenv("SUPERMASK_PINNED_TASKS", '["a.b_c"]')
    assert Settings().pinned_tasks == ["a.b_c"]
    monkeypatch.setenv("SUPERMASK_PINNED_TASKS", '["a b"]')  # not a task name: refused, not silently unpinned
    with pytest.raises(ValueError, match="not task names"):
        Settings()
    monkeypatch.setenv("SUPERMASK_PINNED_TASKS", "SST-2")
    monkeypatch.setenv("SUPERMASK_HOT_PROMOTE_AFTER", "0")
    with pytest.raises(ValueError):
        Settings()


def test_a_fanout_wider_than_the_hot_tier_does_not_thrash_it(tiny_backbone_dir, store, runtime):
    """Three tasks, room for two: the fan-out keeps two hot and serves the third through its sparse form; the same
    fan-out again evicts nothing and answers the same (before: every call evicted and rebuilt its own tasks)."""
    import asyncio

    from service.engine import PredictRequest

    engine = _engine(tiny_backbone_dir, store, runtime)
    engine.hot.capacity_bytes = 2 * engine.hot.task_bytes(engine.warm("s10"))
    reqs = [PredictRequest(t, tuple(ROWS)) for t in TASKS]
    first = asyncio.run(engine.predict_fanout_async(reqs))
    hot = list(engine.hot.tasks)
    assert len(hot) == 2 and engine.hot.evictions == 0
    again = asyncio.run(engine.predict_fanout_async(reqs))
    assert sorted(engine.hot.tasks) == sorted(hot) and engine.hot.evictions == 0
    assert again == first
    assert _metric(engine, 'supermask_hot_admissions_total{decision="sparse"}') == 2  # the third, each call
