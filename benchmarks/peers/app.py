"""A peer server for ``benchmarks/cpu_peers.py``: one model per task, this server's REST route.

    python -m benchmarks.peers.app --kind hf-fp32 --backbone DIR --task-names a,b,c --port 8100

Kinds:

* ``hf-fp32``: one Hugging Face ``AutoModel`` per task, loaded from the local backbone folder, its
  weights copied into the process (a fine-tuned model per task shares nothing with the others; without
  the copy every model would map the same safetensors file), mean pooling, a linear head;
* ``hf-int8``: the same with each model's ``nn.Linear`` layers converted by torch dynamic int8
  quantization (``torch.ao.quantization.quantize_dynamic``);
* ``ort-int8``: one ONNX Runtime session per task over the int8 model of
  :mod:`benchmarks.peers.onnx_export` (``--onnx``), pooling and head in NumPy; with ``--onnx-dir`` each task's
  session is created from its own file ``<dir>/<task>.onnx`` (a fine-tuned model per task, as
  ``benchmarks/many_tasks.py`` writes them);
* ``ov``: one OpenVINO model per task, ``openvino.Core().compile_model`` of the float32 ONNX export
  (:func:`benchmarks.peers.onnx_export.export_fp32`, ``--onnx``, or ``--onnx-dir``) on the CPU plugin with its
  default hints (latency; its default inference precision, bf16 on a CPU with AVX-512 BF16 or AMX), as the
  OpenVINO documentation runs a model; ``--threads`` sets ``INFERENCE_NUM_THREADS``. Each request takes an
  infer request of its task's model from a pool (an infer request serves one call at a time; a compiled model
  many). ``/healthz`` names the precision, hint and streams the plugin chose.

Heads are random (seeded per task): the figures are costs, the logits mean nothing. A task's model is
loaded on its first request, as this server loads a task. Forward passes run one at a time on a single
worker thread (concurrent requests queue; no cross-request batching), each with ``--threads`` intra-op
threads; with ``--concurrent`` they run side by side in FastAPI's thread pool, as a plain ``def`` route does.
``--lru N`` keeps at most N tasks' models resident, least recently used dropped first (a dropped task is loaded
again on its next request), as a user with more tasks than memory would. Routes:
``POST /v1/tasks/{task}/predict`` (body ``{"inputs": ["text", ...]}`` or pairs
``[["a", "b"], ...]``; answer ``{"task", "predictions": [{"label", "score", "scores"}]}``),
``GET /v1/tasks``, ``GET /healthz`` (with ``resident_tasks``, ``loads`` since start and ``lru``). Binds 127.0.0.1
only.
"""

import argparse
import asyncio
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

KINDS = ("hf-fp32", "hf-int8", "ort-int8", "ov")
LABELS = ("negative", "positive")


class Runner:
    """Per-task models behind one tokenizer; :meth:`logits` loads a task's model on first use."""

    def __init__(self, backbone: str, names: list[str], max_seq_length: int = 128, seed: int = 0,
                 lru: int | None = None):
        from cachetools import LRUCache
        from transformers import AutoConfig, AutoTokenizer

        self.backbone = backbone
        self.max_seq_length = max_seq_length
        self.tok = AutoTokenizer.from_pretrained(backbone, local_files_only=True)
        hidden = AutoConfig.from_pretrained(backbone, local_files_only=True).hidden_size
        self.heads = {}
        for i, name in enumerate(names):
            rng = np.random.default_rng(seed + i)
            self.heads[name] = (rng.normal(0, 0.02, size=(len(LABELS), hidden)).astype(np.float32),
                                np.zeros(len(LABELS), dtype=np.float32))
        self.lru = lru
        self.models: dict[str, object] | LRUCache = LRUCache(maxsize=lru) if lru else {}
        self.loads = 0  # models created since start (first uses, and reloads after an LRU drop)
        self._lock = threading.Lock()

    def encode(self, rows: list[tuple[str, str | None]], tensors: str):
        a = [r[0] for r in rows]
        b = [r[1] for r in rows] if rows[0][1] is not None else None
        return self.tok(a, b, padding=True, truncation=True, max_length=self.max_seq_length, return_tensors=tensors)

    def model(self, task: str):
        with self._lock:
            if task not in self.models:
                self.models[task] = self.load(task)
                self.loads += 1
            return self.models[task]

    def logits(self, task: str, rows: list[tuple[str, str | None]]) -> np.ndarray:
        pooled = self.pooled(self.model(task), rows)
        w, b = self.heads[task]
        return pooled @ w.T + b

    def load(self, task: str):  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        """What ``/healthz`` says of the runtime beyond the counts (none here)."""
        return {}

    def pooled(self, model, rows) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class HFRunner(Runner):
    def __init__(self, *args, int8: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.int8 = int8

    def load(self, task: str):
        import warnings

        import torch
        from transformers import AutoModel

        model = AutoModel.from_pretrained(self.backbone, local_files_only=True).eval()
        with torch.no_grad():  # own the weights (see the module docstring)
            for t in [*model.parameters(), *model.buffers()]:
                t.data = t.data.clone()
        if self.int8:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated; fine for a peer
                model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8,
                                                               inplace=True)
        return model

    def pooled(self, model, rows) -> np.ndarray:
        import torch

        enc = self.encode(rows, "pt")
        with torch.inference_mode():
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            return ((h * m).sum(1) / m.sum(1).clamp(min=1)).float().numpy()


