"""Open Inference Protocol v2 (KServe / Triton "predict protocol v2", REST), beside the ``/v1`` routes.

Every stored task is a model named by its task name, version "1":

* ``GET /v2`` — server metadata; ``GET /v2/health/live``, ``GET /v2/health/ready``;
* ``GET /v2/models/{task}`` — model metadata: inputs ``text`` (and ``text_pair`` for pair tasks), BYTES,
  shape ``[-1]``; outputs ``label`` (BYTES ``[-1]``, classification only), ``score`` (FP32 ``[-1]``: the
  label's softmax probability, or a regression task's value) and ``logits`` (FP32 ``[-1, num_outputs]``);
* ``GET /v2/models/{task}/ready`` — 200 ``{"name", "ready": true}`` for a stored task (a cold one is loaded on
  its first inference);
* ``POST /v2/models/{task}/infer`` — the inference request: JSON tensors, or Triton's binary tensor data
  extension (``Inference-Header-Content-Length``: a JSON header, then each input with
  ``parameters.binary_data_size`` as raw bytes, BYTES elements as a 4-byte little-endian length and the
  UTF-8 text), which ``tritonclient`` uses by default. Outputs are answered as JSON tensors (the ones named
  in ``outputs``, else all); ``binary_data`` requests are honoured as JSON, which every client reads.
  The same ``/versions/1/`` paths answer too.

The wire format of the tensors (request parsing, the binary extension, output tensors from a pass's logits) is
:mod:`service.api.oip_tensors`; this module holds the routes and the model metadata.

Errors are OIP's ``{"error": "<message>"}`` with the status of the one table in
:mod:`service.api.errors`, whose handlers answer every path under ``/v2`` in that shape (the routes here just
raise). Specification: https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/
(REST), Triton's ``binary_data`` extension: https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from mask_store.format import BundleHeader
from service import __version__
from service.api.deps import State
from service.api.inputs import request_rows
from service.api.limits import check_reply, v2_reply_bytes
from service.api.oip_tensors import infer_outputs, parse_infer_request, pass_logits, requested_outputs
from service.api.openapi import NON_BLANK, TaskName, errors
from service.api.schemas import PredictIn
from service.engine import PredictOptions, PredictRequest
from service.errors import InputInvalid

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])

VERSION = "1"
PLATFORM = "supermask"


class OipReady(BaseModel):
    ready: bool


Version = Annotated[str, Path(description=f'The model version: every task has the one version "{VERSION}".',
                              json_schema_extra={"enum": [VERSION]})]


def _check_version(version: str | None) -> None:
    if version is not None and version != VERSION:
        raise InputInvalid(f"model version {version!r} does not exist: every task has the one version {VERSION!r}")


def _outputs(header: BundleHeader) -> list[dict]:
    out = [] if header.problem_type == "regression" else [{"name": "label", "datatype": "BYTES", "shape": [-1]}]
    return out + [{"name": "score", "datatype": "FP32", "shape": [-1]},
                  {"name": "logits", "datatype": "FP32", "shape": [-1, header.num_outputs]}]


def model_metadata(task: str, header: BundleHeader) -> dict:
    """OIP ``$metadata_model_response`` of a task."""
    inputs = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    if header.text_pairs:
        inputs.append({"name": "text_pair", "datatype": "BYTES", "shape": [-1]})
    return {"name": task, "versions": [VERSION], "platform": PLATFORM, "inputs": inputs, "outputs": _outputs(header),
            "parameters": {"problem_type": header.problem_type, "labels": json.dumps(header.labels),
                           "max_seq_length": header.max_seq_length}}


@router.get("")
async def server_metadata() -> dict:
    return {"name": "supermask", "version": __version__,
            "extensions": ["binary_tensor_data", "model_configuration", "model_repository"]}


@router.get("/health/live")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", responses={200: {"model": OipReady}, 400: {"model": OipReady,
                                                                        "description": "starting or shutting down"}})
async def ready(request: Request) -> Any:
    """200 ``{"ready": true}`` once start-up is complete (as ``/readyz``); else 400 ``{"ready": false}`` (OIP: a
    4xx status means false)."""
    if getattr(request.app.state, "ready", False):
        return {"ready": True}
    return JSONResponse({"ready": False}, status_code=400)


_META_ERRORS = errors(404, 422, 500, 503, oip=True)
_INFER_ERRORS = errors(404, 409, 413, 422, 429, 500, 503, 507, oip=True)


@router.get("/models/{task}", responses=_META_ERRORS)
async def metadata(task: TaskName, state: State) -> Any:
    """OIP model metadata: the task's inputs and outputs as tensors."""
    return await metadata_version(task, state, VERSION)


