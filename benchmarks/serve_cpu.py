"""End-to-end CPU benchmark of the REST server on the real backbone.

Starts ``supermask serve`` as a subprocess on a loopback port with a fresh
store preloaded from the shipped example bundles, then measures, through HTTP:

* GLUE dev metrics of every shipped task, predicted through ``POST /v1/tasks/{task}/predict``;
* cold-task swap-in time (``supermask_task_load_duration_seconds``) per task;
* steady-state request latency p50/p99 at batch 1 and batch 32 (bounded request counts);
* server resident memory with the backbone only, with 1 task and with all tasks loaded.

Writes ``benchmarks/results/serve_cpu.json`` and ``.md`` and prints the table.

    .venv/bin/python benchmarks/serve_cpu.py --data-dir ../shared/data/glue
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.glue import compute_metrics, get_task, read_split  # noqa: E402


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"))
    ap.add_argument("--examples-dir", default=str(REPO / "examples" / "masks"))
    ap.add_argument("--requests", type=int, default=100, help="timed requests per latency figure")
    ap.add_argument("--threads", type=int, default=None, help="SUPERMASK_TORCH_THREADS for the server")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_cpu"))
    args = ap.parse_args()

    port = free_port()
    store = tempfile.mkdtemp(prefix="supermask-bench-")
    env = dict(os.environ, SUPERMASK_STORE_DIR=store, SUPERMASK_EXAMPLES_DIR=args.examples_dir,
               SUPERMASK_PORT=str(port), SUPERMASK_LOG_LEVEL="WARNING", HF_HUB_OFFLINE="1")
    if args.threads:
        env["SUPERMASK_TORCH_THREADS"] = str(args.threads)
    exe = Path(sys.executable).with_name("supermask")
    proc = subprocess.Popen([str(exe), "serve"], env=env, cwd=REPO)
    results: dict = {"hardware": {"machine": platform.machine(), "cpus": os.cpu_count(),
                                  "python": platform.python_version()}}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            results["start_to_ready_s"] = round(wait_ready(client, proc), 2)
            tasks = [t["name"] for t in client.get("/v1/tasks").json()["tasks"]]
            m = client.get("/metrics").text
            results["rss_backbone_only_bytes"] = metric_value(m, "supermask_process_resident_memory_bytes")
            results["backbone_bytes"] = metric_value(m, "supermask_backbone_bytes")
            per_task = {}
            for i, name in enumerate(tasks):
                info = client.get(f"/v1/tasks/{name}").json()
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
                }
                if i == 0:
                    results["rss_one_task_bytes"] = metric_value(m, "supermask_process_resident_memory_bytes")
            m = client.get("/metrics").text
            results["rss_all_tasks_bytes"] = metric_value(m, "supermask_process_resident_memory_bytes")
            results["tasks"] = per_task
            texts = [e.text_a for e in read_split(get_task("SST-2"), args.data_dir, "dev")[:32]]
            if "SST-2" in tasks:
                results["latency"] = [latency(client, "SST-2", texts, b, args.requests) for b in (1, 32)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    md = [f"# CPU serving benchmark ({results['hardware']['cpus']} CPUs, {results['hardware']['machine']})", "",
          f"start-to-ready {results['start_to_ready_s']} s; backbone tensors {results['backbone_bytes'] / 2**20:.1f} MiB", "",
          "| task | bundle bytes | sparsity | dev via REST | recorded | Bernoulli mean ± s.d. (10) | cold swap-in ms | resident bytes |",
          "|---|---|---|---|---|---|---|---|"]
    for name, t in results["tasks"].items():
        ev = {k: round(v, 4) for k, v in t["rest_dev"].items() if k != "dev_examples"}
        rec = {k: round(v, 4) for k, v in (t["recorded"] or {}).items()}
        bern = ", ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in (t["bernoulli"] or {}).items())
        md.append(f"| {name} | {t['bundle_bytes']} | {t['sparsity']:.4f} | {ev} | {rec} | {bern} | "
                  f"{t['cold_swap_in_ms']:.1f} | {t['resident_bytes']:.0f} |")
    md += ["", "| batch | p50 ms | p99 ms | requests |", "|---|---|---|---|"]
    for row in results.get("latency", []):
        md.append(f"| {row['batch']} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['requests']} |")
    md += ["", "| resident memory | MiB |", "|---|---|"]
    for k in ("rss_backbone_only_bytes", "rss_one_task_bytes", "rss_all_tasks_bytes"):
        md.append(f"| {k.replace('_bytes', '')} | {results[k] / 2**20:.1f} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
