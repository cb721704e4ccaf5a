"""The Ray Serve fleet (service/fleet/) on a local Ray instance started here: 2 model replicas behind the
ingress, over one store directory, on the tiny test backbone. Real Ray, real Serve routing, real HTTP on
loopback; skipped with the reason when Ray cannot start. Ray is held to 2 CPUs and torn down after the module."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import free_port, make_bundle

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[dev]' installs ray[serve])")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ray[serve]')")
httpx = pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "fleet-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TASKS = ("t0", "t1", "t2")
INPUTS = ["a charming and often affecting journey", "dull, flat and lifeless", "an astonishing film"]
REPLICA = "x-supermask-replica"
# Serve's router waits this long for the replica holding a task before it falls back to others (default 1 s);
# shortened so that a burst of requests for one task spreads over both replicas within the test
ENV = {"RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S": "0.01", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def fleet(tiny_backbone_dir, tmp_path_factory):
    """``(base_url, single_server_client, settings, backbone)``: the fleet serving tasks t0..t2, the single
    server (in process) over the same store and settings as the reference, and a backbone to make bundles for."""
    from fastapi.testclient import TestClient

    from backbone import load_backbone
    from mask_store.local import LocalMaskStore
    from service.api.main import create_app
    from service.fleet import APP_NAME
    from service.fleet.app import build_app
    from service.settings import Settings

    store_dir = tmp_path_factory.mktemp("fleet-store")
    bb = load_backbone(tiny_backbone_dir)
    store = LocalMaskStore(store_dir)
    bundles = {t: make_bundle(bb, task=t, seed=i + 1, sparsity=0.05 * (i + 1)) for i, t in enumerate(TASKS)}
    for t, data in bundles.items():
        store.put(t, data)
    port = free_port()
    settings = Settings(host="127.0.0.1", port=port, device="cpu", store_dir=store_dir, examples_dir=None,
                        backbone_path=str(tiny_backbone_dir), admin_token=TOKEN, torch_threads=1,
                        ray_replicas=2, ray_replica_cpus=0.25, ray_tasks_per_replica=8, ray_max_ongoing_requests=1,
                        ray_metrics_push_s=0.5, ray_retries=3,
                        batch_wait_ms=25, max_inputs_per_request=10_000)  # room for one long request
    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    try:
        ray.init(num_cpus=2, include_dashboard=False, namespace=APP_NAME, log_to_driver=False,
                 runtime_env={"env_vars": ENV}, object_store_memory=80 * 1024 * 1024)
    except Exception as exc:  # noqa: BLE001 - any reason Ray cannot start here is a skip, with the reason
        pytest.skip(f"a local Ray instance cannot start here: {type(exc).__name__}: {exc}")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        with TestClient(create_app(settings.model_copy(), backbone=load_backbone(tiny_backbone_dir))) as single:
            yield base, single, settings, bb
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def predict(base: str, task: str, inputs=INPUTS, timeout: float = 30.0) -> httpx.Response:
    return httpx.post(f"{base}/v1/tasks/{task}/predict", json={"inputs": list(inputs)}, timeout=timeout)


def assert_same_predictions(got: list[dict], want: list[dict]) -> None:
    assert [p["label"] for p in got] == [p["label"] for p in want]
    for g, w in zip(got, want):
        assert set(g["scores"]) == set(w["scores"])
        np.testing.assert_allclose([g["scores"][k] for k in w["scores"]], list(w["scores"].values()),
                                   rtol=1e-4, atol=1e-5)


def burst(base: str, task: str, n: int = 12) -> list[httpx.Response]:
    """``n`` concurrent predicts of ``task`` (each replica takes one request at a time in this fleet, so Serve
    spreads a burst beyond the replica holding the task)."""
    with ThreadPoolExecutor(6) as pool:
        return list(pool.map(lambda _: predict(base, task, INPUTS * 20), range(n)))


def bursts_until_both_replicas(base: str, task: str, tries: int = 15) -> list[httpx.Response]:
    seen, out = set(), []
    for _ in range(tries):
        rs = burst(base, task)
        out += rs
        seen |= {r.headers.get(REPLICA) for r in rs}
        if len(seen - {None}) >= 2:
            return out
    pytest.fail(f"{tries} bursts of {task} reached only replicas {seen}")


def test_the_fleet_answers_as_the_single_server_does(fleet):
    base, single, _, _ = fleet
    for task in TASKS:
        r = predict(base, task)
        assert r.status_code == 200, r.text
        assert r.headers.get(REPLICA)
        want = single.post(f"/v1/tasks/{task}/predict", json={"inputs": INPUTS}).json()
        assert r.json()["task"] == task
        assert_same_predictions(r.json()["predictions"], want["predictions"])
    listed = httpx.get(f"{base}/v1/tasks").json()
    assert sorted(t["name"] for t in listed["tasks"]) == list(TASKS)
    assert httpx.get(f"{base}/v1/tasks/t1").json()["labels"] == ["neg", "pos"]
    health = httpx.get(f"{base}/healthz").json()
    assert health["status"] == "ok" and health["tasks"] == len(TASKS)
    assert httpx.get(f"{base}/readyz").status_code == 200  # a replica's in-process app runs no lifespan
    assert httpx.get(f"{base}/v2/health/ready").json() == {"ready": True}
    r = httpx.get(f"{base}/v2/models/no-such-task")
    assert r.status_code == 404 and isinstance(r.json()["error"], str)  # OIP's error shape through the fleet
    r = predict(base, "no-such-task")
    assert r.status_code == 404 and r.json()["error"]["type"] == "TaskNotFound"
    r = httpx.post(f"{base}/v1/tasks/t0/predict", json={"inputs": []})
    assert r.status_code == 422 and r.json()["error"]["type"] == "InputInvalid"
    r = httpx.put(f"{base}/v1/tasks/t0", content=b"junk")
    assert r.status_code == 401


def test_requests_for_a_task_land_on_the_replica_that_holds_it(fleet):
    base = fleet[0]
    first = predict(base, "t2").headers[REPLICA]
    time.sleep(1.5)  # the replica reports its loaded tasks to Serve's routers (pushed, not instantaneous)
    replicas = [predict(base, "t2").headers[REPLICA] for _ in range(8)]
    assert replicas == [first] * 8


def test_an_upload_a_replacement_and_a_delete_through_the_ingress_are_seen_by_both_replicas(fleet):
    base, single, _, bb = fleet

    def upload_then_both_replicas_serve_it(data: bytes, status: int) -> None:
        r = httpx.put(f"{base}/v1/tasks/fresh", content=data, headers=AUTH, timeout=30)
        assert r.status_code == status, r.text
        want = single.post("/v1/tasks/fresh/predict", json={"inputs": INPUTS * 20}).json()["predictions"]
        for resp in bursts_until_both_replicas(base, "fresh"):
            assert resp.status_code == 200, resp.text
            assert_same_predictions(resp.json()["predictions"], want)

    upload_then_both_replicas_serve_it(make_bundle(bb, task="fresh", seed=7), 201)
    # replaced through one replica while both hold the old bundle: both answer with the new one
    upload_then_both_replicas_serve_it(make_bundle(bb, task="fresh", seed=8, labels=("a", "b", "c")), 200)
    r = httpx.delete(f"{base}/v1/tasks/fresh", headers=AUTH, timeout=30)
    assert r.status_code == 204
    for resp in bursts_until_both_replicas(base, "fresh"):
        assert resp.status_code == 404 and resp.json()["error"]["type"] == "TaskNotFound"


def test_metrics_carry_a_replica_label_per_replica(fleet):
    base = fleet[0]
    served = set()
    for _ in range(10):  # distinct tasks spread over the replicas (Serve prefers the one holding the fewest)
        served |= {predict(base, t).headers[REPLICA] for t in TASKS}
        if len(served) == 2:
            break
    assert len(served) == 2
    deadline = time.time() + 10
    while True:
        text = httpx.get(f"{base}/metrics").text
        replicas = {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
                    if line.startswith("supermask_requests_total{") and 'replica="' in line}
        if len(replicas) >= 2 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert len(replicas) == 2, text[:2000]
    assert text.count("# TYPE supermask_requests_total counter") == 1  # one family, both replicas' series
    assert "supermask_backbone_bytes{replica=" in text


def test_killing_a_replica_mid_traffic_loses_no_request_silently(fleet):
    base, single, _, _ = fleet
    want = {t: single.post(f"/v1/tasks/{t}/predict", json={"inputs": INPUTS * 20}).json()["predictions"]
            for t in TASKS}
    outcomes: list[tuple[str, int, dict | None, str | None]] = []
    stop = threading.Event()

    pause = threading.Event()

    def client(i: int) -> None:
        k = 0
        while not stop.is_set():
            if pause.is_set():
                time.sleep(0.05)
                continue
            task = TASKS[(i + k) % len(TASKS)]
            k += 1
            try:
                r = predict(base, task, INPUTS * 20)  # long enough that each replica nearly always has one in flight
                outcomes.append((task, r.status_code, r.json(), r.headers.get(REPLICA)))
            except Exception as exc:  # noqa: BLE001 - a transport failure is a lost request: recorded
                outcomes.append((task, -1, None, repr(exc)))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(8)]  # a queue always waits for each replica
    for t in threads:
        t.start()
    deadline = time.time() + 30  # until both replicas are answering
    while len({o[3] for o in outcomes} - {None}) < 2 and time.time() < deadline:
        time.sleep(0.2)
    replicas = {a["name"].rsplit("#", 1)[1]: a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("SERVE_REPLICA::supermask#SupermaskModel#")}
    assert len(replicas) == 2
    # one long request (3,000 rows, seconds of work) for a task only one replica holds, sent while that replica is
    # idle (background traffic paused) so Serve gives it to that replica: killed while it runs
    bb = fleet[3]
    assert httpx.put(f"{base}/v1/tasks/slow", content=make_bundle(bb, task="slow", seed=11), headers=AUTH,
                     timeout=30).status_code in (200, 201)
    pause.set()
    time.sleep(1.0)  # in-flight background requests drain
    victim = predict(base, "slow").headers[REPLICA]
    time.sleep(1.5)  # Serve's routers learn that the victim holds it
    long_rows = INPUTS * 3000  # 9,000 rows: seconds of work on one thread
    long_out: list = []

    def long_request() -> None:
        t0 = time.time()
        r = predict(base, "slow", long_rows, timeout=180)
        long_out.extend([r, t0, time.time()])

    def victim_busy() -> bool:  # the victim's admitted-requests gauge, as merged by the ingress's /metrics
        for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
            if line.startswith("supermask_admitted_requests{") and f'replica="{victim}"' in line:
                return float(line.rsplit(" ", 1)[1]) >= 1
        return False

    longer = threading.Thread(target=long_request, daemon=True)
    longer.start()
    deadline = time.time() + 30  # kill only once the victim reports the long request admitted
    while not victim_busy():
        assert time.time() < deadline and longer.is_alive(), "the long request never showed on its replica"
        time.sleep(0.1)
    killed_at = len(outcomes)
    t_kill = time.time()
    ray.kill(ray.get_actor(replicas[victim]["name"], namespace=replicas[victim]["namespace"]), no_restart=True)
    pause.clear()  # background traffic goes on through the kill
    longer.join()
    r, started, ended = long_out
    assert started < t_kill < ended, "the long request was not in flight at the kill: the test proves nothing"
    assert r.status_code in (200, 503), r.text
    if r.status_code == 200:  # retried on the other replica: the right answer, row for row
        want_long = single.post("/v1/tasks/slow/predict", json={"inputs": INPUTS}).json()["predictions"]
        assert_same_predictions(r.json()["predictions"], want_long * 3000)
        assert r.headers[REPLICA] != victim
    else:
        assert r.json()["error"]["type"] == "ReplicaUnavailable" and r.headers.get("retry-after")
    time.sleep(4.0)
    stop.set()
    for t in threads:
        t.join()
    assert len(outcomes) > killed_at + 10  # traffic went on after the kill
    bad = []
    for task, status, body, _ in outcomes:
        if status == 200:
            assert_same_predictions(body["predictions"], want[task])  # never a wrong answer
        elif status == 503 and body["error"]["type"] == "ReplicaUnavailable":
            continue  # a clear, retryable refusal
        else:
            bad.append((task, status, body))
    assert bad == []
    # the kill hit requests in flight: the ingress re-sent them (or refused them with 503), it did not drop them
    metrics = httpx.get(f"{base}/metrics").text
    retried = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  if line.startswith("supermask_fleet_retries_total{"))
    refused = sum(s == 503 for _, s, _, _ in outcomes)
    assert retried + refused >= 1, [line for line in metrics.splitlines() if "fleet" in line]
    assert sum(s == 200 for _, s, _, _ in outcomes[killed_at:]) > 10
    # Serve replaces the dead replica; the fleet is back to 2 replicas that answer
    deadline = time.time() + 90
    while time.time() < deadline:
        app = serve.status().applications["supermask"]
        running = app.deployments["SupermaskModel"].replica_states.get("RUNNING", 0)
        if running == 2:
            break
        time.sleep(1.0)
    assert running == 2
    assert predict(base, "t1").status_code == 200
    deadline = time.time() + 15  # and both live replicas' metrics are merged again (the dead one's expire)
    while "supermask_fleet_replicas_reporting 2.0" not in httpx.get(f"{base}/metrics").text:
        assert time.time() < deadline, "the fleet's metrics did not recover after the kill"
        time.sleep(0.5)


# ---- the entry point under abuse (issue 35, item 8) -------------------------------------------------------------


def test_routes_name_the_task_for_v1_and_v2_and_every_predict_is_a_read():
    from service.fleet.routing import route

    assert route("POST", "v2/models/t0/infer") == ("t0", True)
    assert route("POST", "/v2/models/t0/versions/1/infer") == ("t0", True)
    assert route("GET", "v2/models/t0") == ("t0", True) and route("GET", "v2/models/t0/ready") == ("t0", True)
    assert route("POST", "v1/predict") == (None, True)  # a fan-out names several tasks: any replica, retried
    assert route("POST", "v1/tasks/t0/predict") == ("t0", True) and route("GET", "v1/tasks/t0") == ("t0", True)
    assert route("PUT", "v1/tasks/t0") == (None, False) and route("DELETE", "v1/tasks/t0") == (None, False)


def _raw(port: int, head: bytes, body: bytes = b"", timeout_s: float = 30) -> bytes:
    """One request over a loopback socket with exactly these bytes (``head`` without its blank line); the reply."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as c:
        c.sendall(head + b"\r\nConnection: close\r\n\r\n" + body)
        out = b""
        while chunk := c.recv(65536):
            out += chunk
        return out


