"""The metrics' task label is bounded (SUPERMASK_METRICS_MAX_TASK_LABELS): past the bound, tasks are counted under
task="_other", and a deleted task frees its label."""

from __future__ import annotations

import pytest

from service.metrics import OTHER_TASK, Metrics


def _series(m: Metrics, name: str) -> dict[str, float]:
    out = {}
    for line in m.render().decode().splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            out[labels] = float(value)
    return out


def test_tasks_beyond_the_bound_share_one_label_and_a_deleted_task_frees_its_own():
    m = Metrics(max_task_labels=2)
    for task in ("a", "b", "c", "d"):
        m.requests.labels(m.task(task), "ok").inc()
        m.set_task_bytes(task, 100)
    got = _series(m, "supermask_requests_total")
    assert got == {'supermask_requests_total{outcome="ok",task="a"}': 1.0,
                   'supermask_requests_total{outcome="ok",task="b"}': 1.0,
                   f'supermask_requests_total{{outcome="ok",task="{OTHER_TASK}"}}': 2.0}
    assert sorted(_series(m, "supermask_resident_task_bytes")) == [
        'supermask_resident_task_bytes{task="a"}', 'supermask_resident_task_bytes{task="b"}']
    m.drop_task_bytes("c")  # never had a series: no error
    m.forget("a")
    assert m.task("e") == "e" and m.task("f") == OTHER_TASK  # a's label went to the next new task
    assert Metrics().task("x" * 50) == "x" * 50  # unbounded by default (library use)
    with pytest.raises(ValueError):
        Metrics(max_task_labels=-1)
