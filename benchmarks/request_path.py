"""What the REST path adds to a request: the same batch-1 predicts over loopback HTTP and in-process, interleaved.

One ``supermask serve`` subprocess (default settings but the precision / runtime / log level given; at the
default level INFO it writes an access line per request to its log file; the shipped example tasks) and, in this process, an :class:`service.engine.Engine` built with the same settings over the same
bundles. Request ``i`` sends SST-2 dev sentence ``i`` (cycling over ``--sentences``: every length) to both, one
after the other, alternating which goes first; nothing else runs. Reported per path: p50 / p99 / mean ms; the
REST-minus-in-process difference of the medians (the request path's own cost: HTTP, JSON, validation, admission,
batcher, thread hops, metrics); and ``GET /healthz`` over the same client (a floor: one routed request that does
no work). Writes ``--out``.json and .md.

    .venv/bin/python benchmarks/request_path.py --data-dir $GLUE_DIR      # ~1 min
    .venv/bin/python benchmarks/request_path.py --requests 20                      # smoke
"""

from __future__ import annotations

import argparse
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
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks import serve_cpu  # noqa: E402
from benchmarks.peers.procs import ServerProcesses, cpu_model, write_results  # noqa: E402

TASK = "SST-2"


def summary(ms: list[float]) -> dict:
    a = np.asarray(ms, dtype=float)
    return {"requests": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean())}


def build_parser() -> argparse.ArgumentParser:
    from supermask.cli import HelpFormatter

    ap = argparse.ArgumentParser(prog="request_path.py", description=__doc__,
                                 formatter_class=type("F", (argparse.RawDescriptionHelpFormatter, HelpFormatter), {}))
    ap.add_argument("--precision", default="auto", help="SUPERMASK_CPU_PRECISION of both paths")
    ap.add_argument("--runtime", default="auto", help="SUPERMASK_CPU_RUNTIME of both paths")
    ap.add_argument("--requests", type=int, default=300, help="timed requests per path")
    ap.add_argument("--sentences", type=int, default=256, help="SST-2 dev sentences the requests cycle over")
    ap.add_argument("--threads", type=int, default=None, help="torch / ONNX Runtime intra-op threads (both paths)")
    ap.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                    help="the server's SUPERMASK_LOG_LEVEL (default INFO, the server's own: an access line per request, "
                         "written to its log file)")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"),
                    help="GLUE folder whose SST-2/dev.tsv sentences are sent (fixed sentences without it)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "request_path"),
                    help="output path without suffix")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from backbone import load_backbone
    from mask_store.local import LocalMaskStore
    from service.engine import Engine, PredictRequest
    from service.metrics import Metrics
    from service.settings import DEFAULT_EXAMPLES_DIR, Settings

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    texts = (serve_cpu.glue_inputs(args.data_dir, TASK, args.sentences)
             or serve_cpu.synthetic_inputs(args.data_dir, False, args.sentences))
    env = {"SUPERMASK_CPU_PRECISION": args.precision, "SUPERMASK_CPU_RUNTIME": args.runtime,
           "SUPERMASK_DEVICE": "cpu", "SUPERMASK_TORCH_THREADS": str(threads)}
    procs = ServerProcesses()
    store_dir = Path(tempfile.mkdtemp(prefix="request-path-"))
    try:
        port = serve_cpu.free_port()
        server_env = dict(os.environ, **env, SUPERMASK_STORE_DIR=str(store_dir / "server"),
                          SUPERMASK_EXAMPLES_DIR=str(DEFAULT_EXAMPLES_DIR), SUPERMASK_PORT=str(port),
                          SUPERMASK_LOG_LEVEL=args.log_level, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        proc = procs.start([sys.executable, "-m", "supermask", "serve"], server_env, REPO, store_dir / "server.log")
        settings = Settings(cpu_precision=args.precision, cpu_runtime=args.runtime, device="cpu")
        store = LocalMaskStore(store_dir / "local")
        store.seed_from(DEFAULT_EXAMPLES_DIR)
        engine = Engine(load_backbone(weights_only=settings.cpu_precision != "fp32"), store, Metrics(),
                        cache_bytes=settings.cache_bytes, max_batch_size=settings.max_batch_size,
                        precision=settings.cpu_precision, runtime=settings.cpu_runtime, device="cpu",
                        hot_cache_bytes=settings.hot_cache_bytes)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            serve_cpu.wait_ready(client, proc)
            healthz = client.get("/healthz").json()

            def rest(text: str) -> float:
                t0 = time.perf_counter()
                client.post(f"/v1/tasks/{TASK}/predict", json={"inputs": [text]}).raise_for_status()
                return (time.perf_counter() - t0) * 1e3

            def local(text: str) -> float:
                t0 = time.perf_counter()
                engine.predict(PredictRequest(TASK, ((text, None),)))
                return (time.perf_counter() - t0) * 1e3

            def health() -> float:
                t0 = time.perf_counter()
                client.get("/healthz").raise_for_status()
                return (time.perf_counter() - t0) * 1e3

            for text in texts[:10]:  # load, promote, warm both paths
                rest(text), local(text)
            ms = {"rest": [], "in_process": [], "healthz": []}
            for i in range(args.requests):
                text = texts[i % len(texts)]
                first, second = (("rest", rest), ("in_process", local))[:: 1 if i % 2 else -1]
                ms[first[0]].append(first[1](text))
                ms[second[0]].append(second[1](text))
                ms["healthz"].append(health())
        res = {"command": " ".join([".venv/bin/python benchmarks/request_path.py", *(argv or sys.argv[1:])]),
               "hardware": {"cpu_model": cpu_model(), "logical_cpus": os.cpu_count(), "machine": platform.machine(),
                            "threads": threads},
               "served": {k: healthz.get(k) for k in ("precision", "runtime", "device")},
               "server_log_level": args.log_level, "loadavg_start": loadavg_start,
               "loadavg_end": [round(x, 2) for x in os.getloadavg()],
               "inputs": f"{len(texts)} SST-2 dev sentences, one per request", **{k: summary(v) for k, v in ms.items()}}
        res["rest_minus_in_process_p50_ms"] = res["rest"]["p50_ms"] - res["in_process"]["p50_ms"]
        text = "\n".join([
            "# The request path: REST against in-process", "",
            f"Produced by `{res['command']}`.", "",
            f"CPU: {res['hardware']['cpu_model']}, {os.cpu_count()} logical CPUs, {threads} threads; served: "
            f"precision {res['served']['precision']}, runtime {res['served']['runtime']}, log level "
            f"{args.log_level}; {res['inputs']}, {args.requests} per path, the two paths interleaved; load average "
            f"{res['loadavg_start']} at start, {res['loadavg_end']} at end.", "",
            "| path | p50 ms | p99 ms | mean ms |", "|---|---|---|---|",
            *(f"| {k} | {res[k]['p50_ms']:.2f} | {res[k]['p99_ms']:.2f} | {res[k]['mean_ms']:.2f} |"
              for k in ("rest", "in_process", "healthz")), "",
            f"REST minus in-process (p50): **{res['rest_minus_in_process_p50_ms']:.2f} ms**; `GET /healthz` "
            f"(a routed request doing no work) {res['healthz']['p50_ms']:.2f} ms.", ""])
        write_results(args.out, res, text)
        print(text)
        return 0
    finally:
        procs.stop_all()
        shutil.rmtree(store_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
