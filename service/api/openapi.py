"""What the OpenAPI document says that FastAPI cannot infer from the routes: the task-name path parameter, every
error response with its real body, the binary upload body, and the limits the running server's settings set.

The document is FastAPI's own (``app.openapi()``, OpenAPI 3.1), completed once per app by :func:`install`:

* every error status a route can answer is listed with the body :mod:`service.api.errors` sends,
  ``{"error": {"type", "message"}}`` (``ErrorPublic``), or OIP's ``{"error": "<message>"}`` under ``/v2``;
* ``PUT /v1/tasks/{task}`` takes ``application/octet-stream`` (a bundle file), at most
  ``SUPERMASK_MAX_BUNDLE_BYTES``;
* predict bodies carry ``maxItems`` / ``maxLength`` from ``SUPERMASK_MAX_INPUTS_PER_REQUEST`` and
  ``SUPERMASK_MAX_INPUT_CHARS``, fan-out ``tasks`` from ``SUPERMASK_MAX_FANOUT_TASKS``.

The checks against the live server (schemathesis, every check) are in ``tests/api/test_openapi.py``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Path
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from mask_store.format import TASK_NAME_PATTERN
from service.api.errors import tei_error_type
from service.api.schemas import ErrorPublic, OipError, TeiError
from service.settings import Settings

TASK_NAME_REGEX = f"^{TASK_NAME_PATTERN}$"
"""A task name as a JSON Schema ``pattern`` (anchored: JSON Schema patterns match anywhere)."""

NON_BLANK = r"\S"
"""A text holds at least one non-whitespace character (JSON Schema ``pattern``: a search, not anchored)."""

TaskName = Annotated[str, Path(pattern=TASK_NAME_REGEX, examples=["SST-2"],
                               description="Task name: a letter or digit, then up to 63 letters, digits, "
                                           "'.', '_' or '-'. A malformed name is a 422 `InvalidTaskName`.")]

_WHY: dict[int, str] = {
    401: "No `Authorization: Bearer` header (`Unauthorized`).",
    403: "A wrong admin token (`Forbidden`), or admin routes are disabled: no SUPERMASK_ADMIN_TOKEN "
         "(`AdminDisabled`).",
    404: "No such task in the mask store (`TaskNotFound`).",
    409: "The bundle was trained for another backbone (`BackboneMismatch`; on predict: a stored one).",
    413: "The body is over the size limit (`BundleTooLarge` for uploads, `RequestTooLarge` for the rest).",
    422: "A malformed request: bad JSON or fields (`RequestInvalid`), a malformed task name (`InvalidTaskName`), "
         "inputs the task cannot take (`InputInvalid`), an invalid bundle (`BundleInvalid`).",
    429: "More predict requests queued than SUPERMASK_MAX_QUEUED_REQUESTS (`Overloaded`); see `Retry-After`.",
    500: "A stored bundle was found corrupt and quarantined (`StoredBundleCorrupt`), or an unforeseen error "
         "(`InternalError`, logged on the server).",
    503: "The store cannot be read or written (`StoreUnavailable`), the request outlived "
         "SUPERMASK_REQUEST_TIMEOUT_S (`RequestTimedOut`), or the server is not ready (`NotReady`).",
    507: "The disk under the store is full (`StoreFull`), or the task is larger than the task cache (`TaskTooLarge`).",
}

_EXAMPLES: dict[int, tuple[str, str]] = {
    401: ("Unauthorized", "this route needs 'Authorization: Bearer <admin token>'"),
    403: ("Forbidden", "the admin token is wrong"),
    404: ("TaskNotFound", "no task named 'SST-3' in the mask store"),
    409: ("BackboneMismatch", "bundle was trained for backbone 3f2a…, the server runs 9c1d…"),
    413: ("RequestTooLarge", "request body is larger than the limit of 4194304 bytes (SUPERMASK_MAX_REQUEST_BYTES)"),
    422: ("InputInvalid", "inputs[0] holds an empty text"),
    429: ("Overloaded", "64 predict requests are queued or running (SUPERMASK_MAX_QUEUED_REQUESTS); retry later"),
    500: ("StoredBundleCorrupt", "stored bundle of task 'SST-2' is corrupt (quarantined): checksum mismatch"),
    503: ("RequestTimedOut", "the request did not finish within 30 s (SUPERMASK_REQUEST_TIMEOUT_S)"),
    507: ("StoreFull", "no space left under the mask store"),
}

_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying (sent with `Overloaded`, "
                                                "`RequestTimedOut` and `ReplicaUnavailable`).",
                                 "schema": {"type": "integer"}}}


def errors(*statuses: int, oip: bool = False, tei: bool = False) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` for these error statuses: each with :data:`_WHY`'s description, the error body's
    model (``ErrorPublic``; OIP's ``{"error": str}`` with ``oip``; TEI's ``{"error", "error_type"}`` with ``tei``)
    and an example; ``Retry-After`` on 429/503."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        kind, message = _EXAMPLES[status]
        if oip:
            model, example = OipError, {"error": message}
        elif tei:
            model, example = TeiError, {"error": message, "error_type": tei_error_type(status)}
        else:
            model, example = ErrorPublic, {"error": {"type": kind, "message": message}}
        out[status] = {"model": model, "description": _WHY[status],
                       "content": {"application/json": {"example": example}}}
        if status in (429, 503):
            out[status]["headers"] = _RETRY_AFTER
    return out


def upload_body() -> dict[str, Any]:
    """``openapi_extra`` of ``PUT /v1/tasks/{task}``: the raw bundle bytes (its size limit is set by :func:`install`)."""
    return {"requestBody": {"required": True, "description": "A bundle file (`.smask`), as written by "
                            "`supermask train` or `supermask bundle`; streamed, at most SUPERMASK_MAX_BUNDLE_BYTES.",
                            "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                 "format": "binary"}}}}}


DOCS_ASSETS = "/docs-assets"
"""Where Swagger UI's own files are served (from the ``swagger-ui-bundle-v2`` package: no CDN, works offline)."""


