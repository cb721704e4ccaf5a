"""service.hot_tier.HotCache's own rules, with a stand-in form: the promote-after window runs from a task's first
request, and a form being built when its task is dropped (replaced, deleted) serves its pass but is not kept."""

from __future__ import annotations

import threading
import time

import pytest

from service.hot_tier import HotCache
from service.tasks import LoadedTask


class Cache(HotCache):
    def __init__(self, gate: threading.Event | None = None, **kw):
        super().__init__(1000, **kw)
        self.gate, self.started, self.builds = gate, threading.Event(), 0

    def _promote(self, task, entry):
        self.builds += 1
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        return f"form of {task}", 100

    def task_bytes(self, entry):
        return 100


def _entry() -> LoadedTask:
    return LoadedTask(header=None, layers={}, head_weight=None, head_bias=None)


def test_the_promote_after_window_runs_from_the_first_request():
    cache = Cache(promote_after=3, window_s=0.3)
    entry = _entry()
    for _ in range(2):
        cache.get("t", entry)
        time.sleep(0.2)  # the third request comes 0.4 s after the first: the window has closed, counting restarts
    cache.get("t", entry)
    assert "t" not in cache.tasks and cache.builds == 3
    cache.get("t", entry)
    cache.get("t", entry)  # three within 0.3 s
    assert "t" in cache.tasks


def test_a_form_built_while_its_task_is_dropped_is_not_kept():
    gate = threading.Event()
    cache = Cache(gate=gate)
    entry = _entry()
    got = []
    th = threading.Thread(target=lambda: got.append(cache.get("t", entry)))
    th.start()
    assert cache.started.wait(10)
    cache.drop("t")  # deleted while its form is built
    gate.set()
    th.join(10)
    assert got == ["form of t"] and "t" not in cache.tasks and cache.used_bytes == 0
    assert cache.get("t", entry) == "form of t" and "t" in cache.tasks  # a later request promotes it afresh


def test_one_background_promotion_at_a_time_and_ties_do_not_displace():
    """With a fallback: a task that earns its place while another promotion runs in the background stays on its
    fallback (no second build starts); a task asked for as often as the one it would evict does not displace it."""
    gate = threading.Event()
    cache = Cache(gate=gate, background=True)
    cache.capacity_bytes = 100  # room for one task
    entry = _entry()
    fallback = lambda task, e: f"fallback of {task}"  # noqa: E731
    assert cache.get("a", entry, fallback=fallback) == "fallback of a"  # a's promotion starts, blocked on the gate
    assert cache.started.wait(10)
    assert cache.get("b", entry, fallback=fallback) == "fallback of b" and cache.builds == 1  # no second build
    gate.set()
    deadline = time.monotonic() + 10
    while "a" not in cache.tasks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(cache.tasks) == ["a"] and cache.get("a", entry) == "form of a"  # a: asked for twice now
    assert cache.get("b", entry, fallback=fallback) == "fallback of b"  # b: twice too, a tie: a stays
    assert cache.builds == 1 and list(cache.tasks) == ["a"]
    cache.get("b", entry, fallback=fallback)  # b asked for more often than a: its promotion starts
    deadline = time.monotonic() + 10
    while "b" not in cache.tasks and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(cache.tasks) == ["b"] and cache.builds == 2 and cache.evictions == 1


class Failing(Cache):
    def _promote(self, task, entry):
        self.builds += 1
        raise MemoryError("session build failed")


@pytest.mark.parametrize("background", [True, False])
def test_a_failed_promotion_falls_back_frees_its_slot_and_is_not_retried_within_the_window(background):
    cache = Failing(background=background, window_s=60)
    entry = _entry()
    fallback = lambda task, e: f"fallback of {task}"  # noqa: E731
    for _ in range(5):  # the first request starts the (failing) promotion; the rest are served by the fallback
        assert cache.get("t", entry, fallback=fallback) == "fallback of t"
        deadline = time.monotonic() + 10
        while cache._promoting and time.monotonic() < deadline:  # a background build lands
            time.sleep(0.01)
    assert cache.builds == 1 and not cache.tasks
    assert cache._background.acquire(blocking=False)  # the background slot was given back
    cache._background.release()
    with pytest.raises(MemoryError):  # without a fallback the error is the caller's
        Failing().get("u", entry)


def test_a_background_build_is_kept_only_if_still_admitted_when_it_lands():
    """The LRU changes while a form is built: the task it would evict now may be asked for more often."""
    gate = threading.Event()
    cache = Cache(gate=gate, background=True)
    cache.capacity_bytes = 200  # room for two tasks
    entry = _entry()
    fallback = lambda task, e: f"fallback of {task}"  # noqa: E731
    gate.set()
    cache.get("a", entry)
    for _ in range(10):
        cache.get("b", entry)
    assert list(cache.tasks) == ["a", "b"]
    gate.clear()
    cache.started.clear()
    for _ in range(2):
        cache.get("c", entry, fallback=fallback)  # c: twice, a: once -> admitted against a; built in the background
    assert cache.started.wait(10)
    for _ in range(3):
        cache.get("a", entry)  # a is now asked for more often than c, and b more than either
    gate.set()
    deadline = time.monotonic() + 10
    while cache._promoting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(cache.tasks) == ["a", "b"] and cache.evictions == 0  # c is not kept: it would evict a better task
    assert cache.builds == 3 and not cache._failed  # c's build ran and succeeded