@router.get("/models/{task}/versions/{version}", responses=_META_ERRORS)
async def metadata_version(task: TaskName, state: State, version: Version) -> Any:
    """:func:`metadata` of the task's one version."""
    _check_version(version)
    return model_metadata(task, await run_in_threadpool(state.engine.header, task))


@router.get("/models/{task}/ready", responses=_META_ERRORS)
async def model_ready(task: TaskName, state: State) -> Any:
    """200 ``{"name", "ready": true}`` for a stored task."""
    return await model_ready_version(task, state, VERSION)


@router.get("/models/{task}/versions/{version}/ready", responses=_META_ERRORS)
async def model_ready_version(task: TaskName, state: State, version: Version) -> Any:
    """:func:`model_ready` of the task's one version."""
    _check_version(version)
    await run_in_threadpool(state.engine.header, task)  # TaskNotFound: 404
    return {"name": task, "ready": True}


INFER_REQUEST_SCHEMA = {
    "type": "object", "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": {
            "type": "object", "required": ["name", "datatype", "shape"],
            "properties": {"name": {"type": "string", "enum": ["text", "text_pair"]},
                           "datatype": {"type": "string", "enum": ["BYTES"]},
                           "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                           "data": {"type": "array", "items": {"type": "string", "minLength": 1,
                                                               "pattern": NON_BLANK}},
                           "parameters": {"type": "object"}}}},
        "outputs": {"type": "array", "maxItems": 3, "uniqueItems": True, "items": {
            "type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "enum": ["label", "score", "logits"]}, "parameters": {"type": "object"}}}},
    },
    "example": {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                            "data": ["a charming and often affecting journey"]}]},
}
"""OpenAPI schema of the JSON inference request (the body is parsed here, to take the binary extension too)."""


_INFER_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": INFER_REQUEST_SCHEMA}}}}


@router.post("/models/{task}/infer", openapi_extra=_INFER_BODY, responses=_INFER_ERRORS)
async def infer(task: TaskName, request: Request, state: State) -> Any:
    """OIP inference: BYTES ``text`` (and ``text_pair``) in; ``label``, ``score``, ``logits`` out."""
    return await infer_version(task, request, state, VERSION)


@router.post("/models/{task}/versions/{version}/infer", openapi_extra=_INFER_BODY, responses=_INFER_ERRORS)
async def infer_version(task: TaskName, request: Request, state: State, version: Version) -> Any:
    """:func:`infer` of the task's one version, "1"."""
    s = state.settings
    _check_version(version)
    header = await run_in_threadpool(state.engine.header, task)  # store I/O off the event loop
    body = await request.body()  # bounded by SUPERMASK_MAX_REQUEST_BYTES (service.api.limits)
    doc, tensors = parse_infer_request(body, request.headers.get("inference-header-content-length"))
    expected = {"text", "text_pair"} if header.text_pairs else {"text"}
    unknown = sorted(set(tensors) - expected)
    if unknown or "text" not in tensors or (header.text_pairs and "text_pair" not in tensors):
        raise InputInvalid(f"task {task!r} takes the BYTES input(s) {sorted(expected)}; got {sorted(tensors)}")
    texts = tensors["text"]
    if header.text_pairs:
        if len(tensors["text_pair"]) != len(texts):
            raise InputInvalid(f"text has {len(texts)} elements, text_pair {len(tensors['text_pair'])}")
        inputs: list = [[a, b] for a, b in zip(texts, tensors["text_pair"])]
    else:
        inputs = list(texts)
    available = {o["name"]: o for o in _outputs(header)}
    wanted = requested_outputs(task, doc.get("outputs"), list(available))
    rows = request_rows(PredictIn(inputs=inputs), s.max_inputs_per_request, s.max_input_chars)
    echo = len(json.dumps(doc["id"], ensure_ascii=False).encode()) if isinstance(doc.get("id"), str) else 0
    check_reply(v2_reply_bytes(task, header, len(rows), wanted) + echo, s.max_response_bytes,
                f"this inference of {task!r}")
    used, logits = await state.engine.predict_async(PredictRequest(task=task, inputs=rows,
                                                                   options=PredictOptions(formatter=pass_logits)))
    data, shapes = infer_outputs(used, logits)  # the pass's own bundle: its labels and outputs
    out = {"model_name": task, "model_version": VERSION,
           "outputs": [{"name": w, "datatype": available[w]["datatype"], "shape": shapes[w], "data": data[w]}
                       for w in wanted]}
    if isinstance(doc.get("id"), str):
        out["id"] = doc["id"]
    return out


