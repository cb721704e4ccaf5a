"""Abuse replay (issue 35): each class of the second attack against a live loopback server, with the server's RSS,
the reply bytes and a probe request's status during each.

A ``supermask serve`` process (real backbone, the shipped tasks) on 127.0.0.1 with small connection limits
(``--limit-concurrency`` connections, head / body timeouts of ``--timeout-s``) is sent, one class at a time:

* ``v2_duplicate_outputs``: an OIP v2 inference of 64 inputs naming ``logits`` 100,000 times;
* ``labels_4096x256``: an upload declaring 4,096 labels of 256 characters; ``wide_top_k_null``: a bundle at the
  label bounds (``SUPERMASK_MAX_LABELS`` x ``SUPERMASK_MAX_LABEL_CHARS``) and a 64-input predict with
  ``top_k: null``; ``fanout_16_wide_top_k_null``: fan-outs over 16 such tasks (64, 32 and 8 inputs);
* ``malformed_v2``: v2 bodies with unhashable output names, and non-ASCII digits in the binary header;
* ``keepalive_partial_heads`` / ``stalled_bodies``: ``--limit-concurrency`` sockets that send a complete request
  then half a head, or a complete head then stall their body;
* ``abandoned_v2`` / ``abandoned_fanouts``: clients that send long work and leave after 0.3 s, and how long until
  a one-input predict is answered within a second again (``recovered_s``);
* ``store_race`` (S3 emulator, moto on loopback): ``--store-rounds`` rounds of an object truncated in place, read
  by server A while server B re-uploads; counts acknowledged uploads lost and valid bundles quarantined.

During each class a probe thread sends ``GET /healthz`` and a one-input SST-2 predict every 0.25 s; their
statuses (and the predict's worst latency) are recorded with the RSS peak (``/proc/PID/status`` VmRSS)::

    .venv/bin/python benchmarks/abuse.py --out benchmarks/results/abuse
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import soak  # noqa: E402
from benchmarks.peers.procs import rss_bytes  # noqa: E402

EXAMPLES = REPO / "examples" / "masks"
TOKEN = "abuse-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LONG = "the film , which was long and at times dull , still had moments of real grace and wit " * 6


def start_server(store: Path, port: int, limit: int, timeout_s: float) -> subprocess.Popen:
    env = dict(os.environ, SUPERMASK_ADMIN_TOKEN=TOKEN, SUPERMASK_EXAMPLES_DIR=str(EXAMPLES),
               SUPERMASK_LOG_LEVEL="WARNING", SUPERMASK_LIMIT_CONCURRENCY=str(limit),
               SUPERMASK_HEADER_TIMEOUT_S=str(timeout_s), SUPERMASK_BODY_TIMEOUT_S=str(timeout_s),
               SUPERMASK_TORCH_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return soak.serve(store, port, env, ready_timeout_s=240)


class Observer:
    """RSS sampler and probe thread for one class at a time."""

    def __init__(self, pid: int, base: str):
        self.pid, self.base = pid, base
        self.stop = threading.Event()
        self.phase: dict | None = None
        self.lock = threading.Lock()
        threading.Thread(target=self._sample, daemon=True).start()
        threading.Thread(target=self._probe, daemon=True).start()

    def _sample(self) -> None:
        while not self.stop.wait(0.05):
            rss = rss_bytes(self.pid)
            with self.lock:
                if self.phase is not None:
                    self.phase["rss_peak"] = max(self.phase["rss_peak"], rss)

    def _probe(self) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as client:
            while not self.stop.wait(0.25):
                if self.phase is None:
                    continue
                for name, call in (("healthz", lambda: client.get("/healthz")),
                                   ("predict", lambda: client.post("/v1/tasks/SST-2/predict",
                                                                   json={"inputs": ["a fine film"]}))):
                    t0 = time.monotonic()
                    try:
                        status = str(call().status_code)
                    except httpx.HTTPError as exc:
                        status = type(exc).__name__
                    with self.lock:
                        if self.phase is not None:
                            self.phase[f"probe_{name}"][status] += 1
                            if name == "predict":
                                self.phase["probe_predict_worst_s"] = max(self.phase["probe_predict_worst_s"],
                                                                          time.monotonic() - t0)

    def run(self, name: str, fn) -> dict:
        with self.lock:
            self.phase = {"rss_start": rss_bytes(self.pid), "rss_peak": 0, "probe_healthz": Counter(),
                          "probe_predict": Counter(), "probe_predict_worst_s": 0.0}
        time.sleep(0.3)  # a probe before the class starts
        t0 = time.monotonic()
        result = fn()
        time.sleep(0.5)  # and after
        with self.lock:
            phase, self.phase = self.phase, None
        phase.update(result, seconds=round(time.monotonic() - t0, 2), rss_end=rss_bytes(self.pid))
        mib = {k: round(phase[k] / 2**20, 1) for k in ("rss_start", "rss_peak", "rss_end")}
        print(f"{name:28s} rss {mib['rss_start']:7.1f} -> peak {mib['rss_peak']:7.1f} MiB | "
              f"healthz {dict(phase['probe_healthz'])} predict {dict(phase['probe_predict'])} "
              f"(worst {phase['probe_predict_worst_s']:.2f} s) | {result}", flush=True)
        return {**phase, **{f"{k}_mib": v for k, v in mib.items()},
                "probe_healthz": dict(phase["probe_healthz"]), "probe_predict": dict(phase["probe_predict"])}


def relabelled(task: str, n: int, chars: int) -> bytes:
    """The shipped SST-2 bundle as ``task`` with ``n`` labels of ``chars`` characters (head rows repeated)."""
    import numpy as np

    from mask_store.format import HEAD_BIAS, HEAD_WEIGHT, decode_bundle, encode_bundle

    b = decode_bundle((EXAMPLES / "SST-2.smask").read_bytes())
    h = b.header
    w, bias = np.asarray(b.head[HEAD_WEIGHT]), np.asarray(b.head[HEAD_BIAS])
    labels = [(f"{i:05d}-" + "x" * chars)[:chars] for i in range(n)]
    return encode_bundle(task=task, problem_type=h.problem_type, labels=labels, max_seq_length=h.max_seq_length,
                         backbone_fingerprint=h.backbone_fingerprint,
                         masks={m.name: b.mask_array(m.name) for m in h.masks},
                         head={HEAD_WEIGHT: np.resize(w, (n, w.shape[1])), HEAD_BIAS: np.resize(bias, (n,))})


def post(client: httpx.Client, path: str, **kw) -> dict:
    r = client.post(path, **kw)
    out = {"status": r.status_code, "reply_bytes": len(r.content)}
    if r.status_code >= 400:
        err = r.json().get("error")
        out["error"] = (err.get("type") if isinstance(err, dict) else str(err))[:80]
    return out


def slow_sockets(port: int, n: int, first: bytes, then: bytes, hold_s: float, answered: bool) -> dict:
    """``n`` loopback sockets sending ``first`` (``answered``: a complete request, whose reply is read), then
    ``then``; held for ``hold_s`` seconds; how many the server closed by then, and when the last one closed."""
    socks, t0 = [], time.monotonic()
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            break
        s.sendall(first)
        if answered:
            try:
                s.recv(65536)
            except OSError:
                pass
        s.sendall(then)
        s.setblocking(False)
        socks.append(s)
    closed_at: dict[int, float] = {}
    while time.monotonic() - t0 < hold_s:
        for i, s in enumerate(socks):
            if i in closed_at:
                continue
            try:
                if s.recv(65536) == b"":
                    closed_at[i] = time.monotonic() - t0
            except BlockingIOError:
                pass
            except OSError:
                closed_at[i] = time.monotonic() - t0
        time.sleep(0.05)
    for s in socks:
        s.close()
    return {"sockets": len(socks), "closed_by_server": len(closed_at),
            "last_closed_s": round(max(closed_at.values()), 2) if closed_at else None}


def abandoned(port: int, clients: int, path: str, body: bytes, leave_s: float = 0.3) -> dict:
    """``clients`` sockets send ``body`` to ``path`` and close after ``leave_s`` without reading; then how long
    until a one-input predict is answered in under a second (the server has stopped working for them)."""
    socks = []
    for _ in range(clients):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        socks.append(s)
    time.sleep(leave_s)
    for s in socks:
        s.close()
    left = time.monotonic()
    return {"clients": clients, "body_bytes": len(body), "recovered_s": round(settle(port) - left, 1)}


def settle(port: int, limit_s: float = 300) -> float:
    """Poll a one-input predict until five in a row answer 200 within a second (the server works for nobody
    else any more); the time the first of those five was sent (``time.monotonic``)."""
    good, first = 0, time.monotonic()
    deadline = time.monotonic() + limit_s
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=limit_s) as c:
        while good < 5 and time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                ok = c.post("/v1/tasks/SST-2/predict", json={"inputs": ["a fine film"]}).status_code == 200
            except httpx.HTTPError:
                ok = False
            ok = ok and time.monotonic() - t0 < 1.0
            good, first = (good + 1, first if good else t0) if ok else (0, time.monotonic())
            time.sleep(0.2)
    return first


def store_race(rounds: int) -> dict:
    """Two ObjectMaskStore instances on one moto S3 bucket: A reads a truncated object while B re-uploads."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import s3fs
    from moto.server import ThreadedMotoServer

    from mask_store.errors import BundleInvalid, StoredBundleCorrupt, TaskNotFound
    from mask_store.store import open_store

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        opts = {"endpoint_url": f"http://{host}:{port}"}
        moved = []
        a = open_store("s3://race/fleet", options=opts, on_quarantine=lambda task, reason: moved.append(task))
        b = open_store("s3://race/fleet", options=opts)
        raw = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **opts)
        bundles = [(EXAMPLES / n).read_bytes() for n in ("SST-2.smask", "CoLA.smask")]
        good = [relabelled_bytes(d, "race") for d in bundles]
        lost = corrupt_seen = 0
        t0 = time.monotonic()
        for i in range(rounds):
            data = good[i % 2]
            raw.pipe_file(a.path("race"), data[: 40 + (i * 97) % 4000])

            def reader():
                nonlocal corrupt_seen
                try:
                    a.get("race")
                except (StoredBundleCorrupt, TaskNotFound):
                    corrupt_seen += 1

            th = threading.Thread(target=reader)
            th.start()
            b.put("race", data)  # acknowledged
            th.join(30)
            try:
                ok = b.header("race") == a.validate("race", data).header
            except (StoredBundleCorrupt, TaskNotFound):
                ok = False
            lost += not ok
        valid_quarantined = 0
        for key in raw.ls("race/fleet/.quarantine", detail=False) if raw.exists("race/fleet/.quarantine") else []:
            try:
                a.validate("race", raw.cat_file(key))
                valid_quarantined += 1
            except BundleInvalid:
                pass
        return {"rounds": rounds, "acknowledged_lost": lost, "valid_quarantined": valid_quarantined,
                "reads_that_saw_corrupt": corrupt_seen, "quarantines_moved": len(moved),
                "race_seconds": round(time.monotonic() - t0, 1)}
    finally:
        server.stop()


