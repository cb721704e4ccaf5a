"""Engine: the task cache and the masked forward pass over the shared backbone.

How the CPU path works. At start-up every masked ``nn.Linear`` of the
backbone is replaced by a :class:`MaskedLinear` that *shares* the backbone's
de-quantized weight tensor (no copy). A task is loaded once (a cache miss):
its bundle is read and validated, each packed mask is unpacked and turned
into that task's resident form (for a low-sparsity mask, a CSR matrix of the
pruned entries ``W ⊙ ¬μ``; for a dense-path mask, the bool mask itself), and
its head becomes two small tensors. A request then sets the task's layer
states on the shared modules and runs one forward pass; each masked layer
computes ``x·Wᵀ − x·(W⊙¬μ)ᵀ`` (or ``x·(W⊙μ)ᵀ``) with the kernels in
:mod:`service.kernels.cpu`. Nothing is copied or re-quantized per request.
A cold task costs one bundle read + checksum + unpack + CSR build (measured
and exported as ``supermask_task_load_duration_seconds``).

Forward passes are serialised by a lock (the shared modules hold the active
task's state during a pass); torch uses its intra-op threads inside a pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from mask_store.errors import BackboneMismatch
from mask_store.format import HEAD_BIAS, HEAD_WEIGHT, Bundle, BundleHeader, BundleInvalid
from mask_store.local import LocalMaskStore
from service.backbone import Backbone, mean_pool, replace_module
from service.errors import InputInvalid, TaskTooLarge
from service.kernels import cpu as cpu_kernels
from service.kernels.reference import masked_linear_reference
from service.kernels.selector import select_path
from service.metrics import Metrics

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class PredictRequest:
    """One predict call: ``inputs`` holds ``(text_a, text_b)`` pairs, ``text_b`` None for single sentences."""

    task: str
    inputs: tuple[tuple[str, str | None], ...]


@dataclass
class LayerState:
    """A task's resident form of one masked matrix.

    ``path`` is "none" (nothing pruned: plain dense product), "complement"
    (``pruned`` is a CSR ``[out, in]`` of ``W ⊙ ¬μ``), "dense" (``mask`` is
    bool ``[out, in]``) or "reference" (``mask`` set; the slow reference kernel).
    """

    path: str
    pruned: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def nbytes(self) -> int:
        n = cpu_kernels.csr_bytes(self.pruned)
        if self.mask is not None:
            n += self.mask.numel() * self.mask.element_size()
        return n


@dataclass
class LoadedTask:
    """A task resident in the cache: header, per-layer states, head ``[num_outputs, hidden]`` and ``[num_outputs]``."""

    header: BundleHeader
    layers: dict[str, LayerState]
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    nbytes: int = 0
    load_seconds: float = 0.0
    bundle_bytes: int = 0


class MaskedLinear(nn.Module):
    """Drop-in for a backbone ``nn.Linear`` that applies the active task's mask.

    Holds references to the backbone's weight ``[out, in]`` (float32,
    ``deq(W_q)``), bias, int8 weight and scales; ``state`` is set by the
    engine for the duration of one forward pass.
    """

    def __init__(self, linear: nn.Linear, w_q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.weight = linear.weight  # shared, not copied
        self.bias = linear.bias
        self.w_q = w_q
        self.scale = scale
        self.state: LayerState | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.state
        if st is None or st.path == "none":
            return nn.functional.linear(x, self.weight, self.bias)
        if st.path == "complement":
            return cpu_kernels.masked_linear_complement(x, self.weight, self.bias, st.pruned)
        if st.path == "dense":
            return cpu_kernels.masked_linear_dense(x, self.weight, self.bias, st.mask)
        return masked_linear_reference(x, self.w_q, self.scale, st.mask, self.bias)


@dataclass
class TaskCache:
    """LRU of loaded tasks bounded in bytes."""

    capacity_bytes: int
    tasks: "OrderedDict[str, LoadedTask]" = field(default_factory=OrderedDict)
    used_bytes: int = 0

    def get(self, task: str) -> LoadedTask | None:
        entry = self.tasks.get(task)
        if entry is not None:
            self.tasks.move_to_end(task)
        return entry

    def put(self, task: str, entry: LoadedTask) -> list[str]:
        """Insert ``entry``; return the names evicted to make room (least recently used first)."""
        self.pop(task)
        evicted = []
        while self.tasks and self.used_bytes + entry.nbytes > self.capacity_bytes:
            name, old = self.tasks.popitem(last=False)
            self.used_bytes -= old.nbytes
            evicted.append(name)
        self.tasks[task] = entry
        self.used_bytes += entry.nbytes
        return evicted

    def pop(self, task: str) -> LoadedTask | None:
        entry = self.tasks.pop(task, None)
        if entry is not None:
            self.used_bytes -= entry.nbytes
        return entry


def choose_path(sparsity: float, kernel_path: str) -> str:
    """Resident form of one matrix on the CPU: "none" when nothing is pruned (unless a path is
    forced), else the path :func:`service.kernels.selector.select_path` picks, without its ``cpu_`` prefix.

    Raises:
        ValueError: ``kernel_path`` cannot run on the CPU (see ``select_path``).
    """
    if sparsity == 0.0 and kernel_path in ("auto", "cpu_complement"):
        return "none"
    return select_path("cpu", sparsity, rows=0, override=kernel_path).removeprefix("cpu_")


class Engine:
    """Serves predictions for any stored task over one shared backbone.

    Args:
        backbone: the loaded, quantized backbone (its modules are wrapped in place).
        store: where bundles live.
        metrics: collectors to record into.
        cache_bytes: byte budget of the task cache.
        max_batch_size: rows per forward pass.
        kernel_path: "auto" or a forced path (see :class:`service.settings.Settings`).
    """

    def __init__(self, backbone: Backbone, store: LocalMaskStore, metrics: Metrics, cache_bytes: int,
                 max_batch_size: int = 32, kernel_path: str = "auto"):
        self.backbone = backbone
        self.store = store
        self.metrics = metrics
        self.cache = TaskCache(cache_bytes)
        self.max_batch_size = max_batch_size
        choose_path(0.5, kernel_path)  # reject a path that cannot run here before any task is loaded
        self.kernel_path = kernel_path
        self._lock = threading.Lock()  # guards the cache and the shared modules during a pass
        self.layers: dict[str, MaskedLinear] = {}
        for name in backbone.masked:
            lin = backbone.model.get_submodule(name)
            if isinstance(lin, MaskedLinear):
                raise ValueError("backbone modules are already wrapped by another engine")
            ml = MaskedLinear(lin, backbone.qweight[name], backbone.scale[name])
            replace_module(backbone.model, name, ml)
            self.layers[name] = ml
        metrics.backbone_bytes.set(backbone.parameter_bytes())
        metrics.cache_capacity_bytes.set(cache_bytes)
        metrics.resident_tasks.set(0)
        metrics.cache_bytes.set(0)

    # ---- task cache -------------------------------------------------------------------------
    def build_task(self, bundle: Bundle) -> LoadedTask:
        """Turn a validated bundle into its resident form.

        Raises:
            BackboneMismatch: the bundle was trained for another backbone.
            BundleInvalid: its matrices do not match this backbone's masked matrices.
        """
        h = bundle.header
        if h.backbone_fingerprint != self.backbone.fingerprint:
            raise BackboneMismatch(h.backbone_fingerprint, self.backbone.fingerprint)
        expected = {f"{n}.weight": n for n in self.backbone.masked}
        names = {m.name for m in h.masks}
        if not names <= set(expected):
            raise BundleInvalid(f"bundle masks matrices this backbone does not have: {sorted(names - set(expected))[:3]}")
        if bundle.head[HEAD_WEIGHT].shape[1] != self.backbone.hidden_size:
            raise BundleInvalid(f"head expects hidden size {bundle.head[HEAD_WEIGHT].shape[1]}, "
                                f"backbone has {self.backbone.hidden_size}")
        layers: dict[str, LayerState] = {}
        for m in h.masks:
            module = expected[m.name]
            layer = self.layers[module]
            if list(layer.weight.shape) != m.shape:
                raise BundleInvalid(f"mask {m.name!r} has shape {m.shape}, backbone weight is {list(layer.weight.shape)}")
            path = choose_path(m.sparsity, self.kernel_path)
            if path == "none":
                layers[module] = LayerState("none")
                continue
            mask = torch.from_numpy(bundle.mask_array(m.name))
            if path == "complement":
                layers[module] = LayerState("complement", pruned=cpu_kernels.pruned_complement(layer.weight, mask))
            else:
                layers[module] = LayerState(path, mask=mask)
        head_w = torch.from_numpy(np.array(bundle.head[HEAD_WEIGHT]))
        head_b = torch.from_numpy(np.array(bundle.head[HEAD_BIAS]))
        nbytes = sum(s.nbytes() for s in layers.values()) + head_w.numel() * 4 + head_b.numel() * 4
        return LoadedTask(h, layers, head_w, head_b, nbytes=nbytes, bundle_bytes=bundle.size_bytes)

    def _load(self, task: str) -> LoadedTask:
        t0 = time.perf_counter()
        entry = self.build_task(self.store.get(task))
        entry.load_seconds = time.perf_counter() - t0
        if entry.nbytes > self.cache.capacity_bytes:
            raise TaskTooLarge(task, entry.nbytes, self.cache.capacity_bytes)
        self.metrics.load_seconds.labels(task).observe(entry.load_seconds)
        log.info("loaded task %s in %.1f ms (%d resident bytes)", task, entry.load_seconds * 1e3, entry.nbytes)
        return entry

    def _get(self, task: str) -> LoadedTask:
        entry = self.cache.get(task)
        if entry is not None:
            self.metrics.cache_hits.labels(task).inc()
            return entry
        self.metrics.cache_misses.labels(task).inc()
        entry = self._load(task)
        for name in self.cache.put(task, entry):
            self.metrics.cache_evictions.inc()
            self.metrics.resident_task_bytes.remove(name)
        self._update_gauges(task, entry)
        return entry

    def _update_gauges(self, task: str | None = None, entry: LoadedTask | None = None) -> None:
        if task is not None and entry is not None:
            self.metrics.resident_task_bytes.labels(task).set(entry.nbytes)
        self.metrics.resident_tasks.set(len(self.cache.tasks))
        self.metrics.cache_bytes.set(self.cache.used_bytes)

    def warm(self, task: str) -> LoadedTask:
        """Load ``task`` into the cache now (raises as :meth:`predict`)."""
        with self._lock:
            return self._get(task)

    def invalidate(self, task: str) -> None:
        """Drop ``task`` from the cache (after an upload replaced it or a delete)."""
        with self._lock:
            if self.cache.pop(task) is not None:
                try:
                    self.metrics.resident_task_bytes.remove(task)
                except KeyError:
                    pass
            self._update_gauges()

    def is_resident(self, task: str) -> bool:
        return task in self.cache.tasks

    # ---- inference --------------------------------------------------------------------------
    def _forward(self, entry: LoadedTask, rows: list[tuple[str, str | None]]) -> torch.Tensor:
        tok = self.backbone.tokenizer
        a = [r[0] for r in rows]
        b = [r[1] for r in rows] if entry.header.text_pairs else None
        enc = tok(a, b, truncation=True, max_length=entry.header.max_seq_length, padding=True, return_tensors="pt")
        for name, layer in self.layers.items():
            layer.state = entry.layers.get(name)
        try:
            kwargs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            if "token_type_ids" in enc:
                kwargs["token_type_ids"] = enc["token_type_ids"]
            hidden = self.backbone.model(**kwargs).last_hidden_state
        finally:
            for layer in self.layers.values():
                layer.state = None
        pooled = mean_pool(hidden, enc["attention_mask"])
        return nn.functional.linear(pooled, entry.head_weight, entry.head_bias)

    @torch.inference_mode()
    def logits(self, task: str, rows: list[tuple[str, str | None]]) -> torch.Tensor:
        """Head outputs ``[len(rows), num_outputs]`` float32 for ``task``.

        Raises:
            TaskNotFound, BundleInvalid, BackboneMismatch, TaskTooLarge.
        """
        with self._lock:
            entry = self._get(task)
            outs = [self._forward(entry, rows[i : i + self.max_batch_size])
                    for i in range(0, len(rows), self.max_batch_size)]
        return torch.cat(outs)

    def predict(self, req: PredictRequest) -> list[dict]:
        """Predictions for a request, in input order.

        Classification: ``{"label", "score", "scores": {label: probability}}``;
        regression: ``{"value"}``.

        Raises:
            TaskNotFound: no such task. InputInvalid: inputs do not fit the task
            (pairs for a single-sentence task or the reverse). BundleInvalid,
            BackboneMismatch, TaskTooLarge: the stored bundle cannot be served.
        """
        t0 = time.perf_counter()
        try:
            header = self.cache.tasks[req.task].header if req.task in self.cache.tasks else self.store.header(req.task)
            pairs = [r[1] is not None for r in req.inputs]
            if header.text_pairs and not all(pairs):
                raise InputInvalid(f"task {req.task!r} takes sentence pairs: send inputs as [[text_a, text_b], ...]")
            if not header.text_pairs and any(pairs):
                raise InputInvalid(f"task {req.task!r} takes single texts: send inputs as [text, ...]")
            out = self.logits(req.task, list(req.inputs))
        except Exception:
            # unknown names share one label so that a scan of bad names cannot grow the label set
            known = req.task in self.cache.tasks or self.store.exists(req.task)
            self.metrics.requests.labels(req.task if known else "_unknown", "error").inc()
            raise
        preds = _decode(header, out)
        dt = time.perf_counter() - t0
        self.metrics.request_seconds.labels(req.task).observe(dt)
        self.metrics.requests.labels(req.task, "ok").inc()
        self.metrics.rows.labels(req.task).observe(len(req.inputs))
        return preds


def _decode(header: BundleHeader, out: torch.Tensor) -> list[dict]:
    if header.problem_type == "regression":
        return [{"value": float(v)} for v in out.squeeze(-1).tolist()]
    probs = torch.softmax(out, dim=-1)
    result = []
    for row in probs.tolist():
        best = int(np.argmax(row))
        result.append({"label": header.labels[best], "score": row[best],
                       "scores": {lab: p for lab, p in zip(header.labels, row)}})
    return result
