"""text-embeddings-inference's (TEI) HTTP API beside ours: ``POST /predict``, ``POST /embed``, ``GET /info``,
``GET /health``, with TEI's request and response shapes, so that a TEI client works against this server unchanged.

Shapes, from TEI's OpenAPI document (``docs/openapi.json`` of huggingface/text-embeddings-inference, v1.7):

* ``PredictRequest`` ``{"inputs": PredictInput, "raw_scores": false, "truncate": null, "truncation_direction":
  "right"}``; ``PredictInput`` is one text (``"a"``), one pair (``["a", "b"]``: a list of exactly two texts is a
  pair) or a batch (``[["a"], ["a", "b"], ...]``; a list of texts of another length is a batch of single texts).
  ``PredictResponse``: one input → ``[Prediction, ...]``, a batch → ``[[Prediction, ...], ...]``; ``Prediction`` is
  ``{"score", "label"}``, every label, highest score first (softmax probabilities; ``raw_scores``: the logits).
  A regression task answers ``[{"score": value, "label": "LABEL_0"}]`` (TEI's one-output classifier).
* ``EmbedRequest`` ``{"inputs": Input, "normalize": true, "truncate": null, "truncation_direction": "right"}``;
  ``Input`` is a text or a list of texts (token-id inputs are refused). ``EmbedResponse`` ``[[float, ...], ...]``:
  one vector per text, L2-normalised unless ``normalize`` is false.
* ``Info`` ``{"model_id", "model_sha", "model_dtype", "model_type": {"classifier": {"id2label", "label2id"}} or
  {"embedding": {"pooling": "mean"}}, "max_concurrent_requests", "max_input_length", "max_batch_tokens",
  "max_batch_requests", "max_client_batch_size", "auto_truncate", "tokenization_workers", "version", "sha",
  "docker_label"}``.

Unknown body fields are ignored, as TEI (serde) ignores them (Hugging Face's ``InferenceClient`` adds
``"parameters"``). ``truncate`` null means this server's default: cut to the limit (``auto_truncate: true``).

Which task answers: TEI serves one model; here the ``X-Supermask-Task`` header names the task, else the
``SUPERMASK_TEI_TASK`` setting (``/predict``, ``/info``). ``/embed`` embeds with the plain backbone (the
sentence-embedding model, mean pooling) unless the header names a task, whose supermask is then applied (the
vectors its head reads). ``/info`` without a task describes the backbone as TEI's embedding model.

Errors are TEI's ``ErrorResponse`` ``{"error": "<message>", "error_type": "validation" | "overloaded" | "unhealthy" |
"backend"}`` (:func:`service.api.errors.tei_error_type`), with the status of the one table in
:mod:`service.api.errors`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import torch
from fastapi import APIRouter, Header
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from service import __version__
from service.api.deps import State
from service.api.inputs import request_rows
from service.api.limits import FLOAT_CHARS, check_reply, predict_reply_bytes
from service.api.openapi import TASK_NAME_REGEX, errors
from service.api.schemas import PredictIn
from service.engine import PredictOptions, PredictRequest
from service.errors import InputInvalid

router = APIRouter(tags=["text-embeddings-inference"])

TASK_HEADER = "X-Supermask-Task"
REGRESSION_LABEL = "LABEL_0"
"""The label of a regression task's one score (Hugging Face's name for a one-output head's label)."""

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8", "device": "float16"}

Direction = Literal["right", "left", "Right", "Left"]  # TEI's enum is "Left" / "Right", its default "right"
TaskHeader = Annotated[str | None, Header(alias=TASK_HEADER, pattern=TASK_NAME_REGEX, examples=["SST-2"],
                                          description="The task to answer with (else SUPERMASK_TEI_TASK; /embed: "
                                                      "the plain backbone).")]


class TeiPredictIn(BaseModel):
    """TEI's ``PredictRequest`` (see the module docstring)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"inputs": "a charming and often affecting journey"},
        {"inputs": [["a charming journey"], ["dull, flat and lifeless"]], "raw_scores": True}]})

    inputs: Union[str, list[Union[str, list[str]]]] = Field(
        description='One text, one ["text_a", "text_b"] pair, or a batch: [["text"], ["text_a", "text_b"], ...].')
    raw_scores: bool = False
    truncate: bool | None = None
    truncation_direction: Direction = "right"


class TeiEmbedIn(BaseModel):
    """TEI's ``EmbedRequest`` (see the module docstring; ``prompt_name`` is not supported: a 422 unless null)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"inputs": "What is Deep Learning?"}, {"inputs": ["a text", "another"], "normalize": False}]})

    inputs: Union[str, list[str]] = Field(description="One text or a list of texts.")
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: Direction = "right"
    prompt_name: None = Field(None, description="Not supported (this backbone has no prompts): null or absent.")


class TeiPrediction(BaseModel):
    score: float
    label: str


def _options(truncate: bool | None, direction: str, **kw) -> PredictOptions:
    return PredictOptions(truncate=truncate is not False, truncation_direction=direction.lower(), **kw)


