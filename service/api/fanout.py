"""Fan-out: ``POST /v1/predict`` answers every named task (or every stored one) for every input, from ONE
call of the engine's mixed-task forward (:meth:`service.engine.Engine.predict_fanout_async`): the rows of all
tasks share each pass, which no one-model-per-task server can do."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from mask_store.errors import MaskStoreError
from mask_store.local import check_task_name
from service.api.deps import State
from service.api.inputs import request_rows
from service.api.limits import check_reply, check_work, predict_reply_bytes
from service.api.openapi import errors
from service.api.schemas import FanOutIn, FanOutPublic, PredictPublic
from service.engine import PredictOptions, PredictRequest
from service.errors import InputInvalid

log = logging.getLogger(__name__)
router = APIRouter()


def fanout_tasks(state, tasks: list[str] | str, pairs: bool) -> list[str]:
    """The task names a fan-out answers: ``tasks`` as given (checked: named, distinct, at most the limit), or
    for ``"*"`` every stored task that takes these inputs (pairs or single texts), by name.

    Raises:
        InputInvalid: no task, a repeated name, more than ``max_fanout_tasks``, or ``"*"`` matching none.
        InvalidTaskName: a malformed name.
    """
    limit = state.settings.max_fanout_tasks
    if tasks == "*":
        names = []
        for t in state.store.tasks():
            try:
                if state.engine.header(t).text_pairs == pairs:
                    names.append(t)
            except MaskStoreError as exc:  # unreadable or deleted since the listing: as the task list does
                log.warning("task %s left out of the fan-out: %s", t, exc)
        if not names:
            raise InputInvalid(f"no stored task takes {'sentence pairs' if pairs else 'single texts'}")
        if len(names) > limit:
            raise InputInvalid(f'"*" stands for {len(names)} tasks, more than the fan-out limit of {limit} '
                               f"(SUPERMASK_MAX_FANOUT_TASKS); name the tasks")
        return names
    if not tasks:
        raise InputInvalid("tasks is empty: name at least one task, or send \"*\"")
    if len(tasks) > limit:
        raise InputInvalid(f"{len(tasks)} tasks, more than the fan-out limit of {limit} (SUPERMASK_MAX_FANOUT_TASKS)")
    seen = set()
    for t in tasks:
        check_task_name(t)
        if t in seen:
            raise InputInvalid(f"task {t!r} is named twice in tasks")
        seen.add(t)
    return list(tasks)


@router.post("/v1/predict", response_model=FanOutPublic, response_model_exclude_none=True,
             responses=errors(404, 409, 413, 422, 429, 500, 503, 507))
async def predict_fanout(body: FanOutIn, state: State) -> FanOutPublic:
    """Predict every input with every task of ``tasks`` (a list, or ``"*"``: every stored task that takes
    these inputs), in one mixed-task forward call. Options apply to every task; a regression task answers
    its value, ignoring the classification-only ones (top_k, raw_scores, function_to_apply).

    Refused with 422 before any work when inputs x tasks exceed ``SUPERMASK_MAX_WORK_ROWS`` (``WorkTooLarge``)
    or the reply would exceed ``SUPERMASK_MAX_RESPONSE_BYTES`` (``ReplyTooLarge``)."""
    s = state.settings
    rows = request_rows(body, s.max_inputs_per_request, s.max_input_chars)
    options = PredictOptions(**body.option_kwargs())
    if body.tasks != "*":
        check_work(len(rows), len(body.tasks), s.max_work_rows)  # before any store I/O

    def requests() -> list[PredictRequest]:  # store I/O (listing, headers): in a worker thread
        reqs, reply = [], len('{"results":[]}')
        names = fanout_tasks(state, body.tasks, pairs=rows[0][1] is not None)
        check_work(len(rows), len(names), s.max_work_rows)
        for t in names:
            header = state.engine.header(t)
            regression = header.problem_type == "regression"
            reqs.append(PredictRequest(task=t, inputs=rows, options=options.for_regression() if regression
                                       else options))
            reply += predict_reply_bytes(t, header, len(rows), options.ranked, options.top_k)
        check_reply(reply, s.max_response_bytes, f"this fan-out over {len(names)} tasks")  # before any work
        return reqs

    reqs = await run_in_threadpool(requests)
    outs = await state.engine.predict_fanout_async(reqs)
    return FanOutPublic(results=[PredictPublic(task=r.task, predictions=p) for r, p in zip(reqs, outs)])