def test_a_non_ascii_header_byte_is_answered_as_the_single_server_does(fleet):
    base, _, settings, _ = fleet
    for request in (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Note: caf\xe9 \xff",
                    b"GET /v1/tasks/t0 HTTP/1.1\r\nHost: x\r\nUser-Agent: \xc3\xa9t\xc3\xa9"):
        reply = _raw(settings.port, request)
        assert reply.startswith(b"HTTP/1.1 200"), reply[:400]
    body = b'{"inputs": ["a fine film"]}'
    reply = _raw(settings.port, b"POST /v1/tasks/t0/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nX-Note: \xe9\r\nContent-Length: " + str(len(body)).encode(), body)
    assert reply.startswith(b"HTTP/1.1 200") and b'"task":"t0"' in reply, reply[:400]


def test_an_oversized_predict_body_is_refused_by_its_length_before_it_is_read(fleet):
    """300 MiB declared, 1 KiB sent: the ingress answers 413 at once instead of reading the body whole."""
    _, _, settings, _ = fleet
    t0 = time.monotonic()
    reply = _raw(settings.port, b"POST /v1/tasks/t0/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: " + str(300 << 20).encode(), b"{" + b" " * 1023, timeout_s=20)
    assert reply.startswith(b"HTTP/1.1 413") and b"RequestTooLarge" in reply, reply[:400]
    assert b"SUPERMASK_MAX_REQUEST_BYTES" in reply and time.monotonic() - t0 < 20


