"""Kernel path selection and its off-switch."""

from __future__ import annotations

import pytest

from service.kernels import selector, triton_masked


@pytest.mark.parametrize("sparsity,expected", [(0.0, "cpu_complement"), (0.13, "cpu_complement"),
                                               (0.25, "cpu_complement"), (0.26, "cpu_dense"), (0.9, "cpu_dense")])
def test_cpu_rule(sparsity, expected):
    assert selector.select_path("cpu", sparsity, 128, None) == expected


@pytest.mark.parametrize("override", [None, "", "auto", "AUTO"])
def test_auto_values_use_the_rule(override):
    assert selector.select_path("cpu", 0.5, 1, override) == "cpu_dense"


def test_cuda_rule_with_triton(monkeypatch):
    monkeypatch.setattr(triton_masked, "HAS_TRITON", True)
    big = selector.GPU_COMPLEMENT_MIN_ROWS
    low = selector.GPU_COMPLEMENT_MAX_SPARSITY
    assert selector.select_path("cuda", 0.13, big * 4, None) == "triton_fused"
    assert selector.select_path("cuda", low, big - 1, None) == "triton_fused"
    assert selector.select_path("cuda", low, big, None) == "gpu_complement"
    assert selector.select_path("cuda", 0.0, big * 8, None) == "gpu_complement"


def test_cuda_without_triton_falls_back_to_complement(monkeypatch):
    monkeypatch.setattr(triton_masked, "HAS_TRITON", False)
    assert selector.select_path("cuda", 0.5, 1, None) == "gpu_complement"
    with pytest.raises(ValueError, match="needs triton"):
        selector.select_path("cuda", 0.5, 1, "triton_fused")


def test_other_devices_use_reference():
    assert selector.select_path("mps", 0.1, 8, None) == "reference"


@pytest.mark.parametrize("path", selector.PATHS)
def test_override_forces_path_on_cuda(monkeypatch, path):
    monkeypatch.setattr(triton_masked, "HAS_TRITON", True)
    assert selector.select_path("cuda", 0.01, 1, path) == path
    assert selector.select_path("cuda", 0.01, 1, f"  {path.upper()} ") == path


@pytest.mark.parametrize("path", ["reference", "cpu_complement", "cpu_dense"])
def test_override_on_cpu(path):
    assert selector.select_path("cpu", 0.9, 1, path) == path


def test_unknown_override_lists_allowed_values():
    with pytest.raises(ValueError) as err:
        selector.select_path("cpu", 0.1, 1, "fast")
    msg = str(err.value)
    assert "'fast'" in msg
    for path in selector.PATHS:
        assert path in msg


@pytest.mark.parametrize("path", ["triton_fused", "gpu_complement"])
def test_cuda_override_rejected_on_cpu(path):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        selector.select_path("cpu", 0.1, 1, path)


@pytest.mark.parametrize("sparsity,rows", [(-0.1, 1), (1.5, 1), (0.1, -1)])
def test_rejects_out_of_range_inputs(sparsity, rows):
    with pytest.raises(ValueError, match="sparsity|rows"):
        selector.select_path("cpu", sparsity, rows, None)