def install(app: FastAPI, settings: Settings) -> None:
    """Make ``app.openapi()`` FastAPI's document with the limits of ``settings`` filled in (built once, cached), and
    serve ``GET /docs`` (Swagger UI 5, which renders OpenAPI 3.1) with its JavaScript and CSS from this server.

    FastAPI's own ``/docs`` loads them from a CDN (a blank page offline); this is FastAPI's documented
    "self-hosting JavaScript and CSS for docs" (``docs_url=None``, ``get_swagger_ui_html`` with local URLs, a
    ``StaticFiles`` mount), with the files of the ``swagger-ui-bundle-v2`` package (``swagger_ui_path``). The app
    must be built with ``docs_url=None`` (and ``redoc_url=None``: ReDoc has no offline package here).
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _with_limits(build(), settings)
        return app.openapi_schema

    app.openapi = openapi
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png")


def _with_limits(doc: dict[str, Any], settings: Settings) -> None:
    """Fill the settings' limits into ``doc`` (in place)."""
    schemas = doc.get("components", {}).get("schemas", {})
    text = {"type": "string", "minLength": 1, "maxLength": settings.max_input_chars, "pattern": NON_BLANK}
    rows = {"type": "array", "minItems": 1, "maxItems": settings.max_inputs_per_request}
    single = {"anyOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": 1}]}
    pair = {"type": "array", "items": text, "minItems": 2, "maxItems": 2}
    hf_single = {"type": "object", "properties": {"text": text, "text_pair": {"type": "null"}},
                 "required": ["text"], "additionalProperties": False}
    hf_pair = {"type": "object", "properties": {"text": text, "text_pair": text},
               "required": ["text", "text_pair"], "additionalProperties": False}
    inputs = {"anyOf": [rows | {"items": {"anyOf": [*single["anyOf"], hf_single]}},
                        rows | {"items": {"anyOf": [pair, hf_pair]}}, text, hf_single, hf_pair],
              "description": "Texts (a one-text list counts as a text), or [text_a, text_b] pairs, or Hugging Face's "
                             '{"text", "text_pair"} objects: all of one kind, the kind the task takes (its '
                             "`text_pairs`). One text or object alone (no list) is one input, answered by one "
                             "prediction, as text-embeddings-inference and pipeline() take it.",
              "examples": [["a charming and often affecting journey"]]}
    for name in ("PredictIn", "FanOutIn"):
        if name in schemas:
            schemas[name]["properties"]["inputs"] = inputs
    if "TeiPredictIn" in schemas:  # text-embeddings-inference's (service/api/tei.py)
        schemas["TeiPredictIn"]["properties"]["inputs"] = {
            "anyOf": [text, pair, rows | {"items": {"anyOf": [text, pair, single["anyOf"][1]]}}],
            "description": 'One text, one ["text_a", "text_b"] pair, or a batch: [["text"], ["text_a", "text_b"], '
                           "...] (a list of exactly two texts is one pair).", "examples": ["What is Deep Learning?"]}
    if "TeiEmbedIn" in schemas:
        schemas["TeiEmbedIn"]["properties"]["inputs"] = {"anyOf": [text, rows | {"items": text}],
                                                         "description": "One text or a list of texts.",
                                                         "examples": ["What is Deep Learning?"]}
    if "FanOutIn" in schemas:
        task = {"type": "string", "pattern": TASK_NAME_REGEX}
        schemas["FanOutIn"]["properties"]["tasks"] = {
            "anyOf": [{"type": "array", "items": task, "minItems": 1, "maxItems": settings.max_fanout_tasks,
                       "uniqueItems": True}, {"const": "*"}],
            "description": 'Task names, or "*" for every stored task that takes these inputs, at most '
                           "SUPERMASK_MAX_FANOUT_TASKS.", "examples": [["SST-2", "CoLA"]]}
    put = doc.get("paths", {}).get("/v1/tasks/{task}", {}).get("put")
    if put is not None:
        put["requestBody"]["content"]["application/octet-stream"]["schema"]["maxLength"] = settings.max_bundle_bytes
    for item in doc.get("paths", {}).values():
        for op in item.values():
            if "requestBody" in op and op is not put:  # every other body is under SUPERMASK_MAX_REQUEST_BYTES
                op["requestBody"].setdefault("description", f"At most {settings.max_request_bytes} bytes "
                                             "(SUPERMASK_MAX_REQUEST_BYTES).")