def predictrequest_rows(inputs: Any) -> tuple[list, bool]:
    """TEI's ``PredictInput`` as our predict ``inputs`` and whether it was one input (not a batch).

    Raises:
        InputInvalid: a batch item that is neither a text nor a list of one or two texts.
    """
    if isinstance(inputs, str):
        return [inputs], True
    if len(inputs) == 2 and all(isinstance(x, str) for x in inputs):
        return [list(inputs)], True  # TEI reads a list of two texts as one pair
    return list(inputs), False


def _task(header: str | None, default: str | None, route: str) -> str:
    task = header or default
    if task is None:
        raise InputInvalid(f"{route} needs a task: send the header '{TASK_HEADER}: <task>' or start the server with "
                           "SUPERMASK_TEI_TASK=<task> (GET /v1/tasks lists them)")
    return task


@router.post("/predict", response_model=Union[list[TeiPrediction], list[list[TeiPrediction]]],
             responses=errors(404, 409, 413, 422, 429, 500, 503, 507, tei=True))
async def predict(body: TeiPredictIn, state: State, task: TaskHeader = None) -> Any:
    """TEI's ``POST /predict``: every label's score, highest first, per input (one input: a flat list)."""
    s = state.settings
    name = _task(task, s.tei_task, "POST /predict")
    inputs, single = predictrequest_rows(body.inputs)
    rows = request_rows(PredictIn(inputs=inputs), s.max_inputs_per_request, s.max_input_chars)
    header = await run_in_threadpool(state.engine.header, name)
    if single and isinstance(inputs[0], list) and not header.text_pairs:
        raise InputInvalid(f"task {name!r} takes single texts, and TEI reads a list of two texts as one pair: send "
                           '[["text"], ["text"]] for two texts')
    # TEI's reply is smaller than /v1's for the same rows (no "scores", no "task"): /v1's bound bounds it
    check_reply(predict_reply_bytes(name, header, len(rows), True, None), s.max_response_bytes,
                f"this /predict of {name!r}")
    if header.problem_type == "regression":
        if body.raw_scores:
            raise InputInvalid(f"task {name!r} is a regression task: raw_scores applies only to classification")
        opts = _options(body.truncate, body.truncation_direction)
    else:
        opts = _options(body.truncate, body.truncation_direction, ranked=True, raw_scores=body.raw_scores)
    preds = await state.engine.predict_async(PredictRequest(task=name, inputs=rows, options=opts))
    out = [[{"score": p["value"], "label": REGRESSION_LABEL}] if "value" in p else p["top"] for p in preds]
    return out[0] if single else out


@router.post("/embed", response_model=list[list[float]],
             responses=errors(404, 409, 413, 422, 429, 500, 503, 507, tei=True))
async def embed(body: TeiEmbedIn, state: State, task: TaskHeader = None) -> Any:
    """TEI's ``POST /embed``: mean-pooled sentence embeddings ``[texts][hidden]`` of the backbone (the header's task:
    through its supermask), float32, L2-normalised unless ``normalize`` is false."""
    s = state.settings
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    rows = request_rows(PredictIn(inputs=texts), s.max_inputs_per_request, s.max_input_chars)
    direction = body.truncation_direction.lower()
    check_reply(len(rows) * (state.backbone.hidden_size * (FLOAT_CHARS + 1) + 3), s.max_response_bytes, "this /embed")
    vectors = await state.engine.admitted(run_in_threadpool(
        state.engine.embed, task, rows, truncate=body.truncate is not False, truncation_direction=direction))
    if body.normalize:
        vectors = torch.nn.functional.normalize(vectors, dim=-1)
    return vectors.tolist()


@router.get("/info", responses=errors(404, 422, 503, tei=True))
async def info(state: State, task: TaskHeader = None) -> Any:
    """TEI's ``GET /info``: the task's classifier (labels) or, with no task, the backbone as an embedding model."""
    s, engine = state.settings, state.engine
    name = task or s.tei_task
    if name is None:
        limit = min(getattr(state.backbone.model.config, "max_position_embeddings", 512),
                    getattr(state.backbone.tokenizer, "model_max_length", 512))
        model_id, model_type = state.backbone.name, {"embedding": {"pooling": "mean"}}
    else:
        header = await run_in_threadpool(engine.header, name)
        labels = header.labels or [REGRESSION_LABEL]
        model_id, limit = name, header.max_seq_length
        model_type = {"classifier": {"id2label": {str(i): lab for i, lab in enumerate(labels)},
                                     "label2id": {lab: i for i, lab in enumerate(labels)}}}
    return {"model_id": model_id, "model_sha": None, "model_dtype": _DTYPES.get(engine.precision, engine.precision),
            "model_type": model_type, "max_concurrent_requests": s.max_queued_requests, "max_input_length": limit,
            "max_batch_tokens": s.max_batch_size * limit, "max_batch_requests": None,
            "max_client_batch_size": s.max_inputs_per_request, "auto_truncate": True, "tokenization_workers": 1,
            "version": __version__, "sha": None, "docker_label": None}


@router.get("/health", response_class=Response, responses=errors(503, tei=True))
async def health(state: State) -> Response:
    """TEI's ``GET /health``: 200 with an empty body while the store can be listed."""
    await run_in_threadpool(state.store.tasks)
    return Response(status_code=200)
