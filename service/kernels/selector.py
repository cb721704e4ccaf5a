"""Pick the masked-matmul path per device, mask sparsity and batch size.

Paths (module that implements each):

==================  =========================================================
``reference``       :mod:`service.kernels.reference` (any device; slow, exact)
``cpu_complement``  :func:`service.kernels.sparse_complement.complement_linear`
``cpu_dense``       :func:`service.kernels.cpu.masked_linear_dense`
``triton_fused``    :mod:`service.kernels.triton_masked` (CUDA, needs triton)
``gpu_complement``  :mod:`service.kernels.sparse_complement` (CUDA)
==================  =========================================================

Automatic rule (``override`` None, ``""`` or ``"auto"``):

* ``cpu``: ``cpu_complement`` when ``sparsity <= CPU_COMPLEMENT_MAX_SPARSITY``
  (0.25), else ``cpu_dense``.
* ``cuda``: ``triton_fused``, except ``gpu_complement`` when the masks prune
  very little (``sparsity <= GPU_COMPLEMENT_MAX_SPARSITY``, 0.02) and the batch
  is large (``rows >= GPU_COMPLEMENT_MIN_ROWS``, 4096 token rows, i.e. 32
  sequences of 128): there the dense cuBLAS product dominates and the sparse
  correction is small. Without triton, always ``gpu_complement``.
  The two GPU thresholds are first guesses, to be tuned with ``benchmarks/gpu.py``.
* any other device type: ``reference``.

For a mixed-task batch pass the largest sparsity among its tasks.

``override`` is the off-switch (the service reads it from its settings, e.g.
``SUPERMASK_KERNEL_PATH``; this module never reads the environment).
"""

from __future__ import annotations

from enum import Enum


class KernelPath(str, Enum):
    """The one vocabulary of masked-matmul paths (used by :class:`service.settings.Settings`,
    this selector and the engine); ``AUTO`` lets :func:`select_path` choose."""

    AUTO = "auto"
    REFERENCE = "reference"
    CPU_COMPLEMENT = "cpu_complement"
    CPU_DENSE = "cpu_dense"
    TRITON_FUSED = "triton_fused"
    GPU_COMPLEMENT = "gpu_complement"

    def __str__(self) -> str:
        return self.value


PATHS = tuple(p.value for p in KernelPath if p is not KernelPath.AUTO)
"""Every path name :func:`select_path` can return or accept as an override."""

AUTO = ("", KernelPath.AUTO.value)
"""Override values that mean "choose automatically" (as does None)."""

CPU_ONLY_PATHS = (KernelPath.CPU_COMPLEMENT.value, KernelPath.CPU_DENSE.value)
"""Paths that run only on the CPU (with ``device="auto"``: the off-switch for the CUDA paths)."""

DEVICE_TIER_PATHS = (KernelPath.TRITON_FUSED.value, KernelPath.GPU_COMPLEMENT.value, KernelPath.REFERENCE.value)
"""Paths the device tier can run (``reference``: exact, slow, any device)."""

CPU_COMPLEMENT_MAX_SPARSITY = 0.25
"""CPU: largest pruned fraction for which the sparse-complement path is chosen."""

GPU_COMPLEMENT_MAX_SPARSITY = 0.02
"""CUDA: largest pruned fraction for which the sparse-complement path may be chosen."""

GPU_COMPLEMENT_MIN_ROWS = 4096
"""CUDA: smallest batch (token rows) for which the sparse-complement path may be chosen."""

_CUDA_ONLY = (KernelPath.TRITON_FUSED.value, KernelPath.GPU_COMPLEMENT.value)


def _has_triton() -> bool:
    # imported only when a CUDA path is asked about: Settings imports this module (torch-free), and a CPU
    # server never loads triton
    from service.kernels import triton_masked

    return triton_masked.HAS_TRITON


def select_path(device_type: str, sparsity: float, rows: int, override: str | None) -> str:
    """Name of the masked-matmul path to use.

    Args:
        device_type: ``torch.device.type`` of the weights, e.g. ``"cpu"`` or ``"cuda"``.
        sparsity: fraction of pruned weights in ``[0, 1]`` (the largest among the batch's tasks).
        rows: token rows in the batch (sequences x sequence length), ``>= 0``.
        override: a name from :data:`PATHS` to force that path, or None / ``""`` /
            ``"auto"`` for the automatic rule (see the module docstring).

    Returns:
        One of :data:`PATHS`.

    Raises:
        ValueError: unknown override, an override that cannot run on ``device_type``
            (a CUDA path off CUDA, ``triton_fused`` without triton), or
            ``sparsity`` / ``rows`` out of range.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    if override is not None and override.strip().lower() not in AUTO:
        path = override.strip().lower()
        if path not in PATHS:
            raise ValueError(f"unknown kernel path {override!r}; allowed values: "
                             f"{', '.join(PATHS)} (or 'auto' / empty for automatic choice)")
        if path in _CUDA_ONLY and device_type != "cuda":
            raise ValueError(f"kernel path {path!r} needs a CUDA device, got device type {device_type!r}; "
                             f"allowed off CUDA: {', '.join(p for p in PATHS if p not in _CUDA_ONLY)}")
        if path == "triton_fused" and not _has_triton():
            raise ValueError("kernel path 'triton_fused' needs triton, which is not installed; "
                             f"allowed: {', '.join(p for p in PATHS if p != 'triton_fused')}")
        return path
    if device_type == "cpu":
        return "cpu_complement" if sparsity <= CPU_COMPLEMENT_MAX_SPARSITY else "cpu_dense"
    if device_type == "cuda":
        if not _has_triton():
            return "gpu_complement"
        if sparsity <= GPU_COMPLEMENT_MAX_SPARSITY and rows >= GPU_COMPLEMENT_MIN_ROWS:
            return "gpu_complement"
        return "triton_fused"
    return "reference"
