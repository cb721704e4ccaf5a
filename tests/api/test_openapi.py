"""The OpenAPI document: complete (security, upload body, error bodies, limits, examples) and true, checked by
schemathesis with every check against a live ``supermask serve`` (real uvicorn on loopback, the tiny backbone,
a classification, a pair and a regression task). The schemathesis settings and their one exception are in
``tests/api/schemathesis.toml``."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.api.test_crash import TOKEN, _start
from tests.conftest import free_port, make_bundle

REPO = Path(__file__).resolve().parents[2]
ERROR_REF = "#/components/schemas/ErrorPublic"
OIP_ERROR_REF = "#/components/schemas/OipError"
TEI_ERROR_REF = "#/components/schemas/TeiError"


@pytest.fixture()
def doc(tiny_backbone, tmp_path_factory):
    """``(openapi_document, settings)`` of an app with non-default limits."""
    from fastapi.testclient import TestClient

    from service.api.main import create_app
    from service.settings import Settings

    settings = Settings(store_dir=tmp_path_factory.mktemp("openapi-store"), examples_dir=None, device="cpu",
                        max_inputs_per_request=17, max_input_chars=999, max_bundle_bytes=123_456, max_fanout_tasks=5)
    with TestClient(create_app(settings, backbone=tiny_backbone)) as client:
        return client.get("/openapi.json").json(), settings


def _operations(document):
    for path, item in document["paths"].items():
        for method, op in item.items():
            yield path, method, op


def test_admin_routes_declare_the_bearer_scheme_and_others_do_not(doc):
    document, _ = doc
    assert document["components"]["securitySchemes"]["AdminToken"] == {
        "type": "http", "scheme": "bearer", "bearerFormat": "opaque",
        "description": document["components"]["securitySchemes"]["AdminToken"]["description"]}
    secured = {(p, m) for p, m, op in _operations(document) if op.get("security")}
    assert secured == {("/v1/tasks/{task}", "put"), ("/v1/tasks/{task}", "delete")}
    for p, m in secured:
        assert {"401", "403"} <= set(document["paths"][p][m]["responses"])


def test_upload_body_is_octet_stream_under_the_configured_limit(doc):
    document, settings = doc
    body = document["paths"]["/v1/tasks/{task}"]["put"]["requestBody"]
    schema = body["content"]["application/octet-stream"]["schema"]
    assert body["required"] and list(body["content"]) == ["application/octet-stream"]
    assert schema == {"type": "string", "format": "binary", "maxLength": settings.max_bundle_bytes}
    assert {"201", "413", "409", "422", "507"} <= set(document["paths"]["/v1/tasks/{task}"]["put"]["responses"])


def test_every_error_response_is_the_body_the_server_sends(doc):
    document, _ = doc
    assert "HTTPValidationError" not in document["components"]["schemas"]  # FastAPI's 422 body: never sent
    seen = 0
    for path, method, op in _operations(document):
        for status, resp in op["responses"].items():
            if not status.startswith(("4", "5")) or path == "/v2/health/ready":  # OIP: 400 {"ready": false}
                continue
            seen += 1
            content = resp["content"]["application/json"]
            tei = path in ("/predict", "/embed", "/info", "/health")  # text-embeddings-inference's ErrorResponse
            want = OIP_ERROR_REF if path.startswith("/v2") else TEI_ERROR_REF if tei else ERROR_REF
            assert content["schema"] == {"$ref": want}, (path, method, status)
            example = content["example"]["error"]
            assert isinstance(example, str) if path.startswith("/v2") or tei else set(example) == {"type", "message"}
            assert not tei or content["example"]["error_type"] in ("validation", "overloaded", "unhealthy", "backend")
            assert resp["description"]
        if "{task}" in path:
            assert "422" in op["responses"], (path, method)  # a malformed name
    assert seen > 40
    assert document["components"]["schemas"]["ErrorPublic"]["properties"]["error"] == {
        "$ref": "#/components/schemas/ErrorBody"}


def test_limits_of_the_settings_are_in_the_schema(doc):
    document, settings = doc
    schemas = document["components"]["schemas"]
    for name in ("PredictIn", "FanOutIn"):
        kinds = schemas[name]["properties"]["inputs"]["anyOf"]  # lists of texts, lists of pairs, one input alone
        assert [k["maxItems"] for k in kinds[:2]] == [settings.max_inputs_per_request] * 2
        texts = [kinds[0]["items"]["anyOf"][0], kinds[1]["items"]["anyOf"][0]["items"], kinds[2],
                 kinds[4]["properties"]["text_pair"]]  # a text; in a pair; alone; HF's {"text", "text_pair"}
        assert [t["maxLength"] for t in texts] == [settings.max_input_chars] * 4
    tasks = schemas["FanOutIn"]["properties"]["tasks"]["anyOf"][0]
    assert tasks["maxItems"] == settings.max_fanout_tasks and tasks["uniqueItems"]
    task_param = document["paths"]["/v1/tasks/{task}/predict"]["post"]["parameters"][0]["schema"]
    assert re.fullmatch(task_param["pattern"].strip("^$"), "SST-2") and task_param["pattern"].startswith("^")


def test_every_operation_has_an_example(doc):
    document, _ = doc
    schemas = document["components"]["schemas"]

    def has_example(obj) -> bool:
        if isinstance(obj, dict):
            if "example" in obj or "examples" in obj:
                return True
            ref = obj.get("$ref")
            if ref and has_example(schemas[ref.rsplit("/", 1)[1]]):
                return True
            return any(has_example(v) for v in obj.values())
        return isinstance(obj, list) and any(has_example(v) for v in obj)

    missing = []
    for path, method, op in _operations(document):
        json_body = "application/json" in op.get("requestBody", {}).get("content", {})  # not the raw bundle of PUT
        ok = [has_example(op["requestBody"])] if json_body else []
        success = {s: r for s, r in op["responses"].items() if s.startswith("2") and r.get("content")}
        ok += [has_example(r) for r in success.values()] if path.startswith("/v1") or path in (
            "/healthz", "/readyz") else []
        if not all(ok):
            missing.append((method, path))
    assert missing == []


@pytest.fixture()
def live(tiny_backbone, tiny_backbone_dir, tmp_path):
    """A ``supermask serve`` process over a store holding SST-2 (single texts), MRPC (pairs), STS-B (regression)."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "SST-2.smask").write_bytes(make_bundle(tiny_backbone, "SST-2", labels=("negative", "positive"), seed=1))
    (store / "MRPC.smask").write_bytes(make_bundle(tiny_backbone, "MRPC", labels=("not_equivalent", "equivalent"),
                                                   text_pairs=True, seed=2))
    (store / "STS-B.smask").write_bytes(make_bundle(tiny_backbone, "STS-B", labels=(), text_pairs=True, seed=3))
    port = free_port()
    log = open(tmp_path / "server.log", "ab")
    proc = _start(tiny_backbone_dir, store, port, log)
    try:
        yield f"http://127.0.0.1:{port}", tmp_path
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_schemathesis_every_check_passes_against_the_live_server(live):
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    base, tmp = live
    cmd = [st, "--config-file", str(REPO / "tests/api/schemathesis.toml"), "run", f"{base}/openapi.json",
           "--checks", "all", "--max-examples", "25", "--seed", "20261201", "--workers", "1",
           "--header", f"Authorization: Bearer {TOKEN}", "--generation-database", "none", "--no-color",
           "--request-timeout", "30", "--max-failures", "50"]
    out = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=900)
    report = out.stdout + out.stderr
    print(report[-3000:])  # the counts, for the record (pytest -s)
    counts = re.search(r"(\d+) generated, (?:(\d+) found \d+ unique failures|(\d+) passed)", report)
    assert out.returncode == 0, report[-6000:]
    assert counts and int(counts.group(1)) > 500 and counts.group(3) == counts.group(1), report[-3000:]
    operations = sum(len(item) for item in httpx.get(f"{base}/openapi.json").json()["paths"].values())
    assert operations >= 25 and f"Tested: {operations}" in report  # every operation of the document was exercised


