"""Ahead-of-time compile of the fused Triton kernels for NVIDIA GPUs, on a machine without one.

Triton lowers a kernel through its whole CUDA pipeline (Triton IR -> TritonGPU
IR -> LLVM IR -> PTX -> cubin, with the ``ptxas`` its wheel ships) for a named
target (``triton.compile(ASTSource(...), target=GPUTarget("cuda", ARCH, 32))``)
without a driver or a device. This script does that for
:mod:`service.kernels.triton_masked`'s two kernels (one task, and the
mixed-task segmented one) over activation dtypes, target architectures
(sm_80 A100, sm_90 H100/H200) and the ``BLOCK_M`` tiles the wrappers pick
(:func:`service.kernels.triton_masked.pick_blocks`), with the wrappers'
``num_warps`` / ``num_stages``. For each it reports:

* whether the kernel compiles to a cubin (what the Triton interpreter, which
  the CPU tests use, cannot show);
* the tensor-core instruction ``tl.dot`` became (``wgmma.mma_async`` on
  sm_90 with 64-row tiles, ``mma.sync`` otherwise; none for float32, which
  runs the "ieee" dot on CUDA cores);
* shared memory bytes (Triton's figure), registers per thread and the
  per-thread stack frame, where register spills go (``cuobjdump
  --dump-resource-usage`` of the cubin, when the wheel ships it): a stack of
  kilobytes means the tile does not fit in registers.

The compile is the generic one: at launch Triton further specialises integer
arguments equal to 1 and 16-byte-aligned pointers, which only adds facts.
Figures are compile-time facts, not speeds (``benchmarks/gpu.py`` measures those).

Run it in a process where ``TRITON_INTERPRET`` is not 1 (the interpreter
replaces the kernels by Python functions that cannot be compiled)::

    .venv/bin/python benchmarks/kernel_compile.py                  # table on stdout
    .venv/bin/python benchmarks/kernel_compile.py --out benchmarks/results/kernel_compile

Exit status: 0 when every configuration compiled, 1 when one failed, 2 when
the script cannot run here (no triton, interpreter on, a Triton whose
``ASTSource`` API differs), each with a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from service.kernels import triton_masked as tm  # noqa: E402

KERNELS = ("single", "segmented")
"""``single``: ``_masked_linear_kernel``; ``segmented``: ``_segmented_masked_linear_kernel``."""

DTYPES = ("fp16", "bf16", "fp32")
"""Activation dtypes (Triton names) the wrappers accept."""

ROWS_PER_TILE = (1, 20, 100)
"""Rows per task segment whose ``BLOCK_M`` is compiled: 16, 32 and 64 under :func:`tm.pick_blocks`
(float32: 16, 32 and 32)."""

_POINTER_TYPES = {"w_ptr": "*i8", "scale_ptr": "*fp32", "m_ptr": "*i32",
                  "seg_starts_ptr": "*i32", "seg_slots_ptr": "*i32"}
"""Element types of the kernels' pointer arguments that do not follow the activation dtype
(x, y and bias follow it; the wrappers pass ``scale`` as the unused bias pointer when there is none)."""

_TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
"""Triton dtype name -> the torch dtype a launch would pass (it sets the tiles)."""

_CONSTEXPRS = ("HAS_BIAS", "IEEE", "SEG_BLOCK", "BLOCK_M", "BLOCK_N", "BLOCK_K")

_MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\.[\w.]*")
_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)")


class CannotRun(RuntimeError):
    """This process cannot compile the kernels (the message says why)."""


def _kernel(name: str):
    if not tm.HAS_TRITON:
        raise CannotRun("triton is not installed")
    fn = {"single": tm._masked_linear_kernel, "segmented": tm._segmented_masked_linear_kernel}[name]
    if os.environ.get("TRITON_INTERPRET") == "1" or not hasattr(fn, "arg_names"):
        raise CannotRun("TRITON_INTERPRET=1 makes the kernels interpreted Python functions; "
                        "run this script in a process without it")
    return fn


def signature(kernel: str, dtype: str, has_bias: bool) -> tuple[dict[str, str], dict[str, object]]:
    """Triton signature (argument name -> type) and constexpr values of one kernel argument list.

    Pointer types follow :func:`tm.masked_linear_triton` / :func:`tm.segmented_masked_linear_triton`
    launches; integer arguments are ``i32``; the constexprs are filled in by :func:`compile_one`.
    """
    fn = _kernel(kernel)
    sig: dict[str, str] = {}
    for name in fn.arg_names:
        if name in _CONSTEXPRS:
            sig[name] = "constexpr"
        elif name in ("x_ptr", "y_ptr"):
            sig[name] = f"*{dtype}"
        elif name == "bias_ptr":
            sig[name] = f"*{dtype}" if has_bias else "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = _POINTER_TYPES[name]
        else:
            sig[name] = "i32"
    return sig, {"HAS_BIAS": has_bias, "IEEE": dtype == "fp32"}


def _resource_usage(cubin: bytes) -> dict[str, int] | None:
    """Registers and stack bytes per thread of the cubin's kernel, from the wheel's ``cuobjdump``; None if absent."""
    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError):
        return None
    if not tool or not Path(tool).is_file():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=False)
    m = _RESOURCES.search(res.stdout)
    if res.returncode != 0 or m is None:
        return None
    return {"registers": int(m.group(1)), "stack_bytes": int(m.group(2))}


def compile_one(kernel: str, dtype: str, arch: int, rows_per_tile: int, has_bias: bool = True,
                num_segments: int = 64) -> dict:
    """Compile one configuration for ``sm_<arch>`` and describe the result.

    Args:
        kernel: one of :data:`KERNELS`. dtype: one of :data:`DTYPES`. arch: compute capability
            as an int (80, 90, ...). rows_per_tile: rows per task segment, which sets ``BLOCK_M``.
        has_bias: the ``HAS_BIAS`` branch. num_segments: sets the segmented kernel's ``SEG_BLOCK``.

    Returns:
        A dict: the configuration (``block_m``, ``block_n``, ``block_k``, ``num_warps``,
        ``num_stages``), ``ok`` and, when ok, ``shared_bytes`` (Triton's metadata), ``mma``
        (sorted tensor-core instruction kinds in the PTX), ``registers`` / ``stack_bytes`` per
        thread (None without ``cuobjdump``); else ``error`` (one line).

    Raises:
        CannotRun: this process cannot compile (see :class:`CannotRun`).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel(kernel)
    bm, bn, bk = tm.pick_blocks(rows_per_tile, None, None, None, _TORCH_DTYPES[dtype])
    sig, const = signature(kernel, dtype, has_bias)
    const.update(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    if kernel == "segmented":
        const["SEG_BLOCK"] = triton.next_power_of_2(num_segments)
    row = {"kernel": kernel, "dtype": dtype, "arch": f"sm_{arch}", "has_bias": has_bias, "block_m": bm,
           "block_n": bn, "block_k": bk, "num_warps": tm.NUM_WARPS, "num_stages": tm.NUM_STAGES}
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=const)
    except TypeError as exc:  # an older Triton keyed signatures by position
        raise CannotRun(f"triton {triton.__version__}'s ASTSource takes other arguments ({exc})") from exc
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": tm.NUM_WARPS, "num_stages": tm.NUM_STAGES})
    except Exception as exc:  # noqa: BLE001 - any compile failure is the finding, reported per row
        first = str(exc).strip().splitlines()
        return {**row, "ok": False, "error": f"{type(exc).__name__}: {first[0] if first else ''}"[:300]}
    usage = _resource_usage(compiled.asm["cubin"]) or {}
    return {**row, "ok": True,
            "shared_bytes": int(compiled.metadata.shared),
            "mma": sorted({m.group(1) for m in _MMA.finditer(compiled.asm["ptx"])}),
            "registers": usage.get("registers"), "stack_bytes": usage.get("stack_bytes")}


def run(kernels, dtypes, archs, rows_per_tile, bias_modes, log=print) -> list[dict]:
    """:func:`compile_one` over the product of the arguments, one logged line each; row counts that
    give the same tiles (float32 caps ``BLOCK_M`` at 32) are compiled once."""
    rows, seen = [], set()
    for kernel, dtype, arch, rpt, has_bias in itertools.product(kernels, dtypes, archs, rows_per_tile, bias_modes):
        key = (kernel, dtype, arch, tm.pick_blocks(rpt, None, None, None, _TORCH_DTYPES[dtype]), has_bias)
        if key in seen:
            continue
        seen.add(key)
        r = compile_one(kernel, dtype, arch, rpt, has_bias)
        rows.append(r)
        log(_line(r))
    return rows


def _line(r: dict) -> str:
    head = (f"{r['kernel']:9s} {r['dtype']} {r['arch']} M{r['block_m']:<2d} N{r['block_n']} K{r['block_k']} "
            f"bias={'y' if r['has_bias'] else 'n'}")
    if not r["ok"]:
        return f"{head}  FAILED {r['error']}"
    return (f"{head}  shared {r['shared_bytes']:6d} B  regs {r['registers']}  stack {r['stack_bytes']} B  "
            f"{','.join(r['mma']) or 'no tensor-core mma'}")


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = ["# Fused Triton kernels compiled ahead of time (no GPU)", "",
             "Produced by (from the repository root):", "", f"    {meta['command']}", "",
             f"triton {meta['triton']}, torch {meta['torch']}, python {meta['python']}, on {meta['machine']}. "
             "Compile-time facts per configuration (registers and stack frame per thread, where spills go, from "
             "`cuobjdump --dump-resource-usage`); not speeds.", "",
             "| kernel | dtype | arch | BLOCK_M×N×K | bias | compiles | tensor-core instruction | shared B "
             "| registers | stack B |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = (f"| {r['kernel']} | {r['dtype']} | {r['arch']} | {r['block_m']}×{r['block_n']}×{r['block_k']} "
                f"| {'yes' if r['has_bias'] else 'no'} ")
        if r["ok"]:
            lines.append(f"{head}| yes | {', '.join(r['mma']) or '— (CUDA cores)'} | {r['shared_bytes']:,} "
                         f"| {r['registers']} | {r['stack_bytes']} |")
        else:
            lines.append(f"{head}| **no**: {r['error']} | | | | |")
    return "\n".join(lines) + "\n"


def _csv(choices):
    def parse(text: str) -> list[str]:
        vals = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in vals if v not in choices]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)}")
        return vals
    return parse


