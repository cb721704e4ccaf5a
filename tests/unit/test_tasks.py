"""Task table: single-flight loading, loads outside the pass lock, failures shared by the waiters."""

from __future__ import annotations

import threading

import pytest

from mask_store.errors import TaskNotFound
from mask_store.local import LocalMaskStore
from service.engine import Engine
from service.metrics import Metrics
from tests.conftest import make_bundle

ROWS = [("a charming and often affecting journey", None)]


def _counting_builder(engine: Engine, gate: threading.Event | None = None):
    """Wrap the engine's builder: count builds per task; block builds of 'cold' until ``gate`` is set."""
    builds: list[str] = []
    real = engine.builder.build

    def build(bundle):
        builds.append(bundle.header.task)
        if gate is not None and bundle.header.task == "cold":
            assert gate.wait(30), "test gate never opened"
        return real(bundle)

    engine.builder.build = build
    return builds


def test_concurrent_requests_for_one_cold_task_load_it_once(tiny_backbone, tmp_path):
    store = LocalMaskStore(tmp_path)
    store.put("cold", make_bundle(tiny_backbone, task="cold", seed=1))
    engine = Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu")
    gate = threading.Event()
    builds = _counting_builder(engine, gate)
    results, errors = [], []

    def ask():
        try:
            results.append(engine.logits("cold", ROWS))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    while not builds:  # the first load has started and is held at the gate
        threading.Event().wait(0.01)
    gate.set()
    for t in threads:
        t.join(30)
    assert not errors
    assert builds == ["cold"]  # eight requests, one load
    assert len(results) == 8 and all((r == results[0]).all() for r in results)


def test_a_cold_load_does_not_hold_up_a_resident_task(tiny_backbone, tmp_path):
    store = LocalMaskStore(tmp_path)
    store.put("cold", make_bundle(tiny_backbone, task="cold", seed=1))
    store.put("hot", make_bundle(tiny_backbone, task="hot", seed=2))
    engine = Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu")
    want = engine.logits("hot", ROWS)
    gate = threading.Event()
    builds = _counting_builder(engine, gate)
    loader = threading.Thread(target=engine.logits, args=("cold", ROWS))
    loader.start()
    try:
        while not builds:
            threading.Event().wait(0.01)
        # "cold" is being built (held at the gate): a request of the resident task is answered meanwhile
        got = engine.logits("hot", ROWS)
        assert loader.is_alive() and not engine.is_resident("cold")
        assert (got == want).all()
    finally:
        gate.set()
        loader.join(30)
    assert engine.is_resident("cold")


def test_every_waiter_gets_the_loads_error_and_nothing_stays_pending(tiny_backbone, tmp_path):
    engine = Engine(tiny_backbone, LocalMaskStore(tmp_path), Metrics(), cache_bytes=1 << 30, device="cpu")
    for _ in range(2):  # a failed load leaves no flight behind: the second try loads (and fails) again
        with pytest.raises(TaskNotFound):
            engine.logits("absent", ROWS)
    assert engine.tasks._loading == {}
