"""kill -9 during uploads: a real server process (``supermask serve``) is killed at random points while
a client replaces tasks back to back, then restarted; the store must hold, for every task, the last
acknowledged upload or the one in flight at the kill (complete), every file must validate, and no
temporary file may outlive the restart."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from mask_store.format import decode_bundle
from tests.conftest import free_port, make_bundle

REPO = Path(__file__).resolve().parents[2]
TOKEN = "crash-test-token"
TASKS = ("t0", "t1", "t2")
KILLS = 4


def _start(backbone_dir: Path, store: Path, port: int, log) -> subprocess.Popen:
    env = dict(os.environ, SUPERMASK_ADMIN_TOKEN=TOKEN, SUPERMASK_EXAMPLES_DIR="", SUPERMASK_DEVICE="cpu",
               SUPERMASK_CPU_PRECISION="fp32", SUPERMASK_LOG_LEVEL="WARNING", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "supermask", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--store-dir", str(store), "--backbone", str(backbone_dir)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.flush()
            pytest.fail(f"server exited with {proc.returncode}: {Path(log.name).read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    pytest.fail("server did not become ready within 90 s")


def test_kill_9_during_uploads_never_corrupts_the_store(tiny_backbone, tiny_backbone_dir, tmp_path):
    rng = random.Random(9)
    store = tmp_path / "store"
    versions = {}  # sha256 -> (task, bytes)
    for task in TASKS:
        for seed in range(6):
            data = make_bundle(tiny_backbone, task, seed=seed, sparsity=0.05 + 0.02 * seed)
            versions[hashlib.sha256(data).hexdigest()] = (task, data)
    by_task = {t: [h for h, (task, _) in versions.items() if task == t] for t in TASKS}
    acked: dict[str, str] = {}  # task -> sha of its last acknowledged upload
    errors: list[str] = []  # what the upload thread saw go wrong (asserted in this thread)
    log = open(tmp_path / "server.log", "ab")
    interrupted_total = 0
    for kill in range(KILLS):
        port = free_port()
        proc = _start(tiny_backbone_dir, store, port, log)
        in_flight: dict[str, str] = {}
        stop = threading.Event()

        def upload_loop():
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10,
                              headers={"Authorization": f"Bearer {TOKEN}"}) as client:
                i = 0
                while not stop.is_set():
                    task = TASKS[i % len(TASKS)]
                    sha = by_task[task][(i // len(TASKS) + kill) % len(by_task[task])]
                    in_flight[task] = sha
                    try:
                        r = client.put(f"/v1/tasks/{task}", content=versions[sha][1])
                    except httpx.HTTPError:
                        return  # the server died under this upload
                    if r.status_code not in (200, 201):
                        errors.append(f"upload of {task}: {r.status_code} {r.text}")
                        return
                    acked[task] = sha
                    del in_flight[task]
                    i += 1

        th = threading.Thread(target=upload_loop, daemon=True)
        th.start()
        time.sleep(rng.uniform(0.3, 1.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        stop.set()
        th.join(15)
        assert not errors, errors
        interrupted_total += len(in_flight)
        # the store after the crash, before any restart
        for task in TASKS:
            path = store / f"{task}.smask"
            if task not in acked:  # never acknowledged (perhaps killed during its first upload)
                if path.exists():
                    assert hashlib.sha256(path.read_bytes()).hexdigest() == in_flight.get(task)
                    acked[task] = in_flight[task]
                continue
            assert path.exists(), f"{task}: an acknowledged upload was lost"
            data = path.read_bytes()
            decode_bundle(data)  # complete and valid
            sha = hashlib.sha256(data).hexdigest()
            assert sha in (acked.get(task), in_flight.get(task)), f"{task}: neither the last acknowledged " \
                "upload nor the one in flight"
            acked[task] = sha  # what a reader sees now is the state to build on
    # a restart sweeps the dead server's temporary files and serves every task
    port = free_port()
    proc = _start(tiny_backbone_dir, store, port, log)
    try:
        assert not [p.name for p in store.iterdir() if p.name.startswith(".tmp-")]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            listed = [t["name"] for t in client.get("/v1/tasks").json()["tasks"]]
            assert listed == sorted(acked)
            for task in acked:
                r = client.post(f"/v1/tasks/{task}/predict", json={"inputs": ["after the crash"]})
                assert r.status_code == 200, r.text
            assert client.get("/healthz").json()["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert len(acked) == len(TASKS) and interrupted_total >= 1  # the kills did land during uploads