_TRITON_TYPES = {"BYTES": "TYPE_STRING", "FP32": "TYPE_FP32"}


def model_config(task: str, header: BundleHeader) -> dict:
    """Triton's model configuration of a task, as ``GET /v2/models/{task}/config`` answers it (the JSON form of
    Triton's ``ModelConfig`` protobuf: ``name``, ``platform``, ``max_batch_size`` (0: shapes carry no batch
    dimension, as in :func:`model_metadata`), ``input`` / ``output`` with ``data_type`` ``TYPE_STRING`` /
    ``TYPE_FP32`` and ``dims``, ``parameters`` as ``{"key": {"string_value": ...}}``). Triton's model configuration
    extension: https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_model_configuration.md
    """
    meta = model_metadata(task, header)

    def tensor(t: dict) -> dict:
        return {"name": t["name"], "data_type": _TRITON_TYPES[t["datatype"]], "dims": t["shape"]}

    return {"name": task, "platform": PLATFORM, "backend": PLATFORM, "max_batch_size": 0,
            "version_policy": {"specific": {"versions": [int(VERSION)]}},
            "input": [tensor(t) for t in meta["inputs"]], "output": [tensor(t) for t in meta["outputs"]],
            "parameters": {k: {"string_value": str(v)} for k, v in meta["parameters"].items()}}


@router.get("/models/{task}/config", responses=_META_ERRORS)
async def config(task: TaskName, state: State) -> Any:
    """Triton's model configuration of the task (``tritonclient``'s ``get_model_config``)."""
    return await config_version(task, state, VERSION)


@router.get("/models/{task}/versions/{version}/config", responses=_META_ERRORS)
async def config_version(task: TaskName, state: State, version: Version) -> Any:
    """:func:`config` of the task's one version."""
    _check_version(version)
    return model_config(task, await run_in_threadpool(state.engine.header, task))


@router.post("/repository/index", responses=errors(422, 503, oip=True), openapi_extra={"requestBody": {
    "required": False, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"ready": {"type": "boolean"}}, "example": {"ready": True}}}}}})
async def repository_index(request: Request, state: State) -> Any:
    """Triton's model repository index (``tritonclient``'s ``get_model_repository_index``): every stored task as
    ``{"name", "version": "1", "state": "READY", "reason": ""}``, by name (a stored task is ready: it loads on first
    use). The body is empty or ``{"ready": bool}``; ``ready: false`` lists the same tasks (none is unready). Triton's
    model repository extension: https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_model_repository.md
    """
    body = await request.body()  # bounded by SUPERMASK_MAX_REQUEST_BYTES (service.api.limits)
    if body.strip():
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise InputInvalid("the repository index request is not valid JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("ready", False), bool):
            raise InputInvalid('the repository index request is {} or {"ready": true|false}')
    tasks = await run_in_threadpool(state.store.tasks)
    return [{"name": t, "version": VERSION, "state": "READY", "reason": ""} for t in sorted(tasks)]
