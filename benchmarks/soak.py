"""Soak: a real server under a long mixed load with admin churn; RSS series, latency, errors by status.

A ``supermask serve`` process (real backbone, all-MiniLM-L6-v2, its store seeded with the shipped tasks
and renamed copies of them: ``--tasks`` in all) is driven by ``--clients`` concurrent clients, each
sending predict requests back to back: a random task, a random batch of 1-64 inputs (pairs for pair
tasks), and ``--invalid`` of them invalid on purpose (empty inputs, pairs for a single-text task, an
unknown task, an over-long text, malformed JSON, unknown route). Another client replaces one task and
deletes and re-uploads another every ``--churn-s`` seconds. Recorded:

* the server's RSS (``/proc/PID/status`` VmRSS) every ``--sample-s`` seconds;
* latency p50 / p99 of the valid predict requests, per minute and overall;
* responses by status, split into *expected* (the 4xx an invalid request must get; a 404 for a task that
  the churn deleted at that moment) and *unexpected* (a 5xx, a valid request refused, a refused invalid
  request answered 200, a connection error);
* *wrong labels*: a prediction whose label is not one of its task's labels (another task's answer).

The memory target (issue: bounded memory): over the measured window after the warm-up, RSS grows at most
10 % and ends within 1.3x the warm RSS (the RSS at the end of the warm-up)::

    .venv/bin/python benchmarks/soak.py --warmup-s 60 --duration-s 600 --out benchmarks/results/soak

``--allocator jemalloc`` preloads the distribution's jemalloc (``libjemalloc2``) into the server, as the
Docker image does; ``--allocator glibc`` runs it on glibc's malloc, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.peers.procs import cpu_model  # noqa: E402

EXAMPLES = REPO / "examples" / "masks"
TOKEN = "soak-token"
JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2")
WORDS = ("the film was a delight", "a dreadful , tedious mess", "two men are playing guitar",
         "a man plays a guitar", "the book was on the table", "he said that she had left", "it rains")


def find_jemalloc() -> str | None:
    return next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def renamed(data: bytes, task: str) -> bytes:
    """The bundle ``data`` re-encoded under another task name (same masks and head)."""
    from mask_store.format import decode_bundle, encode_bundle

    b = decode_bundle(data)
    h = b.header
    return encode_bundle(task=task, problem_type=h.problem_type, labels=h.labels, max_seq_length=h.max_seq_length,
                         backbone_fingerprint=h.backbone_fingerprint, backbone_name=h.backbone_name,
                         masks={m.name: b.mask_array(m.name) for m in h.masks}, head=b.head,
                         text_pairs=h.text_pairs, training=h.training, metrics=h.metrics)


def seed_store(store: Path, n_tasks: int) -> dict[str, bytes]:
    """Fill ``store`` with the shipped bundles and renamed copies (``n_tasks`` in all); returns name -> bytes."""
    store.mkdir(parents=True, exist_ok=True)
    shipped = {p.stem: p.read_bytes() for p in sorted(EXAMPLES.glob("*.smask"))}
    bundles = dict(shipped)
    names = list(shipped)
    i = 0
    while len(bundles) < n_tasks:
        src = names[i % len(names)]
        bundles[f"{src}-copy{i // len(names)}"] = renamed(shipped[src], f"{src}-copy{i // len(names)}")
        i += 1
    for name, data in bundles.items():
        (store / f"{name}.smask").write_bytes(data)
    return bundles


def start_server(store: Path, port: int, allocator: str, threads: int, extra_env: dict) -> subprocess.Popen:
    env = dict(os.environ, SUPERMASK_ADMIN_TOKEN=TOKEN, SUPERMASK_EXAMPLES_DIR="", SUPERMASK_LOG_LEVEL="WARNING",
               SUPERMASK_TORCH_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra_env)
    if allocator == "jemalloc":
        lib = find_jemalloc()
        if lib is None:
            raise SystemExit("--allocator jemalloc: libjemalloc.so.2 not found (apt-get install libjemalloc2)")
        env["LD_PRELOAD"] = lib
    return serve(store, port, env, ready_timeout_s=180)


def serve(store: Path, port: int, env: dict, ready_timeout_s: float) -> subprocess.Popen:
    """``supermask serve`` on 127.0.0.1:``port`` over ``store`` with environment ``env``, once ``/readyz`` answers 200.

    Raises:
        SystemExit: the server exited (its stderr's tail in the message) or was not ready in time (then killed).
    """
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "supermask", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--store-dir", str(store)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server not ready after {ready_timeout_s:g} s")


class Load:
    """The clients, the churn and the tallies (shared by the threads; a lock guards the tallies)."""

    def __init__(self, base: str, tasks: dict[str, dict], bundles: dict[str, bytes], invalid: float, seed: int):
        self.base, self.tasks, self.bundles, self.invalid = base, tasks, bundles, invalid
        self.seed = seed
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.latencies: list[tuple[float, float]] = []  # (time, seconds) of valid predicts
        self.statuses: Counter = Counter()
        self.unexpected: Counter = Counter()
        self.wrong_labels = 0
        self.deleted: set[str] = set()  # tasks the churn has deleted and not yet re-uploaded
        self.examples: list[str] = []

    def _note(self, key: str, ok: bool, detail: str = "") -> None:
        with self.lock:
            self.statuses[key] += 1
            if not ok:
                self.unexpected[key] += 1
                if len(self.examples) < 20 and detail:
                    self.examples.append(detail[:300])

    def client(self, idx: int) -> None:
        import httpx

        rng = random.Random(self.seed * 1000 + idx)
        names = sorted(self.tasks)
        with httpx.Client(base_url=self.base, timeout=120) as http:
            while not self.stop.is_set():
                task = rng.choice(names)
                info = self.tasks[task]
                n = rng.randint(1, 64)
                inputs = [[rng.choice(WORDS), rng.choice(WORDS)] if info["text_pairs"] else rng.choice(WORDS)
                          for _ in range(n)]
                bad = rng.random() < self.invalid
                kind = rng.choice(("empty", "shape", "unknown", "long", "json", "route")) if bad else None
                url, body, content = f"/v1/tasks/{task}/predict", {"inputs": inputs}, None
                if kind == "empty":
                    body = {"inputs": []}
                elif kind == "shape":
                    body = {"inputs": [["a", "b"]] if not info["text_pairs"] else ["a single text"]}
                elif kind == "unknown":
                    url = f"/v1/tasks/no-such-task-{rng.randrange(10 ** 6)}/predict"
                elif kind == "long":
                    body = {"inputs": ["x" * 20_000]}
                elif kind == "json":
                    body, content = None, b'{"inputs": ["unterminated'
                elif kind == "route":
                    url = "/v1/nowhere"
                t0 = time.perf_counter()
                try:
                    if content is not None:
                        r = http.post(url, content=content, headers={"content-type": "application/json"})
                    else:
                        r = http.post(url, json=body)
                except httpx.HTTPError as exc:
                    self._note(f"connection:{type(exc).__name__}", False, str(exc))
                    continue
                dt = time.perf_counter() - t0
                status = r.status_code
                if bad:
                    self._note(str(status), 400 <= status < 500, f"invalid {kind} got {status}: {r.text}")
                    continue
                if status == 404 and task in self.deleted:
                    self._note("404-churn", True)
                    continue
                if status != 200:
                    self._note(str(status), False, f"valid request to {task} got {status}: {r.text}")
                    continue
                preds = r.json()["predictions"]
                wrong = len(preds) != n or any(
                    (p.get("label") not in info["labels"]) if info["labels"] else ("value" not in p) for p in preds)
                with self.lock:
                    self.latencies.append((time.monotonic(), dt))
                    self.statuses["200"] += 1
                    if wrong:
                        self.wrong_labels += 1

    def churn(self, every_s: float) -> None:
        import httpx

        rng = random.Random(self.seed)
        names = sorted(self.tasks)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=self.base, timeout=120, headers=auth) as http:
            while not self.stop.wait(every_s):
                replace, drop = rng.sample(names, 2)
                r = http.put(f"/v1/tasks/{replace}", content=self.bundles[replace])
                self._note(f"admin-put-{r.status_code}", r.status_code in (200, 201), r.text)
                with self.lock:
                    self.deleted.add(drop)
                r = http.delete(f"/v1/tasks/{drop}")
                self._note(f"admin-delete-{r.status_code}", r.status_code == 204, r.text)
                time.sleep(min(1.0, every_s / 4))  # the task stays deleted for a moment
                r = http.put(f"/v1/tasks/{drop}", content=self.bundles[drop])
                self._note(f"admin-put-{r.status_code}", r.status_code in (200, 201), r.text)
                with self.lock:
                    self.deleted.discard(drop)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--warmup-s", type=float, default=60.0, help="load before the measured window (default 60)")
    ap.add_argument("--duration-s", type=float, default=600.0, help="measured window (default 600)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent predict clients (default 16)")
    ap.add_argument("--tasks", type=int, default=12, help="tasks in the store (shipped + renamed copies)")
    ap.add_argument("--invalid", type=float, default=0.05, help="fraction of invalid requests (default 0.05)")
    ap.add_argument("--churn-s", type=float, default=10.0, help="admin replace + delete every N s (default 10)")
    ap.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling interval (default 5)")
    ap.add_argument("--allocator", choices=("jemalloc", "glibc"), default="jemalloc",
                    help="the server's malloc (default jemalloc, as in the Docker image)")
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads (default 2)")
    ap.add_argument("--precision", default="auto", help="SUPERMASK_CPU_PRECISION of the server (default auto)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment of the server (e.g. GLIBC_TUNABLES=..., MALLOC_CONF=...); repeatable")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bundles = seed_store(tmp / "store", args.tasks)
    proc = start_server(tmp / "store", port, args.allocator, args.threads,
                        {"SUPERMASK_CPU_PRECISION": args.precision, **dict(e.split("=", 1) for e in args.env)})
    import httpx

    base = f"http://127.0.0.1:{port}"
    listed = httpx.get(f"{base}/v1/tasks", timeout=30).json()["tasks"]
    tasks = {t["name"]: {"labels": t["labels"], "text_pairs": t["text_pairs"]} for t in listed}
    health = httpx.get(f"{base}/healthz", timeout=30).json()
    load = Load(base, tasks, bundles, args.invalid, args.seed)
    threads = [threading.Thread(target=load.client, args=(i,), daemon=True) for i in range(args.clients)]
    threads.append(threading.Thread(target=load.churn, args=(args.churn_s,), daemon=True))
    rss_series: list[tuple[float, int]] = []
    t_start = time.monotonic()
    for th in threads:
        th.start()
    end = t_start + args.warmup_s + args.duration_s
    warm_rss = None
    try:
        while time.monotonic() < end:
            time.sleep(args.sample_s)
            t = time.monotonic() - t_start
            rss_series.append((round(t, 1), rss_bytes(proc.pid)))
            if warm_rss is None and t >= args.warmup_s:
                warm_rss = rss_series[-1][1]
            print(f"t={t:6.0f} s  RSS {rss_series[-1][1] / 2 ** 20:7.1f} MiB  valid answers {load.statuses['200']}  "
                  f"unexpected {sum(load.unexpected.values())}", flush=True)
    finally:
        load.stop.set()
        for th in threads:
            th.join(150)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    measured = [r for t, r in rss_series if t >= args.warmup_s]
    warm_rss = warm_rss or (measured[0] if measured else 0)
    lat_all = [d for t, d in load.latencies if t - t_start >= args.warmup_s]
    minutes = []
    for m in range(int((args.warmup_s + args.duration_s) // 60) + 1):
        sel = [d for t, d in load.latencies if m * 60 <= t - t_start < (m + 1) * 60]
        rss_m = [r for t, r in rss_series if m * 60 <= t < (m + 1) * 60]
        if sel or rss_m:
            minutes.append({"minute": m, "answers": len(sel), "p50_s": pct(sel, 0.5), "p99_s": pct(sel, 0.99),
                            "rss_mib": round(rss_m[-1] / 2 ** 20, 1) if rss_m else None})
    growth = (max(measured) / warm_rss - 1) if measured and warm_rss else None
    end_ratio = (measured[-1] / warm_rss) if measured and warm_rss else None
    result = {
        "command": "python benchmarks/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpu": cpu_model(), "cores": os.cpu_count(), "server_threads": args.threads,
        "allocator": args.allocator, "server_env": args.env, "precision": health.get("precision"), "clients": args.clients,
        "tasks": len(tasks), "warmup_s": args.warmup_s, "duration_s": args.duration_s,
        "warm_rss_mib": round(warm_rss / 2 ** 20, 1), "max_rss_mib": round(max(measured) / 2 ** 20, 1) if measured else None,
        "end_rss_mib": round(measured[-1] / 2 ** 20, 1) if measured else None,
        "rss_growth_after_warmup": round(growth, 4) if growth is not None else None,
        "end_over_warm": round(end_ratio, 4) if end_ratio is not None else None,
        "memory_target_met": bool(growth is not None and growth <= 0.10 and end_ratio <= 1.3),
        "valid_answers": len(lat_all), "p50_s": pct(lat_all, 0.5), "p99_s": pct(lat_all, 0.99),
        "statuses": dict(load.statuses), "unexpected": dict(load.unexpected), "unexpected_examples": load.examples,
        "wrong_labels": load.wrong_labels, "per_minute": minutes,
        "rss_series_mib": [(t, round(r / 2 ** 20, 1)) for t, r in rss_series],
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("rss_series_mib", "per_minute")}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        lines = [f"# Soak: {args.clients} clients, {len(tasks)} tasks, admin churn every {args.churn_s:g} s", "",
                 f"`{result['command']}`", "",
                 f"CPU {result['cpu']}, {result['cores']} cores, server torch threads {args.threads}, "
                 f"precision {result['precision']}, allocator {args.allocator}.", "",
                 f"RSS: warm (after {args.warmup_s:g} s) {result['warm_rss_mib']} MiB, max {result['max_rss_mib']}, "
                 f"end {result['end_rss_mib']}; growth after warm-up {100 * (growth or 0):.1f} % (target ≤ 10 %), "
                 f"end/warm {end_ratio or 0:.2f} (target ≤ 1.3): "
                 f"{'met' if result['memory_target_met'] else 'NOT met'}.", "",
                 f"Valid answers {len(lat_all)}, p50 {result['p50_s'] or 0:.3f} s, p99 {result['p99_s'] or 0:.3f} s; "
                 f"unexpected responses {sum(load.unexpected.values())}, wrong labels {load.wrong_labels}.", "",
                 "| minute | answers | p50 s | p99 s | RSS MiB |", "|---|---|---|---|---|"]
        for m in minutes:
            lines.append(f"| {m['minute']} | {m['answers']} | {m['p50_s'] or 0:.3f} | {m['p99_s'] or 0:.3f} | "
                         f"{m['rss_mib']} |")
        lines += ["", "Responses by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(load.statuses.items()))]
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    ok = result["memory_target_met"] and not load.unexpected and not load.wrong_labels
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
