"""The fused Triton kernels compile for real NVIDIA targets (sm_80, sm_90), checked without a GPU.

The interpreter tests (test_triton_masked.py) check the kernels' arithmetic on the CPU but never lower
them; this compiles both kernels through Triton's CUDA pipeline to cubins for A100 and H100/H200
(``benchmarks/kernel_compile.py``, in a subprocess: tests/conftest.py turns the interpreter on for this
one) and checks what the compiler made of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.kernels import triton_masked as tm

REPO = Path(__file__).resolve().parents[2]

requires_triton = pytest.mark.skipif(not tm.HAS_TRITON, reason="needs triton")

MAX_STACK_BYTES = 512
"""Per-thread stack frame (register spills) allowed. The float32 kernels with the half-precision tiles
spilled 616-8,816 bytes; the tiles :func:`tm.pick_blocks` picks now spill at most 48."""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("kernel_compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out / "cache")  # compile now, not read an earlier run's cubins
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernel_compile.py"), "--archs", "80,90",
         "--rows-per-tile", "1,100", "--out", str(out / "report")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode == 2 and "ASTSource takes other arguments" in proc.stderr:
        pytest.skip(proc.stderr.strip())  # a Triton older than this check's compile API
    assert proc.returncode == 0, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().count("\n| ") == len(report["rows"]) + 1  # header + one row each
    return report["rows"]


@requires_triton
def test_every_configuration_compiles_to_a_cubin(compiled):
    # 2 kernels x 3 dtypes x 2 targets x BLOCK_M 16 and 64 (32 for float32)
    assert len(compiled) == 24
    failed = [r for r in compiled if not r["ok"]]
    assert not failed, failed
    assert {(r["kernel"], r["dtype"], r["arch"]) for r in compiled} == {
        (k, d, a) for k in ("single", "segmented") for d in ("fp16", "bf16", "fp32") for a in ("sm_80", "sm_90")}


@requires_triton
def test_half_precision_dots_run_on_tensor_cores(compiled):
    for r in compiled:
        if r["dtype"] == "fp32":
            assert r["mma"] == [], r  # input_precision="ieee": exact float32 on CUDA cores
        elif r["arch"] == "sm_90" and r["block_m"] == 64:
            assert r["mma"] == ["wgmma.mma_async"], r  # Hopper's warp-group MMA
        else:
            assert r["mma"] == ["mma.sync"], r


@requires_triton
def test_no_large_register_spills(compiled):
    measured = [r for r in compiled if r["stack_bytes"] is not None]
    if not measured:
        pytest.skip("this Triton wheel ships no cuobjdump to read the cubins' resource usage")
    for r in measured:
        assert r["stack_bytes"] <= MAX_STACK_BYTES, r
        assert r["shared_bytes"] <= 100 * 1024, r  # fits the opt-in shared memory of sm_80 and sm_90


@requires_triton
def test_pick_blocks_depends_on_dtype():
    assert tm.pick_blocks(1, None, None, None, torch.float16) == (16, 128, 64)
    assert tm.pick_blocks(20, None, None, None, torch.bfloat16) == (32, 128, 64)
    assert tm.pick_blocks(1000, None, None, None, torch.float16) == (64, 128, 64)
    assert tm.pick_blocks(1, None, None, None, torch.float32) == (16, 64, 32)
    assert tm.pick_blocks(1000, None, None, None, torch.float32) == (32, 64, 32)
    assert tm.pick_blocks(1000, 64, 128, 64, torch.float32) == (64, 128, 64)  # given sizes win
    with pytest.raises(ValueError, match="block_k"):
        tm.pick_blocks(1, None, None, 48, torch.float16)