def relabelled_bytes(data: bytes, task: str) -> bytes:
    """``data``'s bundle re-encoded as ``task`` (same masks, head and labels)."""
    import numpy as np

    from mask_store.format import decode_bundle, encode_bundle

    b = decode_bundle(data)
    h = b.header
    return encode_bundle(task=task, problem_type=h.problem_type, labels=list(h.labels),
                         max_seq_length=h.max_seq_length, backbone_fingerprint=h.backbone_fingerprint,
                         masks={m.name: b.mask_array(m.name) for m in h.masks},
                         head={k: np.asarray(v) for k, v in b.head.items()}, text_pairs=h.text_pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--limit-concurrency", type=int, default=64)
    ap.add_argument("--timeout-s", type=float, default=2.0, help="SUPERMASK_HEADER_TIMEOUT_S and _BODY_TIMEOUT_S")
    ap.add_argument("--store-rounds", type=int, default=500)
    args = ap.parse_args()
    port = args.port or _free_port()
    store = Path(tempfile.mkdtemp(prefix="abuse-store-"))
    try:
        proc = start_server(store, port, args.limit_concurrency, args.timeout_s)
    except BaseException:
        shutil.rmtree(store, ignore_errors=True)
        raise
    base = f"http://127.0.0.1:{port}"
    results: dict[str, dict] = {}
    try:
        obs = Observer(proc.pid, base)
        c = httpx.Client(base_url=base, timeout=120)
        n = args.limit_concurrency
        results["v2_duplicate_outputs"] = obs.run("v2_duplicate_outputs", lambda: post(
            c, "/v2/models/SST-2/infer", json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [64],
                                                           "data": ["a fine film"] * 64}],
                                               "outputs": [{"name": "logits"}] * 100_000}))
        results["labels_4096x256"] = obs.run("labels_4096x256", lambda: {
            k: v for k, v in put(c, "huge", relabelled("huge", 4096, 256)).items()})

        def wide() -> dict:
            out = {"uploads": Counter(put(c, f"wide-{i}", relabelled(f"wide-{i}", 128, 64))["status"]
                                      for i in range(16))}
            out.update({f"predict64_{k}": v for k, v in post(c, "/v1/tasks/wide-0/predict", json={
                "inputs": ["a fine film"] * 64, "top_k": None}).items()})
            out["uploads"] = dict(out["uploads"])
            return out

        results["wide_top_k_null"] = obs.run("wide_top_k_null", wide)

        def fanouts() -> dict:
            tasks = [f"wide-{i}" for i in range(16)]
            return {f"inputs{k}": post(c, "/v1/predict", json={"inputs": ["a fine film"] * k, "tasks": tasks,
                                                              "top_k": None}) for k in (64, 32, 8)}

        results["fanout_16_wide_top_k_null"] = obs.run("fanout_16_wide_top_k_null", fanouts)

        def malformed() -> dict:
            statuses = Counter()
            good = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["fine"]}]}
            for outputs in ([{"name": []}], [{"name": {}}], [{"name": None}], "label", [["x"]]):
                statuses[post(c, "/v2/models/SST-2/infer", json={**good, "outputs": outputs})["status"]] += 1
            body = json.dumps(good).encode()
            for value in (b"\xb2", b"1\xb9", b"\xd9\xa3"):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.sendall(b"POST /v2/models/SST-2/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                          b"Inference-Header-Content-Length: " + value + b"\r\nContent-Length: "
                          + str(len(body)).encode() + b"\r\n\r\n" + body)
                statuses[int(s.recv(12)[9:12])] += 1
                s.close()
            return {"statuses": dict(statuses)}

        results["malformed_v2"] = obs.run("malformed_v2", malformed)
        hold = args.timeout_s * 3 + 2
        results["keepalive_partial_heads"] = obs.run("keepalive_partial_heads", lambda: slow_sockets(
            port, n, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /healthz HTTP/1.1\r\nHost: x\r\n", hold,
            answered=True))
        results["stalled_bodies"] = obs.run("stalled_bodies", lambda: slow_sockets(
            port, n, b"POST /v1/tasks/SST-2/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n", b"{",
            hold, answered=False))
        v2_body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [64],
                                          "data": [LONG] * 64}]}).encode()
        results["abandoned_v2"] = obs.run("abandoned_v2", lambda: abandoned(port, 12, "/v2/models/SST-2/infer",
                                                                            v2_body))
        pair_body = json.dumps({"inputs": [[LONG, LONG]] * 64, "tasks": "*"}).encode()
        results["abandoned_fanouts"] = obs.run("abandoned_fanouts", lambda: abandoned(port, 6, "/v1/predict",
                                                                                      pair_body))
        settle(port)  # the store race runs against an idle server
        if args.store_rounds:
            results["store_race"] = obs.run("store_race", lambda: store_race(args.store_rounds))
        obs.stop.set()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(store, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "limit_concurrency": n,
                "timeout_s": args.timeout_s, "cpus": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                           time.gmtime())}
        args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1,
                                                            default=str) + "\n")
        lines = ["# Abuse replay (benchmarks/abuse.py)", "", f"`{meta['command']}` — {meta['when']}, "
                 f"{meta['cpus']} CPUs, limit_concurrency {n}, head/body timeout {args.timeout_s} s.", "",
                 "| class | RSS start → peak → end (MiB) | probe /healthz | probe predict (worst s) | result |",
                 "|---|---|---|---|---|"]
        skip = {"rss_start", "rss_peak", "rss_end", "rss_start_mib", "rss_peak_mib", "rss_end_mib", "probe_healthz",
                "probe_predict", "probe_predict_worst_s"}
        for name, r in results.items():
            rest = {k: v for k, v in r.items() if k not in skip}
            lines.append(f"| {name} | {r['rss_start_mib']} → {r['rss_peak_mib']} → {r['rss_end_mib']} | "
                         f"{r['probe_healthz']} | {r['probe_predict']} ({r['probe_predict_worst_s']:.2f}) | "
                         f"`{json.dumps(rest, default=str)}` |")
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def put(client: httpx.Client, task: str, data: bytes) -> dict:
    r = client.put(f"/v1/tasks/{task}", content=data, headers=AUTH)
    out = {"status": r.status_code, "body_bytes": len(data)}
    if r.status_code >= 400:
        out["error"] = r.json()["error"]["message"][:120]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
