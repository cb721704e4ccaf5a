"""Dynamic cross-task batching: gathering, routing of results and errors, and the served answers."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from service.batcher import MicroBatcher
from tests.conftest import make_bundle

AUTH = {"Authorization": "Bearer t0ken"}


class FakeForward:
    """Stands in for ``Engine.logits_mixed``: row j of task t gives ``[len(t), j]``; task "bad" raises."""

    def __init__(self):
        self.calls: list[list[tuple[str, int]]] = []

    def __call__(self, items):
        self.calls.append([(task, len(rows)) for task, rows in items])
        if any(task == "bad" for task, _ in items):
            raise KeyError("bad")
        return [torch.tensor([[float(len(task)), float(j)] for j in range(len(rows))]) for task, rows in items]


def _rows(n: int):
    return [(f"text {i}", None) for i in range(n)]


def test_concurrent_requests_of_several_tasks_share_one_forward_and_get_their_own_rows():
    fwd = FakeForward()

    async def main():
        b = MicroBatcher(fwd, max_rows=64, max_wait_s=0.05)
        outs = await asyncio.gather(b.submit("a", _rows(2)), b.submit("bbb", _rows(3)), b.submit("a", _rows(1)))
        await b.close()
        return outs

    outs = asyncio.run(main())
    assert fwd.calls == [[("a", 2), ("bbb", 3), ("a", 1)]]  # one mixed forward for the three requests
    assert outs[0].tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert outs[1].tolist() == [[3.0, 0.0], [3.0, 1.0], [3.0, 2.0]]
    assert outs[2].tolist() == [[1.0, 0.0]]


def test_a_full_batch_does_not_wait_rows_are_capped_and_the_backlog_runs_next_without_a_window():
    fwd = FakeForward()

    async def main():
        b = MicroBatcher(fwd, max_rows=4, max_wait_s=30.0)  # a window no test could wait out
        outs = await asyncio.wait_for(asyncio.gather(*(b.submit("t", _rows(2)) for _ in range(3))), timeout=5)
        await b.close()
        return outs

    outs = asyncio.run(main())
    # the first two filled a batch and ran at once; the third, queued meanwhile, ran right after it
    assert fwd.calls == [[("t", 2), ("t", 2)], [("t", 2)]]
    assert [o.shape[0] for o in outs] == [2, 2, 2]


def test_without_a_window_a_lone_request_runs_at_once_and_arrivals_during_a_pass_share_the_next():
    import threading

    started, release = threading.Event(), threading.Event()

    class SlowFirst(FakeForward):
        def __call__(self, items):
            if not self.calls:
                started.set()
                assert release.wait(10)
            return super().__call__(items)

    fwd = SlowFirst()

    async def main():
        b = MicroBatcher(fwd, max_rows=64, max_wait_s=0.0)
        first = asyncio.ensure_future(b.submit("a", _rows(1)))
        while not started.is_set():  # the lone request started its pass without waiting for company
            await asyncio.sleep(0.001)
        later = [asyncio.ensure_future(b.submit(t, _rows(1))) for t in ("b", "cc", "b")]
        await asyncio.sleep(0.05)  # all three are queued behind the running pass
        release.set()
        outs = await asyncio.wait_for(asyncio.gather(first, *later), timeout=5)
        await b.close()
        return outs

    asyncio.run(main())
    assert fwd.calls == [[("a", 1)], [("b", 1), ("cc", 1), ("b", 1)]]


def test_errors_stay_with_the_request_that_caused_them():
    fwd = FakeForward()

    async def main():
        b = MicroBatcher(fwd, max_rows=64, max_wait_s=0.05)
        outs = await asyncio.gather(b.submit("good", _rows(2)), b.submit("bad", _rows(1)),
                                    return_exceptions=True)
        await b.close()
        return outs

    good, bad = asyncio.run(main())
    assert isinstance(bad, KeyError)
    assert good.tolist() == [[4.0, 0.0], [4.0, 1.0]]
    assert fwd.calls[0] == [("good", 2), ("bad", 1)] and sorted(fwd.calls[1:]) == [[("bad", 1)], [("good", 2)]]


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError):
        MicroBatcher(FakeForward(), max_rows=0, max_wait_s=0.01)
    with pytest.raises(ValueError):
        MicroBatcher(FakeForward(), max_rows=4, max_wait_s=-1)


def test_server_batches_concurrent_requests_across_tasks_with_the_same_answers(tiny_backbone, tmp_path):
    from service.api.main import create_app
    from service.engine import PredictRequest
    from service.settings import Settings

    settings = Settings(store_dir=tmp_path / "store", examples_dir=None, admin_token="t0ken", batch_wait_ms=200)
    app = create_app(settings, backbone=tiny_backbone)
    state = app.state.supermask
    for i, task in enumerate(("one", "two", "three")):
        state.store.put(task, make_bundle(tiny_backbone, task, sparsity=0.05 * (i + 1), seed=i))
    texts = {"one": ["a lovely film", "dull"], "two": ["an utterly dreadful and far too long film"],
             "three": ["fine", "not fine at all", "so so"]}

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            rs = await asyncio.gather(*(client.post(f"/v1/tasks/{t}/predict", json={"inputs": x})
                                        for t, x in texts.items()))
            bad = await client.post("/v1/tasks/nope/predict", json={"inputs": ["x"]})
        await state.engine.batcher.close()
        return rs, bad

    responses, bad = asyncio.run(main())
    assert bad.status_code == 404
    assert state.engine.batcher.batches == 1  # three requests of three tasks, one gathered forward call
    for (task, inputs), r in zip(texts.items(), responses):
        assert r.status_code == 200, r.text
        # the same answers as the task's own forward pass, without batching
        alone = state.engine.predict(PredictRequest(task, tuple((t, None) for t in inputs)))
        got = r.json()["predictions"]
        assert [p["label"] for p in got] == [p["label"] for p in alone]
        for p, q in zip(got, alone):
            assert p["scores"] == pytest.approx(q["scores"], abs=1e-4)
    # the batched requests were counted like unbatched ones (plus the direct predict calls above)
    reg = state.metrics.registry
    assert reg.get_sample_value("supermask_requests_total", {"task": "three", "outcome": "ok"}) == 2
    assert reg.get_sample_value("supermask_request_duration_seconds_count", {"task": "two"}) == 2
    assert reg.get_sample_value("supermask_requests_total", {"task": "_unknown", "outcome": "error"}) == 1


def test_a_task_replaced_while_its_request_waits_is_answered_by_one_bundle(tiny_backbone, tmp_path):
    """The request is prepared with the old bundle; the answer must be decoded with the bundle the forward used."""
    from service.api.main import create_app
    from service.engine import PredictRequest
    from service.settings import Settings

    settings = Settings(store_dir=tmp_path / "store", examples_dir=None, admin_token="t0ken", batch_wait_ms=5)
    state = create_app(settings, backbone=tiny_backbone).state.supermask
    state.store.put("toy", make_bundle(tiny_backbone, seed=1))
    state.engine.warm("toy")
    prepare = state.engine.prepare

    def prepare_then_replace(req):  # a concurrent upload lands between the request's prepare and its pass
        prepared = prepare(req)
        state.store.put("toy", make_bundle(tiny_backbone, seed=2, labels=("a", "b", "c")))
        return prepared

    state.engine.prepare = prepare_then_replace
    req = PredictRequest("toy", (("a lovely film", None), ("dull", None)))

    async def main():
        try:
            return await state.engine.predict_async(req)
        finally:
            await state.engine.batcher.close()

    preds = asyncio.run(main())
    assert [set(p["scores"]) for p in preds] == [{"a", "b", "c"}] * 2
    state.engine.prepare = prepare
    assert preds == state.engine.predict(req)