def _int_list(minimum: int, what: str):
    """argparse type: a comma list of integers, each at least ``minimum`` (``what`` names them in the error)."""
    def parse(text: str) -> list[int]:
        try:
            vals = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            vals = []
        if not vals or any(v < minimum for v in vals):
            raise argparse.ArgumentTypeError(f"{text!r}: comma list of {what}")
        return vals
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--kernels", type=_csv(KERNELS), default=",".join(KERNELS), help="comma list")
    p.add_argument("--dtypes", type=_csv(DTYPES), default=",".join(DTYPES), help="comma list of activation dtypes")
    p.add_argument("--archs", type=_int_list(75, "compute capabilities >= 75, e.g. 80,90"), default="80,90",
                   help="comma list of compute capabilities (80 A100, 90 H100/H200)")
    p.add_argument("--rows-per-tile", type=_int_list(1, "positive integers"), default=",".join(map(str, ROWS_PER_TILE)),
                   help="rows per task segment; each sets BLOCK_M via pick_blocks")
    p.add_argument("--bias", choices=("yes", "no", "both"), default="yes", help="HAS_BIAS branch(es) to compile")
    p.add_argument("--out", type=Path, default=None,
                   help="write OUT.json and OUT.md (e.g. benchmarks/results/kernel_compile)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bias_modes = {"yes": [True], "no": [False], "both": [True, False]}[args.bias]
    try:
        rows = run(args.kernels, args.dtypes, args.archs, args.rows_per_tile, bias_modes)
    except CannotRun as exc:
        print(f"kernel_compile: cannot run here: {exc}", file=sys.stderr)
        return 2
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} configurations compiled", flush=True)
    if args.out is not None:
        import triton

        given = argv if argv is not None else sys.argv[1:]
        meta = {"command": "python benchmarks/kernel_compile.py " + " ".join(given),
                "triton": triton.__version__, "torch": torch.__version__, "python": platform.python_version(),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU needed"}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(to_markdown(meta, rows))
        print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
