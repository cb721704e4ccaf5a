"""Per-task costs measured on this machine, and the arithmetic of serving 10,000 tasks on N hosts from them.

Part 1 (measured, in process, real int8 all-MiniLM-L6-v2, ``--measure-tasks`` random-mask tasks at 5 %
sparsity per CPU precision): bundle bytes; warm bytes per task (the task cache's resident form: packed mask
bits + head, ``supermask_resident_task_bytes``); hot bytes per task (the hot tier's materialised weights);
cold load ms (read + validate + build, ``supermask_task_load_duration_seconds``); promotion ms (warm -> hot,
``supermask_hot_promotion_duration_seconds``); the backbone's bytes. Medians over the tasks.

Part 2 (simulated): ``--tasks`` tasks with Zipf(``s``) popularity (task of rank k asked with probability
proportional to k^-s), spread over N hosts the way Serve's multiplexed routing spreads them (a task's requests
go to the replica holding it; each task is held by one host, tasks dealt out evenly: host = hash(task) mod N).
Each host runs one replica with a hot tier of ``--hot-gib`` and a warm tier of ``--warm-gib``, both LRU in
bytes, as the engine's; a request is a hot hit, a warm hit (pays the promotion), a cold miss of a task evicted
before (pays the cold load and the promotion), or the first request a host ever gets for a task (counted apart:
it vanishes in a long-running fleet). ``--requests`` requests are replayed; the first half warms the caches, the second
half is counted. Expected steady-state swap-in cost per request = P(warm hit) * promotion + P(cold) * (cold load +
promotion).

    .venv/bin/python benchmarks/scaling.py                        # measures, then simulates (~2 min)
    .venv/bin/python benchmarks/scaling.py --costs benchmarks/results/scaling.json   # re-simulate only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GiB = 1024 ** 3
MiB = 1024 ** 2


def measure_costs(precisions: list[str], n_tasks: int, threads: int) -> dict:
    """Part 1: per-task costs per CPU precision (see the module docstring)."""
    import torch

    from backbone import default_backbone_path, load_backbone
    from benchmarks import synthetic
    from mask_store.local import LocalMaskStore
    from service.engine import Engine
    from service.metrics import Metrics

    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="supermask-scaling-"))
    names = synthetic.write_tasks(default_backbone_path(), work, n_tasks, 0.05)
    bundle_bytes = [(work / f"{t}.smask").stat().st_size for t in names]
    out = {"bundle_bytes": statistics.median(bundle_bytes), "tasks_measured": n_tasks, "precisions": {}}
    for precision in precisions:
        backbone = load_backbone(None, weights_only=precision != "fp32")
        metrics = Metrics()
        engine = Engine(backbone, LocalMaskStore(work), metrics, cache_bytes=4 * GiB, device="cpu",
                        precision=precision, hot_cache_bytes=8 * GiB)
        warm, hot, cold_ms, promo_ms = [], [], [], []
        for t in names:
            entry = engine.warm(t)
            warm.append(entry.nbytes)
            cold_ms.append(entry.load_seconds * 1e3)
            if engine.hot is not None:
                before = engine.hot.used_bytes
                t0 = time.perf_counter()
                engine.hot.get(t, entry)
                promo_ms.append((time.perf_counter() - t0) * 1e3)
                hot.append(engine.hot.used_bytes - before)
        out["backbone_bytes"] = backbone.parameter_bytes()
        out["precisions"][engine.precision] = {
            "warm_bytes": statistics.median(warm), "hot_bytes": statistics.median(hot) if hot else None,
            "cold_load_ms": statistics.median(cold_ms), "promotion_ms": statistics.median(promo_ms) if promo_ms else None}
        del engine, backbone
    return out


class ByteLRU:
    """LRU of equally sized entries bounded in bytes: holds ``capacity // entry`` tasks."""

    def __init__(self, capacity_bytes: float, entry_bytes: float):
        self.slots = int(capacity_bytes // entry_bytes) if entry_bytes else 0
        self.items: OrderedDict[int, None] = OrderedDict()

    def hit(self, key: int) -> bool:
        if key in self.items:
            self.items.move_to_end(key)
            return True
        return False

    def put(self, key: int) -> None:
        if self.slots <= 0:
            return
        self.items[key] = None
        self.items.move_to_end(key)
        while len(self.items) > self.slots:
            self.items.popitem(last=False)


def simulate(costs: dict, precision: str, n_tasks: int, hosts: int, hot_gib: float, warm_gib: float, s: float,
             n_requests: int, seed: int = 0) -> dict:
    """Part 2 for one configuration: hit ratios and expected swap-in cost per request."""
    c = costs["precisions"][precision]
    rng = np.random.default_rng(seed)
    weights = np.arange(1, n_tasks + 1, dtype=float) ** -s
    weights /= weights.sum()
    perm = rng.permutation(n_tasks)  # popularity rank -> task id (popular tasks are not all on host 0)
    stream = perm[rng.choice(n_tasks, size=n_requests, p=weights)]
    host_of = (perm * 2654435761 % 2 ** 32) % hosts  # a fixed hash of the task id
    hot_bytes = c["hot_bytes"] or 0
    hot = [ByteLRU(hot_gib * GiB, hot_bytes) if hot_bytes else None for _ in range(hosts)]
    warm = [ByteLRU(warm_gib * GiB, c["warm_bytes"]) for _ in range(hosts)]
    counts = {"hot": 0, "warm": 0, "cold": 0, "first": 0}
    seen = np.zeros(n_tasks, dtype=bool)
    half = n_requests // 2
    for i, task in enumerate(stream):
        h = host_of[task]
        in_warm = warm[h].hit(task)  # every request looks its task up in the task cache first, as the engine does
        if not in_warm:
            warm[h].put(task)
        in_hot = hot[h] is not None and hot[h].hit(task)
        if hot[h] is not None and not in_hot:
            hot[h].put(task)
        if i >= half:
            counts["hot" if in_hot else "warm" if in_warm else "cold" if seen[task] else "first"] += 1
        seen[task] = True
    n = n_requests - half
    p = {k: v / n for k, v in counts.items()}
    promo = c["promotion_ms"] or 0.0
    if hot[0] is None:  # fp32: no hot tier; every resident task is served as is
        p["warm"], p["hot"] = p["hot"] + p["warm"], 0.0
    cost = p["warm"] * promo + p["cold"] * (c["cold_load_ms"] + promo)  # steady state: first touches left out
    return {"precision": precision, "hosts": hosts, "tasks_per_host": n_tasks / hosts,
            "hot_slots": hot[0].slots if hot[0] is not None else 0, "warm_slots": warm[0].slots,
            "p_hot": p["hot"], "p_warm": p["warm"], "p_cold": p["cold"], "p_first_touch": p["first"],
            "swap_in_ms_per_request": cost}


def markdown(res: dict) -> str:
    c = res["costs"]
    lines = ["# Per-task costs, and 10,000 tasks on N hosts", "", "Produced by (from the repository root):", "",
             f"    {res['command']}", "",
             f"CPU: {res['cpu']}, {os.cpu_count()} logical CPUs, {res['threads']} torch thread(s); "
             f"python {platform.python_version()}. Real int8 all-MiniLM-L6-v2, {c['tasks_measured']} random-mask "
             f"tasks at 5 % sparsity; medians over the tasks.", "",
             f"Backbone tensors: {c['backbone_bytes'] / MiB:.1f} MiB; bundle: {c['bundle_bytes'] / MiB:.2f} MiB.", "",
             "| precision | warm bytes / task | hot bytes / task | cold load ms | promotion ms |", "|---|---|---|---|---|"]
    for p, v in c["precisions"].items():
        hot = "—" if v["hot_bytes"] is None else f"{v['hot_bytes'] / MiB:.2f} MiB"
        promo = "—" if v["promotion_ms"] is None else f"{v['promotion_ms']:.1f}"
        lines.append(f"| {p} | {v['warm_bytes'] / MiB:.2f} MiB | {hot} | {v['cold_load_ms']:.1f} | {promo} |")
    cfg = res["config"]
    lines += ["", f"Simulation: {cfg['tasks']:,} tasks, Zipf s = {cfg['zipf']}, {cfg['requests']:,} requests "
              f"(second half counted), per host a hot tier of {cfg['hot_gib']} GiB and a warm tier of "
              f"{cfg['warm_gib']} GiB.", "",
              "| precision | hosts | tasks / host | hot slots | warm slots | hot hits | warm hits | cold (evicted) | "
              "first touch | swap-in ms / request |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["simulation"]:
        lines.append(f"| {r['precision']} | {r['hosts']} | {r['tasks_per_host']:,.0f} | {r['hot_slots']:,} | "
                     f"{r['warm_slots']:,} | {100 * r['p_hot']:.1f} % | {100 * r['p_warm']:.1f} % | "
                     f"{100 * r['p_cold']:.2f} % | {100 * r['p_first_touch']:.2f} % | {r['swap_in_ms_per_request']:.2f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--costs", help="a results JSON of an earlier run: reuse its measured costs, only simulate")
    p.add_argument("--precisions", default="bf16,int8", help="CPU precisions to measure (fp32, bf16, int8)")
    p.add_argument("--measure-tasks", type=int, default=8, help="tasks measured per precision")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (and OMP_NUM_THREADS) while measuring; on a shared, oversubscribed machine "
                        "2 threads measured promotions 30x slower than 1 (threads spin at barriers while their "
                        "partner is descheduled)")
    p.add_argument("--tasks", type=int, default=10_000, help="tasks of the simulated fleet")
    p.add_argument("--hosts", default="1,2,4,8", help="host counts to simulate")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s of task popularity")
    p.add_argument("--hot-gib", type=float, default=4.0, help="hot tier per host, GiB")
    p.add_argument("--warm-gib", type=float, default=8.0, help="warm tier (task cache) per host, GiB")
    p.add_argument("--requests", type=int, default=400_000, help="simulated requests")
    p.add_argument("--out", default="benchmarks/results/scaling", help="output path without suffix")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = build_parser().parse_args(argv)
    if opts.costs:
        costs = json.loads(Path(opts.costs).read_text())["costs"]
    else:
        os.environ["OMP_NUM_THREADS"] = str(opts.threads)  # before torch is imported
        costs = measure_costs([p for p in opts.precisions.split(",") if p], opts.measure_tasks, opts.threads)
    sims = [simulate(costs, p, opts.tasks, int(h), opts.hot_gib, opts.warm_gib, opts.zipf, opts.requests)
            for p in costs["precisions"] for h in opts.hosts.split(",")]
    from benchmarks.peers.procs import cpu_model, write_results

    res = {"command": ".venv/bin/python benchmarks/scaling.py " + shlex.join(argv), "cpu": cpu_model(),
           "threads": opts.threads, "costs": costs, "simulation": sims,
           "config": {"tasks": opts.tasks, "zipf": opts.zipf, "hot_gib": opts.hot_gib, "warm_gib": opts.warm_gib,
                      "requests": opts.requests}}
    text = markdown(res)
    write_results(opts.out, res, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
