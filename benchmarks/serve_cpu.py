"""End-to-end CPU benchmark of the REST server on the real backbone.

Starts ``supermask serve`` as a subprocess on a loopback port with a fresh
store preloaded from the shipped example bundles, then measures, through HTTP:

* GLUE dev metrics of every shipped task, predicted through ``POST /v1/tasks/{task}/predict``;
* cold-task swap-in time (``supermask_task_load_duration_seconds``) per task;
* steady-state request latency p50/p99 at batch 1 and batch 32 (bounded request counts);
* server resident memory with the backbone only, with 1 task and with all tasks loaded;
* a mixed-task load: ``--concurrency`` loopback clients each sending single-input requests to the
  shipped tasks in turn (``--mixed-requests`` in all), p50/p99 latency and throughput, against a
  second server started with dynamic batching off (``SUPERMASK_BATCHING=false``), same machine, same run.

Writes ``benchmarks/results/serve_<device>.json`` and ``.md`` and prints the table.

    .venv/bin/python benchmarks/serve_cpu.py --data-dir ../shared/data/glue
    .venv/bin/python benchmarks/serve_cpu.py --device cuda --synthetic bert-base --synthetic-tasks 64

``--synthetic MODEL`` serves a random-weight backbone of MODEL's shape (``benchmarks/synthetic.py``:
MiniLM or BERT-base, real tokenizer) with ``--synthetic-tasks`` random-mask tasks instead of the
shipped bundles: latency, swap-in and memory figures of that shape, no dev metrics. It needs neither
the backbone package's weights nor network, only a tokenizer folder (``--tokenizer-dir``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import synthetic  # noqa: E402
from training.glue import compute_metrics, get_task, read_split  # noqa: E402

# inputs of the synthetic tasks when no GLUE data is at hand (short sentences, as in SST-2 and MRPC)
FALLBACK_SENTENCES = [
    "the film is a quiet triumph of performance and restraint",
    "a dull , overlong exercise in style over substance",
    "the company said quarterly revenue rose four percent on strong demand",
    "revenue for the quarter grew by four percent , the company reported",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_value(text: str, name: str, labels: str = "") -> float | None:
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return None


def wait_ready(client: httpx.Client, proc: subprocess.Popen, timeout_s: float = 180) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        try:
            if client.get("/healthz").status_code == 200:
                return time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become ready")


def dev_eval(client: httpx.Client, task_name: str, data_dir: str, batch: int = 32) -> dict:
    task = get_task(task_name)
    dev = read_split(task, data_dir, "dev")
    preds = []
    info = client.get(f"/v1/tasks/{task_name}").json()
    labels = info["labels"]
    for i in tqdm(range(0, len(dev), batch), desc=f"{task_name} dev via REST", leave=False):
        chunk = dev[i : i + batch]
        inputs = [[e.text_a, e.text_b] if e.text_b is not None else e.text_a for e in chunk]
        r = client.post(f"/v1/tasks/{task_name}/predict", json={"inputs": inputs})
        r.raise_for_status()
        for p in r.json()["predictions"]:
            preds.append(p["value"] if "value" in p else labels.index(p["label"]))
    golds = np.array([e.label for e in dev])
    return {"dev_examples": len(dev), **compute_metrics(task, np.array(preds), golds)}


def latency(client: httpx.Client, task: str, texts: list, batch: int, n: int) -> dict:
    payload = {"inputs": texts[:batch]}
    client.post(f"/v1/tasks/{task}/predict", json=payload).raise_for_status()  # warm
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.post(f"/v1/tasks/{task}/predict", json=payload).raise_for_status()
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {"batch": batch, "requests": n, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def start_server(examples_dir: str, threads: int | None, extra_env: dict[str, str] | None = None
                 ) -> tuple[subprocess.Popen, int]:
    """``supermask serve`` on a free loopback port with a fresh store preloaded from ``examples_dir``.

    Started as ``python -m supermask.cli serve`` with this interpreter, so it also runs where the project
    is on ``PYTHONPATH`` rather than installed (no ``supermask`` executable)."""
    port = free_port()
    store = tempfile.mkdtemp(prefix="supermask-bench-")
    env = dict(os.environ, SUPERMASK_STORE_DIR=store, SUPERMASK_EXAMPLES_DIR=examples_dir,
               SUPERMASK_PORT=str(port), SUPERMASK_LOG_LEVEL="WARNING", HF_HUB_OFFLINE="1", **(extra_env or {}))
    if threads:
        env["SUPERMASK_TORCH_THREADS"] = str(threads)
    return subprocess.Popen([sys.executable, "-m", "supermask.cli", "serve"], env=env, cwd=REPO), port


def mixed_load(base_url: str, inputs: dict[str, list], concurrency: int, n: int) -> dict:
    """``n`` single-input predict requests from ``concurrency`` concurrent clients, cycling over the
    tasks of ``inputs`` (task -> JSON inputs); latency percentiles (ms) and throughput (requests/s)."""
    import asyncio

    tasks = sorted(inputs)
    plan = [(tasks[i % len(tasks)], inputs[tasks[i % len(tasks)]][(i // len(tasks)) % len(inputs[tasks[0]])])
            for i in range(n)]

    async def run() -> tuple[list[float], float]:
        times: list[float] = []
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            for task in tasks:  # warm: every task resident before timing
                (await client.post(f"/v1/tasks/{task}/predict", json={"inputs": inputs[task][:1]})).raise_for_status()

            async def worker(queue, record):
                while queue:
                    task, x = queue.pop()
                    t0 = time.perf_counter()
                    r = await client.post(f"/v1/tasks/{task}/predict", json={"inputs": [x]})
                    r.raise_for_status()
                    if record:
                        times.append(time.perf_counter() - t0)

            # untimed round of mixed batches first: on a GPU each new batch shape compiles a kernel variant once
            warm = list(reversed(plan[: min(n, 4 * concurrency)]))
            await asyncio.gather(*(worker(warm, False) for _ in range(concurrency)))
            queue = list(reversed(plan))
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(queue, True) for _ in range(concurrency)))
            return times, time.perf_counter() - t0

    times, wall = asyncio.run(run())
    ms = np.array(times) * 1e3
    return {"requests": n, "concurrency": concurrency, "tasks": len(tasks), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "throughput_rps": n / wall}


def glue_inputs(data_dir: str, task: str, n: int) -> list | None:
    """The first ``n`` dev inputs of GLUE ``task`` as JSON inputs (strings or pairs), or None without data."""
    try:
        dev = read_split(get_task(task), data_dir, "dev")[:n]
    except (OSError, ValueError):
        return None
    return [[e.text_a, e.text_b] if e.text_b is not None else e.text_a for e in dev] or None


def synthetic_inputs(data_dir: str, pairs: bool, n: int) -> list:
    """Inputs for a synthetic task: SST-2 sentences or MRPC pairs when the data is at hand, else fixed ones."""
    found = glue_inputs(data_dir, "MRPC" if pairs else "SST-2", n)
    if found:
        return found
    s = FALLBACK_SENTENCES
    return [[s[i % 4], s[(i + 1) % 4]] if pairs else s[i % 4] for i in range(n)]


def prepare_synthetic(args, work: Path) -> tuple[str, dict[str, str]]:
    """Random backbone and tasks under ``work``; returns the examples folder and the server's extra env."""
    print(f"writing a random {args.synthetic} backbone and {args.synthetic_tasks} random-mask tasks "
          f"(sparsity {args.synthetic_sparsity}) under {work}", flush=True)
    backbone_dir = synthetic.write_backbone(args.synthetic, work / "backbone", args.tokenizer_dir)
    tasks_dir = work / "tasks"
    synthetic.write_tasks(backbone_dir, tasks_dir, args.synthetic_tasks, args.synthetic_sparsity)
    total = sum(f.stat().st_size for f in tasks_dir.glob("*.smask"))
    env = {"SUPERMASK_BACKBONE_PATH": str(backbone_dir),
           # every task resident: the host cache and the GPU slots hold them all (measured: no eviction churn)
           "SUPERMASK_CACHE_BYTES": str(max(256 * 2**20, 8 * total)),
           "SUPERMASK_DEVICE_SLOTS": str(args.synthetic_tasks),
           "SUPERMASK_MAX_BUNDLE_BYTES": str(max(64 * 2**20, 2 * total // args.synthetic_tasks))}
    return str(tasks_dir), env


GLUE_NAMES = ("CoLA", "SST-2", "MRPC", "STS-B", "RTE", "WNLI")


def task_inputs(data_dir: str, name: str, pairs: bool, n: int = 16) -> list:
    """``n`` JSON inputs for task ``name``: its GLUE dev inputs where it is a GLUE task and the data is there."""
    return (glue_inputs(data_dir, name, n) if name in GLUE_NAMES else None) or synthetic_inputs(data_dir, pairs, n)


def record_memory(results: dict, metrics_text: str, when: str) -> None:
    """Process RSS and GPU memory allocated (0 without CUDA) from a /metrics page, as ``<kind>_<when>_bytes``."""
    results[f"rss_{when}_bytes"] = metric_value(metrics_text, "supermask_process_resident_memory_bytes")
    results[f"gpu_allocated_{when}_bytes"] = metric_value(metrics_text, "supermask_gpu_memory_allocated_bytes")


def measure(args, examples_dir: str, device_env: dict[str, str]) -> dict:
    """Everything the tables report, from a batching server and (for the mixed load) an unbatched one."""
    proc, port = start_server(examples_dir, args.threads,
                              {**device_env, "SUPERMASK_BATCH_WAIT_MS": str(args.batch_wait_ms)})
    results: dict = {"hardware": {"machine": platform.machine(), "cpus": os.cpu_count(),
                                  "python": platform.python_version(), "device": args.device}}
    mixed_inputs: dict[str, list] = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            results["start_to_ready_s"] = round(wait_ready(client, proc), 2)
            tasks = [t["name"] for t in client.get("/v1/tasks").json()["tasks"]]
            m = client.get("/metrics").text
            record_memory(results, m, "backbone_only")
            results["backbone_bytes"] = metric_value(m, "supermask_backbone_bytes")
            per_task, pairs = {}, {}
            for i, name in enumerate(tqdm(tasks, desc="tasks", leave=False)):
                info = client.get(f"/v1/tasks/{name}").json()
                pairs[name] = info["text_pairs"]
                if args.skip_dev:  # one request makes the task resident
                    client.post(f"/v1/tasks/{name}/predict",
                                json={"inputs": [["a", "b"]] if info["text_pairs"] else ["a"]}).raise_for_status()
                    ev = {}
                else:
                    ev = dev_eval(client, name, args.data_dir)
                m = client.get("/metrics").text
                per_task[name] = {
                    "bundle_bytes": info["bytes"],
                    "sparsity": info["sparsity"],
                    "recorded": info["metrics"].get("deterministic"),
                    "bernoulli": info["metrics"].get("bernoulli"),
                    "rest_dev": ev,
                    "cold_swap_in_ms": 1e3 * (metric_value(m, "supermask_task_load_duration_seconds_sum",
                                                           f'task="{name}"') or float("nan")),
                    "resident_bytes": metric_value(m, "supermask_resident_task_bytes", f'task="{name}"'),
                    "device_swap_in_ms": 1e3 * (metric_value(m, "supermask_device_swap_in_duration_seconds_sum",
                                                             f'task="{name}"') or float("nan")),
                }
                if i == 0:
                    record_memory(results, m, "one_task")
            record_memory(results, client.get("/metrics").text, "all_tasks")
            results["tasks"] = per_task
            if tasks:
                single = [t for t in tasks if not pairs[t]]
                lat_task = "SST-2" if "SST-2" in tasks else (single or tasks)[0]
                texts = task_inputs(args.data_dir, lat_task, pairs[lat_task], 32)
                results["latency_task"] = lat_task
                results["latency"] = [latency(client, lat_task, texts, b, args.requests) for b in (1, 32)]
            if args.mixed_requests > 0 and tasks:
                mixed_inputs = {name: task_inputs(args.data_dir, name, pairs[name]) for name in tasks}
                results["mixed_load"] = {"batched": mixed_load(f"http://127.0.0.1:{port}", mixed_inputs,
                                                               args.concurrency, args.mixed_requests)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    if mixed_inputs:
        proc, port2 = start_server(examples_dir, args.threads, {**device_env, "SUPERMASK_BATCHING": "false"})
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port2}", timeout=120) as client:
                wait_ready(client, proc)
            results["mixed_load"]["unbatched"] = mixed_load(f"http://127.0.0.1:{port2}", mixed_inputs,
                                                            args.concurrency, args.mixed_requests)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    ap.add_argument("--examples-dir", default=str(REPO / "examples" / "masks"))
    ap.add_argument("--requests", type=int, default=100, help="timed requests per latency figure")
    ap.add_argument("--threads", type=int, default=None, help="SUPERMASK_TORCH_THREADS for the server")
    ap.add_argument("--out", default=None,
                    help="output path without suffix (default: benchmarks/results/serve_<device>[_<synthetic>])")
    ap.add_argument("--mixed-requests", type=int, default=240, help="requests of the mixed-task load (0: skip it)")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent clients of the mixed-task load")
    ap.add_argument("--skip-dev", action="store_true", help="do not evaluate the tasks on their dev sets")
    ap.add_argument("--batch-wait-ms", type=float, default=2.0,
                    help="SUPERMASK_BATCH_WAIT_MS of the first server (the second runs with SUPERMASK_BATCHING=false)")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                    help="SUPERMASK_DEVICE of the servers (cuda: the same measurements on a GPU machine)")
    ap.add_argument("--synthetic", choices=sorted(synthetic.SHAPES), default=None,
                    help="serve a random-weight backbone of this shape with random-mask tasks (no dev metrics)")
    ap.add_argument("--synthetic-tasks", type=int, default=8, help="random-mask tasks of --synthetic")
    ap.add_argument("--synthetic-sparsity", type=float, default=0.05,
                    help="fraction of weights each random mask prunes")
    ap.add_argument("--tokenizer-dir", default=None,
                    help="local tokenizer folder for --synthetic (default: the shipped backbone's)")
    args = ap.parse_args(argv)
    if args.synthetic and args.synthetic_tasks < 1:
        ap.error("--synthetic-tasks must be >= 1")
    if args.out is None:
        args.out = str(REPO / "benchmarks" / "results" / "_".join(
            ["serve", args.device] + ([args.synthetic] if args.synthetic else [])))

    device_env = {"SUPERMASK_DEVICE": args.device}
    work = Path(tempfile.mkdtemp(prefix="supermask-synthetic-")) if args.synthetic else None
    examples_dir = args.examples_dir
    if work is not None:
        examples_dir, extra = prepare_synthetic(args, work)
        device_env.update(extra)
        args.skip_dev = True  # random weights: dev metrics mean nothing
    try:
        results = measure(args, examples_dir, device_env)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    if args.synthetic:
        results["synthetic"] = {"model": args.synthetic, "tasks": args.synthetic_tasks,
                                "sparsity": args.synthetic_sparsity}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    command = ".venv/bin/python benchmarks/serve_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    kind = (f"; random-weight {args.synthetic} backbone, {args.synthetic_tasks} random-mask tasks"
            if args.synthetic else "")
    md = [f"# Serving benchmark (device {args.device}; {results['hardware']['cpus']} CPUs, "
          f"{results['hardware']['machine']}{kind})", "",
          "Produced by (from the repository root):", "", f"    {command.strip()}", "",
          f"start-to-ready {results['start_to_ready_s']} s; backbone tensors {results['backbone_bytes'] / 2**20:.1f} MiB", "",
          "| task | bundle bytes | sparsity | dev via REST | recorded | Bernoulli mean ± s.d. (10) | cold swap-in ms | resident bytes |",
          "|---|---|---|---|---|---|---|---|"]
    for name, t in results["tasks"].items():
        ev = {k: round(v, 4) for k, v in t["rest_dev"].items() if k != "dev_examples"}
        rec = {k: round(v, 4) for k, v in (t["recorded"] or {}).items()}
        bern = ", ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in (t["bernoulli"] or {}).items())
        md.append(f"| {name} | {t['bundle_bytes']} | {t['sparsity']:.4f} | {ev} | {rec} | {bern} | "
                  f"{t['cold_swap_in_ms']:.1f} | {t['resident_bytes'] or float('nan'):.0f} |")
    md += ["", f"Latency of task {results.get('latency_task')}, one client:", "",
           "| batch | p50 ms | p99 ms | requests |", "|---|---|---|---|"]
    for row in results.get("latency", []):
        md.append(f"| {row['batch']} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['requests']} |")
    ml = results.get("mixed_load")
    if ml:
        b = ml["batched"]
        md += ["", f"Mixed-task load: {b['requests']} single-input requests over {b['tasks']} tasks from "
                   f"{b['concurrency']} concurrent loopback clients.", "",
               "| server | p50 ms | p99 ms | requests/s |", "|---|---|---|---|"]
        for k, label in (("batched", f"dynamic batching (SUPERMASK_BATCH_WAIT_MS={args.batch_wait_ms:g})"),
                         ("unbatched", "one request per forward (SUPERMASK_BATCHING=false)")):
            if k in ml:
                md.append(f"| {label} | {ml[k]['p50_ms']:.1f} | {ml[k]['p99_ms']:.1f} | {ml[k]['throughput_rps']:.1f} |")
        if "unbatched" in ml:
            md += ["", f"Throughput ratio batched / unbatched: "
                       f"{ml['batched']['throughput_rps'] / ml['unbatched']['throughput_rps']:.2f}"]
    md += ["", "| resident memory | MiB |", "|---|---|"]
    kinds = ("rss", "gpu_allocated") if args.device != "cpu" else ("rss",)
    for k in [f"{kind}_{when}_bytes" for kind in kinds for when in ("backbone_only", "one_task", "all_tasks")]:
        md.append(f"| {k.replace('_bytes', '')} | {(results.get(k) or float('nan')) / 2**20:.1f} |")
    if args.device != "cpu":
        swaps = [t["device_swap_in_ms"] for t in results["tasks"].values()]
        if swaps:
            md += ["", f"GPU slot swap-in per task (ms, first use): median {np.nanmedian(swaps):.2f}, "
                       f"max {np.nanmax(swaps):.2f}"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