def test_v2_inference_is_routed_to_the_replica_holding_its_task(fleet):
    base = fleet[0]
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a fine film"]}]}
    first = httpx.post(f"{base}/v2/models/t1/infer", json=body, timeout=30)
    assert first.status_code == 200, first.text
    time.sleep(1.5)  # the replica reports its loaded tasks to Serve's routers
    replicas = {httpx.post(f"{base}/v2/models/t1/infer", json=body, timeout=30).headers[REPLICA] for _ in range(6)}
    assert replicas == {first.headers[REPLICA]}


def test_sigterm_to_the_process_group_exits_promptly(tiny_backbone_dir, tmp_path):
    """``supermask serve --ray`` in its own process group; SIGTERM to the whole group (as Ctrl-C or ``timeout``
    send it) also stops Ray's own processes: the server must exit within its bounded clean-up, not hang ~60 s on
    a GCS that is gone."""
    import signal
    import subprocess
    import sys

    port = free_port()
    env = dict(os.environ, **ENV, SUPERMASK_BACKBONE_PATH=str(tiny_backbone_dir), SUPERMASK_EXAMPLES_DIR="",
               SUPERMASK_DEVICE="cpu", SUPERMASK_RAY_REPLICA_CPUS="0.25", SUPERMASK_TORCH_THREADS="1",
               SUPERMASK_LOG_LEVEL="WARNING", RAY_OBJECT_STORE_MEMORY=str(80 * 1024 * 1024))
    proc = subprocess.Popen([sys.executable, "-m", "supermask", "serve", "--ray", "--host", "127.0.0.1", "--port",
                             str(port), "--store-dir", str(tmp_path / "store")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.skip(f"the fleet could not start here: {proc.stderr.read().decode()[-500:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the fleet did not answer /healthz within 240 s"
            time.sleep(1)
        os.killpg(proc.pid, signal.SIGTERM)
        t0 = time.monotonic()
        try:
            proc.wait(45)
        except subprocess.TimeoutExpired:
            pytest.fail("still running 45 s after SIGTERM to its process group")
        assert time.monotonic() - t0 < 45
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
