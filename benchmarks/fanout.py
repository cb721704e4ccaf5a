"""Fan-out latency: one ``POST /v1/predict`` answering 1 input x N tasks, against N separate predict calls.

Starts ``supermask serve`` on a loopback port over the real backbone (or ``--backbone DIR``) with N random-mask
single-sentence tasks (``benchmarks/synthetic.py``: timings depend on shapes, not on weight values), then,
round by round and interleaved (each round runs the three in a rotating order, so drift in machine load
falls on all of them alike), times

* ``fanout``: one fan-out call, ``{"inputs": [text], "tasks": [N names]}`` (one mixed-task pass of N rows);
* ``separate, sequential``: N predict calls, one after another (what a client of one-model-per-task
  servers does without concurrency);
* ``separate, concurrent``: the N calls sent at once (the server's micro-batcher may gather them).

Prints one line per figure with the ratio to the fan-out call and writes
``benchmarks/results/fanout_cpu.json`` and ``.md``.

    .venv/bin/python benchmarks/fanout.py                       # 6 tasks, 40 rounds, 2 torch threads
    .venv/bin/python benchmarks/fanout.py --tasks 6 --rounds 100 --precision fp32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import serve_cpu  # noqa: E402
from benchmarks.cpu_peers import cpu_model, write_tasks  # noqa: E402

TEXT = "the film is a quiet triumph of performance and restraint"


def fanout_ms(client: httpx.Client, tasks: list[str], text: str) -> float:
    t0 = time.perf_counter()
    r = client.post("/v1/predict", json={"inputs": [text], "tasks": tasks})
    r.raise_for_status()
    assert len(r.json()["results"]) == len(tasks)
    return (time.perf_counter() - t0) * 1e3


def sequential_ms(client: httpx.Client, tasks: list[str], text: str) -> float:
    t0 = time.perf_counter()
    for t in tasks:
        client.post(f"/v1/tasks/{t}/predict", json={"inputs": [text]}).raise_for_status()
    return (time.perf_counter() - t0) * 1e3


async def _concurrent(client: httpx.AsyncClient, tasks: list[str], text: str) -> float:
    t0 = time.perf_counter()
    rs = await asyncio.gather(*(client.post(f"/v1/tasks/{t}/predict", json={"inputs": [text]}) for t in tasks))
    for r in rs:
        r.raise_for_status()
    return (time.perf_counter() - t0) * 1e3


def summary(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"rounds": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "mean_ms": float(a.mean())}


def measure(base_url: str, tasks: list[str], rounds: int, text: str = TEXT) -> dict:
    """Interleaved rounds of the three ways of asking every task of ``tasks`` about ``text``; one warm-up round
    first. Returns ``{"fanout", "separate_sequential", "separate_concurrent"}`` summaries (milliseconds)."""
    times: dict[str, list[float]] = {"fanout": [], "separate_sequential": [], "separate_concurrent": []}
    loop = asyncio.new_event_loop()
    try:
        with httpx.Client(base_url=base_url, timeout=120) as client:
            aclient = httpx.AsyncClient(base_url=base_url, timeout=120)
            runs = {"fanout": lambda: fanout_ms(client, tasks, text),
                    "separate_sequential": lambda: sequential_ms(client, tasks, text),
                    "separate_concurrent": lambda: loop.run_until_complete(_concurrent(aclient, tasks, text))}
            names = list(runs)
            for name in names:  # warm-up: every task loaded (and promoted), every path run once
                runs[name]()
            for i in range(rounds):
                for name in names[i % 3:] + names[:i % 3]:
                    times[name].append(runs[name]())
            loop.run_until_complete(aclient.aclose())
    finally:
        loop.close()
    return {k: summary(v) for k, v in times.items()}


def markdown(res: dict) -> str:
    hw, cfg, fig = res["hardware"], res["config"], res["figures"]
    base = fig["fanout"]["p50_ms"]
    lines = [f"# Fan-out: 1 input x {cfg['tasks']} tasks in one call against {cfg['tasks']} predict calls", "",
             f"`{cfg['command']}` — {hw['cpu_model']}, {hw['logical_cpus']} logical CPUs, "
             f"{cfg['torch_threads']} torch threads, CPU precision `{cfg['precision']}`, loopback HTTP, "
             f"{cfg['rounds']} interleaved rounds, torch {hw['torch']}; load average at start "
             f"{hw['loadavg_start']:.1f} (a machine shared with other jobs: the ratios, measured round by round "
             f"side by side, are the figures to read).", "",
             "| how | p50 ms | p90 ms | mean ms | p50 / fan-out p50 |", "|---|---|---|---|---|"]
    for name, label in (("fanout", "one fan-out call (one mixed-task pass)"),
                        ("separate_sequential", f"{cfg['tasks']} predict calls, sequential"),
                        ("separate_concurrent", f"{cfg['tasks']} predict calls, concurrent")):
        f = fig[name]
        lines.append(f"| {label} | {f['p50_ms']:.1f} | {f['p90_ms']:.1f} | {f['mean_ms']:.1f} | "
                     f"{f['p50_ms'] / base:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", type=int, default=6, help="tasks per fan-out call")
    p.add_argument("--rounds", type=int, default=40, help="interleaved timed rounds")
    p.add_argument("--threads", type=int, default=2, help="server torch threads")
    p.add_argument("--precision", default="auto", help="SUPERMASK_CPU_PRECISION of the server")
    p.add_argument("--backbone", help="local encoder folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder for fanout_cpu.json / .md")
    args = p.parse_args(argv)
    from backbone import default_backbone_path

    import torch

    loadavg = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="supermask-fanout-"))
    try:
        names = write_tasks(Path(args.backbone) if args.backbone else default_backbone_path(), work / "tasks",
                            args.tasks, 0.05)
        env = {"SUPERMASK_CPU_PRECISION": args.precision, "SUPERMASK_MAX_FANOUT_TASKS": str(max(16, args.tasks))}
        if args.backbone:
            env["SUPERMASK_BACKBONE_PATH"] = args.backbone
        proc, port = serve_cpu.start_server(str(work / "tasks"), args.threads, env)
        try:
            base_url = f"http://127.0.0.1:{port}"
            with httpx.Client(base_url=base_url) as c:
                serve_cpu.wait_ready(c, proc)
                precision = c.get("/healthz").json()["precision"]
            figures = measure(base_url, names, args.rounds)
        finally:
            proc.terminate()
            proc.wait(30)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {"hardware": {"cpu_model": cpu_model(), "logical_cpus": os.cpu_count(), "machine": platform.machine(),
                        "torch": torch.__version__, "loadavg_start": loadavg},
           "config": {"tasks": args.tasks, "rounds": args.rounds, "torch_threads": args.threads, "precision": precision,
                      "command": "benchmarks/fanout.py " + " ".join(argv if argv is not None else sys.argv[1:])},
           "figures": figures}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fanout_cpu.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (out / "fanout_cpu.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
