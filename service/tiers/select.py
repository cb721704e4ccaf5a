"""The tier selector: one tier per engine, chosen once from its settings (never from the environment)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from backbone import Backbone
from service.dispatch import check_host_capacity, resolve_device
from service.encoder import LeanEncoder
from service.kernels import cpu_features, cpu_hot, ort_encoder
from service.kernels.selector import AUTO, DEVICE_TIER_PATHS, select_path
from service.masked_linear import MaskedLinear
from service.metrics import Metrics
from service.tasks import choose_path
from service.tiers.base import Tier

log = logging.getLogger(__name__)

LOW_PRECISIONS = ("bf16", "int8")
"""CPU precisions served by a hot tier (torch's or ONNX Runtime's)."""

RUNTIMES = ("auto", "torch", "onnxruntime")
"""Values of ``SUPERMASK_CPU_RUNTIME``: what runs a CPU hot tier's passes."""


def resolve_precision(precision: str, runtime: str = "torch") -> str:
    """The CPU compute precision to use: ``precision`` itself, or for "auto": "int8" where ONNX Runtime's int8 tier
    can run (``runtime`` "auto" or "onnxruntime", ONNX Runtime and its contrib ops present) and the CPU has int8
    dot-product instructions — the fastest tier measured here (README, "CPU precisions and runtimes") — else the
    one :func:`service.kernels.cpu_features.auto_precision` picks for this CPU and torch.

    Raises:
        ValueError: not one of auto, fp32, bf16, int8, or one this torch build / CPU cannot run.
    """
    p = str(precision).strip().lower()
    # ONNX Runtime may serve int8 here: the runtime allows it and its int8 contrib ops run
    ort_int8 = str(runtime).strip().lower() in ("auto", "onnxruntime") and ort_encoder.unavailable_reason() is None
    if p == "auto":
        feats = cpu_features.cpu_features()
        if ort_int8 and feats & cpu_features.INT8_DOT_FEATURES:
            return "int8"
        return cpu_features.auto_precision(feats, int8_works=cpu_hot.unavailable_reason("int8") is None)
    if p not in cpu_hot.PRECISIONS:
        raise ValueError(f"unknown CPU precision {precision!r}; allowed: auto, {', '.join(cpu_hot.PRECISIONS)}")
    reason = cpu_hot.unavailable_reason(p)
    if reason is not None and not (p == "int8" and ort_int8):
        raise ValueError(f"CPU precision {p!r} cannot run here ({reason}); use 'auto' or 'fp32'")
    return p


def resolve_runtime(runtime: str, precision: str, model: torch.nn.Module | None = None) -> str:
    """The runtime of a CPU tier in ``precision`` (resolved): "onnxruntime" or "torch".

    "auto" is "onnxruntime" for precision int8 where it can run (ONNX Runtime with its int8 contrib ops, the plain
    BERT layout of ``model`` when given), else "torch"; "onnxruntime" must run: precision int8, and the same
    conditions.

    Raises:
        ValueError: an unknown runtime, or "onnxruntime" where it cannot run (the message says why).
    """
    r = str(runtime).strip().lower()
    if r not in RUNTIMES:
        raise ValueError(f"unknown CPU runtime {runtime!r}; allowed: {', '.join(RUNTIMES)}")
    if r == "torch":
        return "torch"
    if precision != "int8":
        if r == "auto":
            return "torch"
        raise ValueError(f"CPU runtime 'onnxruntime' serves precision int8, not {precision!r} "
                         "(set SUPERMASK_CPU_PRECISION=int8)")
    reason = ort_encoder.unavailable_reason()
    if reason is None and model is not None:
        reason = LeanEncoder.unsupported(model)
    if reason is not None:
        if r == "auto":
            log.info("int8 runs on torch: ONNX Runtime's int8 tier cannot run here (%s)", reason)
            return "torch"
        raise ValueError(f"CPU runtime 'onnxruntime' cannot run here ({reason}); use SUPERMASK_CPU_RUNTIME=torch")
    return "onnxruntime"