class ORTRunner(Runner):
    def __init__(self, *args, onnx_path: str | None = None, onnx_dir: str | None = None, threads: int | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.onnx_path, self.onnx_dir = onnx_path, onnx_dir
        self.threads = threads

    def load(self, task: str):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.threads:
            so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(self.model_path(task), so, providers=["CPUExecutionProvider"])

    def model_path(self, task: str) -> str:
        """``task``'s ONNX file: its own under ``onnx_dir``, else the one every task shares."""
        return str(Path(self.onnx_dir) / f"{task}.onnx") if self.onnx_dir else self.onnx_path

    def pooled(self, session, rows) -> np.ndarray:
        feed = self.feed(rows, {i.name for i in session.get_inputs()})
        return mean_pool(session.run(["last_hidden_state"], feed)[0], feed["attention_mask"])

    def feed(self, rows, wanted: set[str]) -> dict[str, np.ndarray]:
        """The tokenized ``rows`` as int64 ``[batch, seq]`` arrays, for the graph inputs named in ``wanted``."""
        enc = self.encode(rows, "np")
        return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items() if k in wanted}


def mean_pool(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``h`` float ``[batch, seq, hidden]`` over the positions where ``mask`` ``[batch, seq]`` is 1."""
    m = mask[..., None].astype(h.dtype)
    return (h * m).sum(1) / np.maximum(m.sum(1), 1)


class OVModel:
    """A task's compiled OpenVINO model and its pool of infer requests (one per concurrent call, made on demand)."""

    def __init__(self, compiled):
        import queue

        self.compiled = compiled
        self.inputs = {i.any_name for i in compiled.inputs}
        self.output = compiled.output("last_hidden_state")
        self._idle = queue.SimpleQueue()

    def run(self, feed: dict[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
        """Mean-pooled hidden states float32 ``[batch, hidden]`` of ``feed``."""
        import queue

        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            # pooled before the request goes back: its output tensor is overwritten by its next call
            return mean_pool(request.infer(feed)[self.output], mask)
        finally:
            self._idle.put(request)


class OVRunner(ORTRunner):
    """One OpenVINO compiled model per task over the float32 ONNX export, CPU plugin, default hints."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import openvino as ov

        self.core = ov.Core()
        self.config = {"INFERENCE_NUM_THREADS": self.threads} if self.threads else {}
        self.compiled_properties: dict = {}  # of the first model compiled: what the plugin chose

    def load(self, task: str) -> OVModel:
        compiled = self.core.compile_model(self.model_path(task), "CPU", self.config)
        if not self.compiled_properties:
            self.compiled_properties = {p: ov_text(compiled.get_property(p)) for p in (
                "INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS", "INFERENCE_NUM_THREADS",
                "EXECUTION_MODE_HINT")}
        return OVModel(compiled)

    def pooled(self, model: OVModel, rows) -> np.ndarray:
        feed = self.feed(rows, model.inputs)
        return model.run(feed, feed["attention_mask"])

    def describe(self) -> dict:
        """The OpenVINO version and the CPU plugin's default inference precision and performance hint (before any
        model is compiled), then the first compiled model's own choices (``compiled``)."""
        import openvino as ov

        precision = ov_text(self.core.get_property("CPU", "INFERENCE_PRECISION_HINT"))
        return {"runtime": "openvino", "openvino": ov.__version__,
                "precision": {"f32": "fp32", "f16": "fp16"}.get(precision, precision),
                "performance_hint": ov_text(self.core.get_property("CPU", "PERFORMANCE_HINT")),
                "compiled": self.compiled_properties}


def ov_text(value) -> str:
    """An OpenVINO property value as text: an element type by its short name (``bf16``, ``f32``), an enum by its
    member name (``LATENCY``), anything else by ``str``."""
    if hasattr(value, "to_string"):
        return value.to_string()
    return getattr(value, "name", None) or str(value)


def make_runner(kind: str, backbone: str, names: list[str], threads: int | None, onnx_path: str | None,
                max_seq_length: int = 128, seed: int = 0, lru: int | None = None,
                onnx_dir: str | None = None) -> Runner:
    """The runner of ``kind``; ``lru``: most models resident at once (None: all).

    Raises:
        ValueError: an unknown ``kind``, or ``ort-int8`` / ``ov`` with neither ``onnx_path`` nor ``onnx_dir``.
        ImportError: ``ov`` without the ``openvino`` package.
    """
    if kind == "ort-int8":
        if not onnx_path and not onnx_dir:
            raise ValueError("--kind ort-int8 needs --onnx or --onnx-dir (benchmarks/peers/onnx_export.py writes it)")
        return ORTRunner(backbone, names, max_seq_length, seed, lru, onnx_path=onnx_path, onnx_dir=onnx_dir,
                         threads=threads)
    if kind == "ov":
        if not onnx_path and not onnx_dir:
            raise ValueError("--kind ov needs --onnx or --onnx-dir (benchmarks/peers/onnx_export.py writes it)")
        return OVRunner(backbone, names, max_seq_length, seed, lru, onnx_path=onnx_path, onnx_dir=onnx_dir,
                        threads=threads)
    if kind in ("hf-fp32", "hf-int8"):
        return HFRunner(backbone, names, max_seq_length, seed, lru, int8=kind == "hf-int8")
    raise ValueError(f"unknown peer kind {kind!r}; one of {', '.join(KINDS)}")


def create_app(runner: Runner, kind: str, concurrent: bool = False):
    from fastapi import FastAPI, HTTPException
    from fastapi.concurrency import run_in_threadpool
    from pydantic import BaseModel

    class PredictIn(BaseModel):  # resolved at definition: this module has no `from __future__ import annotations`
        inputs: list[str | list[str]]

    app = FastAPI(title=f"peer {kind}")
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")  # one forward at a time

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "kind": kind, "tasks": len(runner.heads), "resident_tasks": len(runner.models),
                "loads": runner.loads, "lru": runner.lru, **runner.describe()}

    @app.get("/v1/tasks")
    async def tasks():
        return {"tasks": [{"name": n, "resident": n in runner.models, "labels": list(LABELS)} for n in runner.heads]}

    @app.post("/v1/tasks/{task}/predict")
    async def predict(task: str, body: PredictIn):
        if task not in runner.heads:
            raise HTTPException(404, f"task {task!r} not found")
        if not body.inputs:
            raise HTTPException(422, "inputs is empty")
        rows = []
        for item in body.inputs:
            texts = [item] if isinstance(item, str) else item
            if len(texts) not in (1, 2):
                raise HTTPException(422, "each input is a text or a [text_a, text_b] pair")
            rows.append((texts[0], texts[1] if len(texts) == 2 else None))
        if len({r[1] is None for r in rows}) > 1:
            raise HTTPException(422, "mix of single texts and pairs in one request")
        if concurrent:  # as a plain ``def`` route runs: in the server's thread pool, requests side by side
            logits = await run_in_threadpool(runner.logits, task, rows)
        else:
            logits = await asyncio.get_running_loop().run_in_executor(worker, runner.logits, task, rows)
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
        preds = []
        for p in probs:
            k = int(p.argmax())
            preds.append({"label": LABELS[k], "score": float(p[k]),
                          "scores": {lab: float(v) for lab, v in zip(LABELS, p)}})
        return {"task": task, "predictions": preds}

    return app


def main(argv: list[str] | None = None) -> int:
    from supermask.cli import HelpFormatter

    ap = argparse.ArgumentParser(prog="python -m benchmarks.peers.app", description=__doc__.split("\n\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--kind", choices=KINDS, required=True, help="how each task's model is held and run")
    ap.add_argument("--backbone", required=True, help="local Hugging Face encoder folder")
    names_from = ap.add_mutually_exclusive_group(required=True)
    names_from.add_argument("--task-names", help="comma-separated task names to serve")
    names_from.add_argument("--task-names-file", help="file of task names to serve, one a line (for thousands)")
    ap.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads (torch / ONNX Runtime; OpenVINO's INFERENCE_NUM_THREADS)")
    ap.add_argument("--onnx", default=None, help="ONNX model file shared by every task: int8 (--kind ort-int8) or "
                                                 "float32 (--kind ov)")
    ap.add_argument("--onnx-dir", default=None, help="folder of one ONNX file per task, <task>.onnx "
                                                     "(--kind ort-int8 or ov; instead of --onnx)")
    ap.add_argument("--lru", type=int, default=None,
                    help="most tasks' models resident at once, least recently used dropped first (default: all)")
    ap.add_argument("--max-seq-length", type=int, default=128, help="tokens per input after truncation")
    ap.add_argument("--concurrent", action="store_true",
                    help="run requests side by side in the server's thread pool (a plain FastAPI `def` route) "
                         "instead of one forward at a time")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random heads (task i uses seed + i)")
    args = ap.parse_args(argv)
    text = Path(args.task_names_file).read_text() if args.task_names_file else args.task_names.replace(",", "\n")
    names = [n.strip() for n in text.splitlines() if n.strip()]
    if not names:
        ap.error("--task-names is empty")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    import uvicorn

    if args.lru is not None and args.lru < 1:
        ap.error(f"--lru must be at least 1, got {args.lru}")
    runner = make_runner(args.kind, args.backbone, names, args.threads, args.onnx, args.max_seq_length, args.seed,
                         args.lru, args.onnx_dir)
    uvicorn.run(create_app(runner, args.kind, args.concurrent), host="127.0.0.1", port=args.port, log_level="warning",
                access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