@pytest.fixture()
def client(tiny_backbone, tmp_path):
    from fastapi.testclient import TestClient

    from service.api.main import create_app
    from service.settings import Settings

    (tmp_path / "SST-2.smask").write_bytes(make_bundle(tiny_backbone, "SST-2", seed=1))
    settings = Settings(store_dir=tmp_path, examples_dir=None, device="cpu", max_request_bytes=2048)
    with TestClient(create_app(settings, backbone=tiny_backbone)) as c:
        yield c


def test_405_names_every_method_of_the_path(client):
    r = client.request("OPTIONS", "/v1/tasks/SST-2")
    assert r.status_code == 405 and r.headers["allow"] == "DELETE, GET, PUT"
    assert r.json()["error"]["type"] == "MethodNotAllowed" and "DELETE, GET, PUT" in r.json()["error"]["message"]
    assert client.get("/v1/tasks/SST-2/predict").headers["allow"] == "POST"


def test_v2_errors_are_in_the_open_inference_protocol_shape_from_every_layer(client):
    cases = {
        "unknown route (Starlette 404)": client.get("/v2/nothing/here"),
        "wrong method (Starlette 405)": client.delete("/v2/models/SST-2"),
        "body over the limit (413)": client.post("/v2/models/SST-2/infer", content=b"x" * 4096),
        "malformed task name (path validation)": client.get("/v2/models/bad%20name!/ready"),
        "no such task (typed error)": client.get("/v2/models/SST-3"),
    }
    statuses = {k: r.status_code for k, r in cases.items()}
    assert list(statuses.values()) == [404, 405, 413, 422, 404], statuses
    for what, r in cases.items():
        body = r.json()
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], (what, body)
    assert "not allowed" in cases["malformed task name (path validation)"].json()["error"]
    # the same failures under /v1 keep the documented {"error": {"type", "message"}} body
    r = client.get("/v1/tasks/bad%20name!")
    assert r.status_code == 422 and r.json()["error"]["type"] == "InvalidTaskName"
    assert client.get("/v1/nothing").json()["error"]["type"] == "NotFound"
