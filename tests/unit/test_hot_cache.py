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
