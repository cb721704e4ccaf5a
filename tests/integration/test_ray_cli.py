"""``supermask serve --ray`` as a user runs it: one command starts a local Ray instance and the fleet, the REST
API answers, and SIGTERM (what ``docker stop`` or systemd sends) stops it cleanly: the application deleted, the
local instance shut down, exit status 0. Skipped with the reason when Ray is not installed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, make_bundle

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[dev]' installs ray[serve])")
httpx = pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parents[2]


def test_one_command_serves_the_fleet_and_sigterm_stops_it_cleanly(tiny_backbone, tiny_backbone_dir, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "t.smask").write_bytes(make_bundle(tiny_backbone, "t", seed=1))
    port = free_port()
    env = dict(os.environ, SUPERMASK_ADMIN_TOKEN="tok", SUPERMASK_EXAMPLES_DIR="", SUPERMASK_DEVICE="cpu",
               SUPERMASK_RAY_REPLICA_CPUS="0.5", SUPERMASK_TORCH_THREADS="1", OMP_NUM_THREADS="1",
               RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "supermask", "serve", "--ray", "--replicas", "1", "--host",
                             "127.0.0.1", "--port", str(port), "--store-dir", str(store), "--backbone",
                             str(tiny_backbone_dir)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: the local Ray instance with it
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the fleet did not become ready within 240 s"
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        r = httpx.post(f"{base}/v1/tasks/t/predict", json={"inputs": ["a fine film"]}, timeout=60)
        assert r.status_code == 200 and r.headers.get("x-supermask-replica"), r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:  # a failure above: take the local Ray instance down with it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert "shutting down the fleet" in (tmp_path / "serve.log").read_text()
