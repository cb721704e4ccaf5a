"""Where the CPU server's resident memory goes: task state versus allocator retention.

``benchmarks/serve_cpu.py`` reports the server's RSS growing far more than the
resident task state it loads (``supermask_resident_task_bytes``). This script
separates the two, in one process over the real backbone and the shipped
example bundles:

1. RSS with the backbone loaded and wrapped by an :class:`~service.engine.Engine`;
2. RSS after each task is made resident (``Engine.warm``), beside the sum of the
   tasks' resident bytes;
3. RSS after ``malloc_trim(0)`` (glibc; skipped elsewhere), which hands freed heap
   memory back to the OS: what it releases was freed by the process but kept by
   the allocator, not held by the server;
4. the same after one batch-32 predict per task (activation buffers);
5. churn: ``--rounds`` rounds of swapping every task in and dropping it again
   (``Engine.warm`` + ``Engine.invalidate``), with RSS after each round: bounded
   when the loads leak nothing.

Writes ``benchmarks/results/memory_cpu.json`` and ``.md`` and prints the table.

    .venv/bin/python benchmarks/memory_cpu.py
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MiB = 2**20


def rss_bytes() -> int:
    """Resident set size of this process (bytes), from ``/proc/self/statm`` (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim():
    """glibc's ``malloc_trim`` as a callable, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def measure(backbone_dir: str | None, examples_dir: str, rounds: int = 3, batch: int = 32,
            threads: int | None = 1) -> dict:
    """Run the five steps of the module docstring; every figure in bytes.

    Raises:
        FileNotFoundError: ``examples_dir`` holds no bundle.
    """
    import torch

    from mask_store.local import LocalMaskStore
    from backbone import load_backbone
    from service.engine import Engine, PredictRequest
    from service.metrics import Metrics

    if threads:
        torch.set_num_threads(threads)
    trim = _malloc_trim()
    backbone = load_backbone(backbone_dir)
    store = LocalMaskStore(tempfile.mkdtemp(prefix="supermask-memory-"))
    store.seed_from(examples_dir)
    tasks = store.tasks()
    if not tasks:
        raise FileNotFoundError(f"no task bundles in {examples_dir}")
    engine = Engine(backbone, store, Metrics(), cache_bytes=2**40, device="cpu")  # a CPU benchmark, also on a GPU machine
    out: dict = {"malloc_trim": trim is not None, "tasks": {}, "rss": {"backbone": rss_bytes()}}

    def trimmed(key: str) -> None:
        if trim is not None:
            trim(0)
            out["rss"][key] = rss_bytes()

    for name in tasks:
        entry = engine.warm(name)
        out["tasks"][name] = {"resident_bytes": entry.nbytes, "rss_after_warm": rss_bytes()}
    out["resident_task_bytes"] = sum(t["resident_bytes"] for t in out["tasks"].values())
    out["rss"]["all_tasks_warm"] = rss_bytes()
    trimmed("all_tasks_warm_trimmed")
    for name in tasks:
        header = engine.warm(name).header
        row = ("the film is a quiet , sincere piece of work " * 2, "it is a sincere film ." if header.text_pairs
               else None)
        engine.predict(PredictRequest(name, tuple(row for _ in range(batch))))
    out["rss"]["after_predicts"] = rss_bytes()
    trimmed("after_predicts_trimmed")
    out["churn_rss"] = []
    for _ in range(rounds):
        for name in tasks:
            engine.warm(name)
            engine.invalidate(name)
        out["churn_rss"].append(rss_bytes())
    return out


def markdown(res: dict, command: str) -> str:
    r = res["rss"]
    md = ["# Resident memory of the CPU engine", "", "Produced by (from the repository root):", "",
          f"    {command}", "",
          f"{res['hardware']['cpus']} CPUs, {res['hardware']['machine']}, python {res['hardware']['python']}; "
          f"RSS from /proc/self/statm; malloc_trim {'available (glibc)' if res['malloc_trim'] else 'unavailable'}.", "",
          "| step | RSS MiB | over backbone MiB |", "|---|---|---|"]
    base = r["backbone"]
    labels = {"backbone": "backbone loaded, engine built",
              "all_tasks_warm": f"{len(res['tasks'])} tasks resident",
              "all_tasks_warm_trimmed": "… after malloc_trim(0)",
              "after_predicts": "… after one batch-32 predict per task",
              "after_predicts_trimmed": "… after malloc_trim(0)"}
    for k, label in labels.items():
        if k in r:
            md.append(f"| {label} | {r[k] / MiB:.0f} | {(r[k] - base) / MiB:+.0f} |")
    md += ["", f"Resident task state (sum of `supermask_resident_task_bytes`): "
               f"{res['resident_task_bytes'] / MiB:.1f} MiB.", "",
           "| task | resident MiB | RSS after its swap-in MiB |", "|---|---|---|"]
    for name, t in res["tasks"].items():
        md.append(f"| {name} | {t['resident_bytes'] / MiB:.2f} | {t['rss_after_warm'] / MiB:.0f} |")
    md += ["", "Churn (every task swapped in and dropped again, per round), RSS MiB: "
               + ", ".join(f"{x / MiB:.0f}" for x in res["churn_rss"])]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    from supermask.cli import HelpFormatter

    ap = argparse.ArgumentParser(prog="memory_cpu.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--backbone", help="local Hugging Face encoder folder (default: all-MiniLM-L6-v2)")
    ap.add_argument("--examples-dir", default=str(REPO / "examples" / "masks"), help="task bundles to load")
    ap.add_argument("--rounds", type=int, default=3, help="churn rounds (swap every task in and drop it)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "memory_cpu"),
                    help="output path without suffix (.json and .md are written)")
    args = ap.parse_args(argv)
    res = measure(args.backbone, args.examples_dir, rounds=args.rounds, threads=args.threads)
    res["hardware"] = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    command = " ".join([".venv/bin/python benchmarks/memory_cpu.py", *(argv if argv is not None else sys.argv[1:])])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, **res}, indent=2))
    md = markdown(res, command)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
