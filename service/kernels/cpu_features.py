"""Which CPU compute precision "auto" means here: the CPU's dot-product instructions and the measured trade-off.

Reads torch's own capability report (``torch.cpu.get_capabilities()``), with ``/proc/cpuinfo`` flags as the
fallback; the products themselves are :mod:`service.kernels.cpu_hot`.
"""

from __future__ import annotations

import functools
import os
import re

import torch


def cpu_features() -> frozenset[str]:
    """Instruction-set features of this CPU, as lowercase cpuinfo-style names (``"avx512_vnni"``, ``"avx_vnni"``,
    ``"amx_int8"``, ``"avx512_bf16"``, ``"amx_bf16"``, ``"avx2"``, ``"avx512_f"``, ...).

    Source: torch's own report, ``torch.cpu.get_capabilities()`` (where torch has it, else
    ``torch._C._cpu._get_cpu_capability``; both read the CPU via cpuinfo), every key whose value is ``True``; plus ``"aten_<level>"`` for the ATen kernel
    dispatch level of ``torch.backends.cpu.get_cpu_capability()`` (e.g. ``"aten_avx512"``). Where torch reports
    nothing (older torch), the ``flags`` line of ``/proc/cpuinfo``, with ``avx512xx`` renamed ``avx512_xx`` to match
    torch's names. Empty if neither is readable. Cached after the first call.
    """
    return _cpu_features()


@functools.lru_cache(maxsize=1)
def _cpu_features() -> frozenset[str]:
    feats: set[str] = set()
    report = getattr(torch.cpu, "get_capabilities", None)
    try:
        caps = report() if report is not None else torch._C._cpu._get_cpu_capability()
        feats |= {str(k).lower() for k, v in caps.items() if v is True}
    except Exception:  # noqa: BLE001 - any failure of the report means "use the fallback"
        pass
    if not feats:
        feats |= _proc_cpuinfo_flags()
    try:
        feats.add("aten_" + torch.backends.cpu.get_cpu_capability().lower().replace(" ", "_"))
    except Exception:  # noqa: BLE001
        pass
    return frozenset(feats)


def _proc_cpuinfo_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """``flags`` of the first processor in ``path``, ``avx512f`` -> ``avx512_f`` etc.; empty if unreadable."""
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = line.partition(":")[2].split()
                    return {re.sub(r"^avx512(?!_)(\w+)$", r"avx512_\1", f.lower()) for f in flags}
    except OSError:
        pass
    return set()


#: int8 dot-product instructions (u8 x s8 -> s32 without the 16-bit saturation of vpmaddubsw)
INT8_DOT_FEATURES = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
#: bfloat16 dot-product instructions
BF16_DOT_FEATURES = frozenset({"avx512_bf16", "amx_bf16"})


def auto_precision(features: frozenset[str] | set[str] | None = None, rows: int | None = None,
                   int8_works: bool = True) -> str:
    """The hot-tier precision for a CPU.

    Args:
        features: as :func:`cpu_features` (default: this CPU's).
        rows: the typical number of token rows per product, if known; None: not considered.
        int8_works: whether the int8 products run in this process (the caller's
            ``service.kernels.cpu_hot.unavailable_reason("int8") is None``; this module imports no kernel).
    Returns:
        one of :data:`PRECISIONS`: ``"bf16"`` where a bfloat16 dot-product instruction exists
        (:data:`BF16_DOT_FEATURES`), except ``"int8"`` when ``rows`` is given, is at least :data:`INT8_MIN_ROWS`
        and an int8 one exists too; else ``"int8"`` where an int8 dot-product instruction exists
        (:data:`INT8_DOT_FEATURES`) and the int8 ops work in this process (``int8_works``); else
        ``"fp32"``.

    Why (measured here, avx512_vnni + avx512_bf16, no AMX; ms per MiniLM layer = 4 x [384, 384] + [1536, 384] +
    [384, 1536]): bf16 0.17 / 0.65 / 1.15 / 6.05 ms at 12 / 128 / 256 / 1408 rows against int8 (per-row
    activations) 0.30 / 0.72 / 1.15 / 5.72: the int8 GEMM is the fastest (0.82 ms for 1408 x [1536, 384] against
    bf16's 2.1) but the activation quantization's ~10 small torch ops (~25 us) and the zero-point pass over the
    output eat the gain below ~256 rows (~128 with Q|K|V fused into one [1152, 384]). Without VNNI the int8 path must
    use 7-bit activations (:attr:`HotWeight.act_qmax` 127) and u8 x s8 products without dot-product instructions;
    without avx512_bf16 / amx_bf16 oneDNN converts bf16 in software, so fp32 is the default there. int8's error is
    ~3x bf16's (per-matrix 2.0e-2 vs 7.5e-3; embedding cosine 0.9994 vs 0.99999; served GLUE dev figures: bf16
    within 0.4 points of fp32 on all six shipped bundles, int8 up to 1.4), so where both exist bf16 is the
    choice unless batches are known to be large (``rows``).
    """
    feats = cpu_features() if features is None else frozenset(features)
    has_int8 = bool(feats & INT8_DOT_FEATURES) and int8_works
    has_bf16 = bool(feats & BF16_DOT_FEATURES)
    if has_bf16 and (rows is None or not has_int8 or rows < INT8_MIN_ROWS):
        return "bf16"
    if has_int8:
        return "int8"
    return "fp32"


#: with bfloat16 dot products present, the row count from which int8 is faster than bf16 (see auto_precision)
INT8_MIN_ROWS = 256


ONEDNN_CACHE_ENV = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
"""oneDNN's primitive cache and PyTorch's ideep computation cache (both 1,024 entries by default, read from
these variables when first used)."""


def bound_onednn_caches(capacity: int) -> dict[str, str]:
    """Bound oneDNN's and ideep's shape-keyed caches to ``capacity`` entries each, unless the environment sets
    them already; returns the values in force. Must run before the process's first oneDNN primitive (the
    server calls it first thing in :func:`service.api.main.create_app`).

    Why: each distinct input shape of a bf16 / int8 product (rows x padded length, per segment, varies with
    every batch) leaves a primitive in each cache, holding memory. In-process on MiniLM bf16 (12 tasks, random
    batches of 1-64 rows, 2-core AMD EPYC, two runs side by side): RSS after 200 / 400 / 600 requests was
    857 / 887 / 906 MiB with the libraries' default of 1,024 entries, 778 / 774 / 774 MiB (770 at 800) with 64,
    and the capped run served 800 requests in the time the default one served 600; fixed-size batches stayed
    flat at 720 MiB with the defaults.
    """
    for name in ONEDNN_CACHE_ENV:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in ONEDNN_CACHE_ENV}