def needs_model_forward(settings_device: str, kernel_path: str, precision: str, runtime: str = "auto") -> bool:
    """Whether an engine built with these settings runs the backbone model's own forward (the fp32 CPU
    tier, the device tier), i.e. cannot use a weights-only backbone (:mod:`backbone.weights_only`).

    Raises:
        ValueError: as :func:`service.dispatch.resolve_device` and :func:`resolve_precision`.
    """
    if resolve_device(settings_device, kernel_path).type != "cpu":
        return True
    return resolve_precision(precision, runtime) not in LOW_PRECISIONS


def select_tier(backbone: Backbone, wrap: Callable[[], dict[str, MaskedLinear]], metrics: Metrics, *, cache_bytes: int,
                kernel_path: str = "auto", device: str = "auto", device_slots: int = 16, precision: str = "fp32",
                runtime: str = "auto", hot_cache_bytes: int = 256 * 1024 * 1024,
                emulate_device_path: str | None = None, hot_policy: dict | None = None) -> Tier:
    """The tier an engine with these settings serves through (arguments as :class:`service.engine.Engine`'s).

    ``wrap`` replaces the backbone's masked modules by :class:`MaskedLinear` layers and returns them; it is called
    once every setting has been checked, so a refused setting leaves the backbone as it was.

    Raises:
        ValueError: a kernel path or device that cannot run here, an unknown precision or runtime, a forced
            CPU kernel path with a precision other than fp32, a weights-only backbone on a tier that runs the
            model's own forward, or (device tier) a host cache too small for ``device_slots`` tasks.
    """
    dev = resolve_device(device, kernel_path)
    if emulate_device_path is not None:
        if dev.type != "cpu":
            raise ValueError(f"emulate_device_path is a test hook for device 'cpu', device is {dev}")
        if emulate_device_path not in DEVICE_TIER_PATHS:
            raise ValueError(f"emulate_device_path must be one of {DEVICE_TIER_PATHS}, got {emulate_device_path!r}")
    if dev.type == "cuda" or emulate_device_path is not None:
        override = emulate_device_path or kernel_path
        select_path("cuda", 0.5, 0, override)  # rejects triton_fused without triton
        check_host_capacity(backbone, cache_bytes, device_slots)
        _refuse_weights_only(backbone)
        from service.tiers.cuda import DeviceTier

        return DeviceTier(backbone, wrap(), dev, override, device_slots, metrics)
    choose_path(0.5, kernel_path)  # reject a path that cannot run here before any task is loaded
    p = resolve_precision(precision, runtime if kernel_path in AUTO else "torch")
    if p in LOW_PRECISIONS and kernel_path not in AUTO:
        raise ValueError(f"kernel path {kernel_path!r} is an fp32 CPU path; it cannot run with CPU precision "
                         f"{p!r} (set SUPERMASK_CPU_PRECISION=fp32 or SUPERMASK_KERNEL_PATH=auto)")
    if p not in LOW_PRECISIONS:
        _refuse_weights_only(backbone)
        from service.tiers.cpu_reference import CpuReferenceTier

        return CpuReferenceTier(backbone, wrap())
    if resolve_runtime(runtime, p, backbone.model) == "onnxruntime":
        from service.tiers.onnxruntime import OrtTier

        return OrtTier(backbone, wrap(), hot_cache_bytes, metrics, threads=torch.get_num_threads(),
                       hot_policy=hot_policy)
    if backbone.weights_only and LeanEncoder.unsupported(backbone.model) is not None:
        _refuse_weights_only(backbone)
    from service.tiers.cpu_hot import CpuHotTier

    return CpuHotTier(backbone, wrap(), p, hot_cache_bytes, metrics, hot_policy=hot_policy)


def _refuse_weights_only(backbone: Backbone) -> None:
    if backbone.weights_only:
        raise ValueError("a weights-only backbone (load_backbone(weights_only=True)) has no forward of its own: "
                         "it serves only through the CPU hot tier (precision bf16 / int8, plain BERT layout)")
