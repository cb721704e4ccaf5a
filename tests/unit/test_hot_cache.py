"""service.hot_tier.HotCache's own rules, with a stand-in form: the promote-after window runs from a task's first
request, and a form being built when its task is dropped (replaced, deleted) serves its pass but is not kept."""

from __future__ import annotations

import threading
import time

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
