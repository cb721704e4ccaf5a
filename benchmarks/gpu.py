"""GPU benchmark of the masked-matmul paths for mixed-task batches.

Measures, on random int8 weights of real model shapes (BERT-base: hidden 768,
intermediate 3072, 12 layers; MiniLM: 384 / 1536, 6 layers; the 6 masked
matrices per layer, run one after another on a [batch x seq, in] input):

1. Throughput (token rows per second through all masked matrices) of a batch
   mixing 1, 8 or 64 tasks, through
     * ``fused``: the segmented fused Triton kernel (one launch per matrix),
     * ``complement``: one dense fp16 cuBLAS product minus each task's sparse
       CSR correction,
   against ``dense``: a single task's dense fp16 cuBLAS matmul over
   pre-materialised ``deq(W) ⊙ μ`` weights (what serving one fine-tuned model
   costs). The ratio printed is path throughput / dense throughput.
2. Cold swap-in of one task's masks (BERT-base unless --models says otherwise):
   packed bundle bits in pinned host memory -> device -> kernel layout
   (fused path) or -> CSR of the pruned entries (complement path).
3. GPU memory per additional resident task, for both paths, measured with
   ``torch.cuda.memory_allocated`` and compared with a dense fp16 model copy.

Writes ``benchmarks/results/gpu-<UTC time>.json`` and ``.md`` (or --out-dir).
Needs CUDA; exits with a message otherwise. ``--device cpu`` runs the same
code in float32 on the CPU (the fused path only under ``TRITON_INTERPRET=1``):
a smoke check of the script, its figures mean nothing. On the CPU ``--models``
and ``--seq-len`` default to the ``tiny`` shape (2 layers, hidden 32,
intermediate 64) and 8 tokens, which the interpreter runs in seconds; real
shapes under the interpreter take tens of minutes. Example::

    .venv/bin/python benchmarks/gpu.py                 # full run (minutes on an H100)
    .venv/bin/python benchmarks/gpu.py --quick         # smoke run on the GPU
    TRITON_INTERPRET=1 .venv/bin/python benchmarks/gpu.py --device cpu --quick   # smoke run, no GPU

On a GPU machine without network, ``scripts/gpu_check.sh`` runs it with the
GPU tests and the end-to-end server benchmark (README, "GPU checks and benchmarks").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.nn import functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from service.kernels import sparse_complement as sc  # noqa: E402
from service.kernels import triton_masked as tm  # noqa: E402
from service.kernels.packing import pack_bits  # noqa: E402

MODELS = {
    "bert-base": {"hidden": 768, "intermediate": 3072, "layers": 12},
    "minilm": {"hidden": 384, "intermediate": 1536, "layers": 6},
    "tiny": {"hidden": 32, "intermediate": 64, "layers": 2},  # CPU smoke runs (Triton interpreter)
}
GPU_DEFAULTS = {"models": "bert-base,minilm", "seq_len": 128}
"""``--models`` and ``--seq-len`` when not given, on CUDA (the issue's shapes)."""
CPU_DEFAULTS = {"models": "tiny", "seq_len": 8}
"""``--models`` and ``--seq-len`` when not given, with ``--device cpu`` (a smoke run)."""
DEFAULT_RESULTS_DIR = REPO / "benchmarks" / "results"


def layer_shapes(model: str) -> list[tuple[int, int]]:
    """``[out, in]`` of every masked matrix: Q, K, V, attention output, intermediate, output per layer."""
    m = MODELS[model]
    h, i = m["hidden"], m["intermediate"]
    return [(h, h), (h, h), (h, h), (h, h), (i, h), (h, i)] * m["layers"]


@dataclass
class Matrix:
    """One masked matrix of the random backbone, with every resident task's mask in both layouts."""

    w_q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float32 [out]
    bias: torch.Tensor  # activation dtype (float16 on the GPU) [out]
    weight: torch.Tensor  # activation dtype [out, in], shared deq(W_q) for the complement path
    mask_words: torch.Tensor | None = None  # int32 [tasks, out, ceil(in/32)]
    pruned: list = field(default_factory=list)  # [tasks] CSR or None
    dense_task0: torch.Tensor | None = None  # activation dtype [out, in], deq(W_q) ⊙ μ_0 (the dense baseline)


def act_dtype(device: torch.device) -> torch.dtype:
    """Activation dtype: float16 on the GPU (what is measured); float32 on the CPU (smoke runs: CPU sparse
    products have no float16)."""
    return torch.float16 if device.type == "cuda" else torch.float32


def make_backbone(model: str, n_tasks: int, sparsity: float, device: torch.device,
                  with_fused: bool, seed: int = 0) -> list[Matrix]:
    """Random int8 backbone of ``model``'s shapes with ``n_tasks`` random masks of ``sparsity``."""
    dtype = act_dtype(device)
    g = torch.Generator(device=device).manual_seed(seed)
    mats = []
    for out, in_ in layer_shapes(model):
        w_q = torch.randint(-127, 128, (out, in_), dtype=torch.int8, device=device, generator=g)
        scale = torch.rand(out, device=device, generator=g) * 0.02 + 1e-3
        bias = torch.randn(out, device=device, generator=g).to(dtype)
        m = Matrix(w_q, scale, bias, sc.dequantize_weight(w_q, scale, dtype))
        words = []
        for t in range(n_tasks):
            mask = torch.rand(out, in_, device=device, generator=g) >= sparsity  # bool [out, in]
            packed = pack_bits(mask)  # the bundle's bytes
            if with_fused:
                words.append(tm.relayout_mask(packed, out, in_))
            m.pruned.append(sc.pruned_csr_from_mask(m.weight, mask))
            if t == 0:
                m.dense_task0 = (m.weight * mask).contiguous()
        if with_fused:
            m.mask_words = torch.stack(words)
        mats.append(m)
    return mats


def timed_ms(fn, warmup: int, iters: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def segments(batch: int, seq_len: int, n_tasks: int) -> tuple[list[int], list[int]]:
    """Sequences dealt round-robin to ``min(n_tasks, batch)`` tasks, rows grouped by task."""
    used = min(n_tasks, batch)
    counts = [batch // used + (1 if t < batch % used else 0) for t in range(used)]
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c * seq_len)
    return starts, list(range(used))


def bench_throughput(model: str, mats: list[Matrix], batches: list[int], task_mixes: list[int], seq_len: int,
                     sparsity: float, warmup: int, iters: int, device: torch.device, with_fused: bool,
                     log) -> list[dict]:
    """Rows/s of the dense baseline, the fused and the complement paths for every (batch, tasks)."""
    hidden = MODELS[model]["hidden"]
    inter = MODELS[model]["intermediate"]
    results = []
    for batch in batches:
        rows = batch * seq_len
        g = torch.Generator(device=device).manual_seed(batch)
        x_by_in = {d: torch.randn(rows, d, device=device, generator=g).to(act_dtype(device))
                   for d in (hidden, inter)}

        def dense():
            for m in mats:
                F.linear(x_by_in[m.w_q.shape[1]], m.dense_task0, m.bias)

        dense_ms = timed_ms(dense, warmup, iters, device)
        done = set()
        for n_tasks in task_mixes:
            starts, slots = segments(batch, seq_len, n_tasks)
            if len(slots) in done:  # the batch caps the task count: already measured
                continue
            done.add(len(slots))
            starts_dev = torch.tensor(starts, dtype=torch.int32, device=device)
            slots_dev = torch.tensor(slots, dtype=torch.int32, device=device)
            row = {"model": model, "batch": batch, "seq_len": seq_len, "rows": rows,
                   "tasks_in_batch": len(slots), "sparsity": sparsity, "dense_ms": dense_ms,
                   "dense_rows_per_s": rows / dense_ms * 1e3}

            def complement():
                for m in mats:
                    sc.segmented_complement_linear(x_by_in[m.w_q.shape[1]], m.weight, m.bias, m.pruned,
                                                   starts, slots)

            paths = {"complement": complement}
            if with_fused:
                def fused():
                    for m in mats:
                        tm.segmented_masked_linear_triton(x_by_in[m.w_q.shape[1]], m.w_q, m.scale, m.mask_words,
                                                          starts_dev, slots_dev, m.bias)
                paths = {"fused": fused, **paths}
            for name, fn in paths.items():
                try:
                    ms = timed_ms(fn, warmup, iters, device)
                    row[f"{name}_ms"] = ms
                    row[f"{name}_rows_per_s"] = rows / ms * 1e3
                    row[f"{name}_vs_dense"] = dense_ms / ms
                except RuntimeError as exc:  # e.g. a sparse op without fp16 support on this build
                    row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
            log(f"{model} batch={batch:4d} rows={rows:6d} tasks={len(slots):3d}  dense {dense_ms:8.2f} ms  "
                + "  ".join(f"{n} {row.get(f'{n}_ms', float('nan')):8.2f} ms ({row.get(f'{n}_vs_dense', 0):.2f}x)"
                            for n in paths))
            results.append(row)
        del x_by_in
    return results


def check_correctness(mats: list[Matrix], device: torch.device, with_fused: bool) -> dict:
    """Max |error| of each path vs the materialised dense product on the first two matrices (task 0)."""
    report = {}
    for k, m in enumerate(mats[:2]):
        x = torch.randn(256, m.w_q.shape[1], device=device).to(act_dtype(device))
        ref = F.linear(x.float(), m.dense_task0.float(), m.bias.float())
        denom = float(ref.abs().max())
        paths = {"complement": lambda: sc.complement_linear(x, m.weight, m.bias, m.pruned[0])}
        if with_fused:
            paths["fused"] = lambda: tm.masked_linear_triton(x, m.w_q, m.scale, m.mask_words[0].contiguous(), m.bias)
        for name, fn in paths.items():
            try:
                report[f"matrix{k}_{name}_max_rel_err"] = float((fn().float() - ref).abs().max()) / denom
            except RuntimeError as exc:  # e.g. float16 sparse products refused by this cuSPARSE: report, go on
                report[f"matrix{k}_{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return report


def bench_swap_in(model: str, sparsity: float, repeats: int, device: torch.device, with_fused: bool) -> dict:
    """Cold swap-in of one task's masks from pinned host bytes to the device layouts."""
    shapes = layer_shapes(model)
    g = torch.Generator().manual_seed(1)
    host = []
    for out, in_ in shapes:
        packed = pack_bits(torch.rand(out, in_, generator=g) >= sparsity)
        host.append(packed.pin_memory() if device.type == "cuda" else packed)
    weights = [torch.randn(out, in_, device=device).to(act_dtype(device)) for out, in_ in shapes]
    slots = [torch.empty(tm.mask_words_shape(out, in_), dtype=torch.int32, device=device) for out, in_ in shapes]
    nbytes = sum(p.numel() for p in host)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def fused():
        for (out, in_), packed, slot in zip(shapes, host, slots):
            slot.copy_(tm.relayout_mask(packed.to(device, non_blocking=True), out, in_))
        sync()

    def complement():
        for (out, in_), packed, w in zip(shapes, host, weights):
            sc.pruned_csr(w, packed.to(device, non_blocking=True))
        sync()

    def copy_only():
        for packed in host:
            packed.to(device, non_blocking=True)
        sync()

    result = {"model": model, "matrices": len(shapes), "packed_bytes": nbytes, "sparsity": sparsity}
    paths = {"copy_only": copy_only, "complement_csr": complement}
    if with_fused:
        paths = {"copy_only": copy_only, "fused_relayout": fused, "complement_csr": complement}
    for name, fn in paths.items():
        fn()  # warm-up: allocator, kernels
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        result[f"{name}_ms"] = statistics.median(times)
    return result


def bench_memory(model: str, sparsity: float, n_tasks: int, device: torch.device, with_fused: bool) -> dict:
    """Device bytes per additional resident task for each path (measured and counted)."""
    shapes = layer_shapes(model)
    n_weights = sum(o * i for o, i in shapes)
    weights = [torch.randn(o, i, device=device).to(act_dtype(device)) for o, i in shapes]
    masks = [[pack_bits(torch.rand(o, i, device=device) >= sparsity) for o, i in shapes] for _ in range(n_tasks)]

    def allocated() -> int:
        if device.type != "cuda":
            return 0
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(device)

    result = {"model": model, "masked_weights": n_weights, "sparsity": sparsity, "tasks_added": n_tasks,
              "mask_information_bytes": n_weights / 8, "dense_fp16_copy_bytes": n_weights * 2}
    if with_fused:
        before = allocated()
        held = [[tm.relayout_mask(p, o, i) for p, (o, i) in zip(task, shapes)] for task in masks]
        result["fused_measured_bytes_per_task"] = (allocated() - before) / n_tasks
        result["fused_counted_bytes_per_task"] = sum(w.numel() * 4 for w in held[0])
        del held
    before = allocated()
    held = [[sc.pruned_csr(w, p) for p, w in zip(task, weights)] for task in masks]
    result["complement_measured_bytes_per_task"] = (allocated() - before) / n_tasks
    result["complement_counted_bytes_per_task"] = sum(sc.csr_nbytes(c) for c in held[0])
    del held
    return result


def to_markdown(report: dict) -> str:
    """Human-readable tables of a report."""
    meta = report["meta"]
    lines = [f"# GPU benchmark ({meta['utc']})", "",
             f"Device: {meta['device']}; torch {meta['torch']}; triton {meta['triton']}; "
             f"seq len {meta['args']['seq_len']}; mask sparsity {meta['args']['sparsity']}.", "",
             "## Throughput (token rows/s through all masked matrices; ratio = path / dense single task)", "",
             "| model | batch | rows | tasks | dense rows/s | fused rows/s | fused/dense | complement rows/s "
             "| complement/dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["throughput"]:
        def cell(name, key):
            if f"{name}_error" in r:
                return "error"
            v = r.get(f"{name}_{key}")
            return "-" if v is None else (f"{v:,.0f}" if key == "rows_per_s" else f"{v:.2f}x")
        lines.append(f"| {r['model']} | {r['batch']} | {r['rows']} | {r['tasks_in_batch']} | "
                     f"{r['dense_rows_per_s']:,.0f} | {cell('fused', 'rows_per_s')} | {cell('fused', 'vs_dense')} | "
                     f"{cell('complement', 'rows_per_s')} | {cell('complement', 'vs_dense')} |")
    lines += ["", "## Cold swap-in of one task (pinned host packed bits -> device)", "",
              "| model | matrices | packed bytes | copy only ms | fused relayout ms | complement CSR ms |",
              "|---|---|---|---|---|---|"]
    for s in report["swap_in"]:
        lines.append(f"| {s['model']} | {s['matrices']} | {s['packed_bytes']:,} | {s['copy_only_ms']:.2f} | "
                     f"{s.get('fused_relayout_ms', float('nan')):.2f} | {s['complement_csr_ms']:.2f} |")
    lines += ["", "## Device memory per additional resident task", "",
              "| model | mask bits (bytes) | fused measured | complement measured | dense fp16 copy |",
              "|---|---|---|---|---|"]
    for m in report["memory"]:
        lines.append(f"| {m['model']} | {m['mask_information_bytes']:,.0f} | "
                     f"{m.get('fused_measured_bytes_per_task', float('nan')):,.0f} | "
                     f"{m['complement_measured_bytes_per_task']:,.0f} | {m['dense_fp16_copy_bytes']:,} |")
    lines += ["", "## Correctness (max |error| / max |output| vs the materialised dense product)", ""]
    for model, errs in report["correctness"].items():
        lines.append(f"- {model}: " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in errs.items()))
    return "\n".join(lines) + "\n"


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter)
    p.add_argument("--models", default=None,
                   help=f"comma list from {sorted(MODELS)} (default: {GPU_DEFAULTS['models']} on cuda, "
                        f"{CPU_DEFAULTS['models']} on cpu)")
    p.add_argument("--batches", default="1,4,16,64,256", help="comma list of batch sizes (sequences)")
    p.add_argument("--tasks", default="1,8,64", help="comma list: tasks mixed in one batch (capped at the batch)")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per sequence; rows = batch x seq-len (default: {GPU_DEFAULTS['seq_len']} on cuda, "
                        f"{CPU_DEFAULTS['seq_len']} on cpu)")
    p.add_argument("--sparsity", type=float, default=0.05, help="fraction of pruned weights in every random mask")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument("--iters", type=int, default=10, help="timed calls (median reported)")
    p.add_argument("--swap-repeats", type=int, default=10, help="timed cold swap-ins (median reported)")
    p.add_argument("--memory-tasks", type=int, default=8, help="tasks added when measuring memory per task")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS_DIR, help="where the JSON and Markdown go")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a float32 smoke run of this script on the CPU (fused path only under "
                        "TRITON_INTERPRET=1); its figures are not GPU figures")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: batches 1,16; tasks 1,8; 2 timed iterations; 3 swap-ins")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.tasks, args.iters, args.warmup, args.swap_repeats = "1,16", "1,8", 2, 1, 3
    defaults = CPU_DEFAULTS if args.device == "cpu" else GPU_DEFAULTS
    if args.models is None:
        args.models = defaults["models"]
    if args.seq_len is None:
        args.seq_len = defaults["seq_len"]
    if args.seq_len <= 0:
        p.error(f"--seq-len must be > 0, got {args.seq_len}")
    for name in args.models.split(","):
        if name not in MODELS:
            p.error(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    if not 0.0 <= args.sparsity <= 1.0:
        p.error(f"--sparsity must be in [0, 1], got {args.sparsity}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU, and torch.cuda.is_available() is False "
              f"(torch {torch.__version__}). Run it on a machine with an NVIDIA GPU and a CUDA build of torch.",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    with_fused = tm.HAS_TRITON and (device.type == "cuda" or interpreted)
    models = args.models.split(",")
    batches, task_mixes = _int_list(args.batches), _int_list(args.tasks)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if not with_fused:
        log("triton is not installed (or, on the CPU, TRITON_INTERPRET is not 1): "
            "measuring the dense baseline and the complement path only")
    report = {"meta": {"utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                       else f"CPU ({platform.machine()}, float32 smoke run: not GPU figures)",
                       "torch": torch.__version__,
                       "triton": getattr(tm.triton, "__version__", None), "python": platform.python_version(),
                       "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}},
              "throughput": [], "swap_in": [], "memory": [], "correctness": {}}
    for model in models:
        log(f"building {model}: {len(layer_shapes(model))} matrices, {max(task_mixes)} resident tasks")
        mats = make_backbone(model, max(task_mixes), args.sparsity, device, with_fused)
        report["correctness"][model] = check_correctness(mats, device, with_fused)
        report["throughput"] += bench_throughput(model, mats, batches, task_mixes, args.seq_len, args.sparsity,
                                                 args.warmup, args.iters, device, with_fused, log)
        del mats
        if device.type == "cuda":
            torch.cuda.empty_cache()
        report["swap_in"].append(bench_swap_in(model, args.sparsity, args.swap_repeats, device, with_fused))
        log(f"{model} swap-in: {report['swap_in'][-1]}")
        report["memory"].append(bench_memory(model, args.sparsity, args.memory_tasks, device, with_fused))
        log(f"{model} memory: {report['memory'][-1]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gpu-" + report["meta"]["utc"].replace(":", "").replace("-", "")
    json_path, md_path = args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(to_markdown(report))
    log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
