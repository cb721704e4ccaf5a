"""The tier protocol, and the pass shared by the torch tiers (a dispatcher computes each masked product)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Protocol

import torch

from backbone import Backbone, mean_pool
from service.encoder import LeanEncoder
from service.dispatch import Segments
from service.hot_tier import HotCache
from service.kernels import cpu_hot
from service.masked_linear import MaskedLinear
from service.metrics import Metrics
from service.sparse_forms import SparseCache
from service.tasks import LoadedTask


log = logging.getLogger(__name__)

SMALL_PASS_ROWS = 448
"""Hot-tier CPU passes of fewer token rows (batch x padded length) run on one intra-op thread.

Measured on a 2-core AMD EPYC, torch 2.13 (GNU OpenMP): in a thread other than the main one — where the
server runs its passes — each parallel region costs ~50 us more than on the main thread (LayerNorm over 12
rows: 57 vs 7 us). A bf16 MiniLM pass of 44 / 176 / 352 token rows took 4.6 / 12.0 / 24.8 ms on one thread
against 7.3 / 14.6 / 33.3 on two; of 528 / 704 / 1,408 rows 57 / 69 / 131 ms against 35 / 48 / 100."""


@contextlib.contextmanager
def few_threads(rows: int, below: int):
    """Run the block on one torch intra-op thread when a CPU pass has fewer than ``below`` token rows (0: never)."""
    threads = torch.get_num_threads()
    small = rows < below and threads > 1
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(threads)


class Tier(Protocol):
    """What the engine and :class:`service.forward.Forward` need of a tier; nothing else branches on it.

    Attributes:
        precision: what the tier computes in, as ``/healthz`` and ``supermask_cpu_precision_info`` report it
            ("fp32", "bf16", "int8" or "device").
        runtime: the library that runs the pass ("torch" or "onnxruntime").
        device: where the pass runs.
        max_tasks: most tasks one pass may mix (None: any number).
        warm_form: the resident form :class:`service.tasks.TaskBuilder` builds for this tier: "cpu" (the fp32
            forms), "packed" (the bundle's bits; a hot tier materialises them) or "device".
        weights: masked module name → the tensor whose shape and values the task builder checks bundles against.
        hot: the tier's hot cache (tasks' promoted forms), or None.
        dedicated_thread: passes run on one dedicated thread (True) or the event loop's default pool.
    """

    precision: str
    runtime: str
    device: torch.device
    max_tasks: int | None
    warm_form: str
    weights: dict[str, torch.Tensor]
    hot: HotCache | None
    dedicated_thread: bool

    def promote(self, task: str, entry: LoadedTask, keep: bool | None = None) -> Any:
        """The form of ``task`` a pass needs, built now (outside the pass lock) so that no pass waits for it;
        None when the tier needs none. ``keep`` False: for that pass only, evicting nothing (a hot cache's
        :meth:`service.hot_tier.HotCache.get`)."""
        ...

    def forget(self, task: str, pass_lock: contextlib.AbstractContextManager) -> None:
        """Free what the tier holds of ``task`` (it was replaced or deleted); ``pass_lock`` guards state a pass
        may be using."""
        ...

    def pooled(self, segs: Segments, forms: dict[str, Any] | None, inputs: dict[str, torch.Tensor],
               seq_starts: list[int]) -> torch.Tensor:
        """One forward pass over the rows of several tasks: mean-pooled last hidden states float32
        ``[batch, hidden]`` on the CPU.

        Args:
            segs: the pass's segments, one per task.
            forms: :meth:`promote`'s result per task (None: promoted here where needed).
            inputs: int64 ``[batch, T]`` ``input_ids``, ``attention_mask`` (and ``token_type_ids``) on the CPU,
                rows sorted by segment.
            seq_starts: ``[len(segs) + 1]`` row offsets of the segments in ``inputs``.
        """
        ...

    def status(self) -> dict:
        """For ``/healthz``: at least ``{"precision", "runtime"}``."""
        ...


SPARSE_MAX_PRUNED = 0.25
"""A task with more of its masked weights pruned than this is not served through a sparse form (its hot form is
built for the pass instead): measured on a 1536 x 384 int8 product of 128 rows, a sparse form took 1.0 ms at 3 %
pruned (hot 0.5, building the hot form 2.75), 2.5 ms at 25 % and 4.6 ms at 50 %, and its CSR outgrows the hot
form's bytes from ~25 % (the fp32 tier's complement path stops at the same sparsity)."""


class HotCached:
    """For a tier whose tasks are promoted into a hot cache (:class:`service.hot_tier.HotCache`): a pass needs the
    task's hot form, built once outside the pass lock, or — for a task not (yet) hot, where the tier has them — its
    sparse form (:mod:`service.sparse_forms`); a replaced or deleted task's forms are dropped."""

    hot: HotCache
    sparse: SparseCache | None = None
    precision: str
    runtime: str
    #: more of a task's masked weights pruned than this: its hot form is built for the pass instead of a sparse form
    sparse_max_pruned: float = SPARSE_MAX_PRUNED

    def promote(self, task: str, entry: LoadedTask, keep: bool | None = None) -> Any:
        return self.hot.get(task, entry, keep, fallback=None if self.sparse is None else self._sparse_or_pass)

    def _sparse_or_pass(self, task: str, entry: LoadedTask) -> Any:
        """The form serving a task that is not hot (counted in ``supermask_hot_admissions_total``): its sparse form;
        or, more than :attr:`sparse_max_pruned` pruned, its hot form built for the pass (its sparse form then, should
        that build fail)."""
        states = [st for st in entry.layers.values() if st.masked]
        weights = sum(st.shape[0] * st.shape[1] for st in states)
        pruned = sum(st.sparsity * st.shape[0] * st.shape[1] for st in states)
        if weights and pruned > self.sparse_max_pruned * weights:
            try:
                return self.hot.build_for_pass(task, entry)
            except Exception:  # noqa: BLE001 - the sparse form still answers, only slower
                log.exception("building task %s's hot form for a pass failed; served through its sparse form", task)
        self.hot._admitted("sparse")
        return self.sparse.form(task, entry)

    def forget(self, task: str, pass_lock: contextlib.AbstractContextManager) -> None:
        self.hot.drop(task)
        if self.sparse is not None:
            self.sparse.drop(task)

    def status(self) -> dict:
        out = {"precision": self.precision, "runtime": self.runtime, "hot": self.hot.status()}
        if self.sparse is not None:
            out["sparse"] = self.sparse.status()
        return out


class TorchTier:
    """A torch tier: the tier's dispatcher builds the pass's segment table and computes every masked product;
    the encoder is the lean one (:mod:`service.encoder`) where given, else the model's own modules (each masked
    ``nn.Linear`` replaced by a :class:`MaskedLinear` that asks the dispatcher).

    Args:
        backbone: the backbone whose masked modules are ``layers``.
        layers: the engine's masked layers, by module name.
        dispatcher: the tier's dispatcher (:mod:`service.dispatch`).
        device: where the model runs.
        encoder: the lean encoder (with a dispatcher that has ``product(group, x, table, low)``), or None.
        single_thread_below: CPU passes of fewer token rows run on one intra-op thread (0: never).
    """

    runtime = "torch"
    hot: HotCache | None = None
    dedicated_thread = False

    def __init__(self, backbone: Backbone, layers: dict[str, MaskedLinear], dispatcher, device: torch.device,
                 encoder: LeanEncoder | None = None, single_thread_below: int = 0):
        self.backbone = backbone
        self.layers = layers
        self.dispatcher = dispatcher
        self.device = device
        self.encoder = encoder
        self.single_thread_below = single_thread_below
        for ml in layers.values():
            ml.dispatcher = dispatcher

    @property
    def max_tasks(self) -> int | None:
        return self.dispatcher.max_tasks

    def promote(self, task: str, entry: LoadedTask, keep: bool | None = None) -> Any:
        return None

    def forget(self, task: str, pass_lock: contextlib.AbstractContextManager) -> None:
        return None

    def status(self) -> dict:
        return {"precision": self.precision, "runtime": self.runtime}

    def pooled(self, segs: Segments, forms: dict[str, Any] | None, inputs: dict[str, torch.Tensor],
               seq_starts: list[int]) -> torch.Tensor:
        seq_len = inputs["input_ids"].shape[1]
        table = self.dispatcher.prepare(segs, [s * seq_len for s in seq_starts], forms)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with few_threads(table.row_starts[-1], self.single_thread_below if self.device.type == "cpu" else 0):
            hidden = self._encode(inputs, table)
        return mean_pool(hidden.float(), inputs["attention_mask"]).cpu()

    def _encode(self, inputs: dict[str, torch.Tensor], table) -> torch.Tensor:
        """Last hidden states ``[batch, T, hidden]`` of one pass (lean encoder, or the model's modules)."""
        if self.encoder is not None:
            product = self.dispatcher.product
            return self.encoder(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"),
                                lambda group, x, low=False: product(group, x, table, low))
        for layer in self.layers.values():
            layer.segments = table
        try:
            return self.backbone.model(**inputs).last_hidden_state
        finally:
            for layer in self.layers.values():
                layer.segments = None


SPARSE_CACHE_BYTES = 128 * 1024 * 1024
"""Default byte budget of a tier's sparse forms (``SUPERMASK_SPARSE_CACHE_BYTES``): ~50 MiniLM tasks at 3 % pruned."""


def split_policy(hot_policy: dict | None) -> tuple[dict, int]:
    """``(the hot cache's policy, the sparse forms' byte budget)`` from an engine's ``hot_policy`` (its
    ``sparse_bytes`` key: 0 serves a task that is not hot by building its hot form for the pass, as before sparse
    forms existed)."""
    policy = dict(hot_policy or {})
    return policy, int(policy.pop("sparse_bytes", SPARSE_CACHE_BYTES))


def sparse_cache(cat: dict[str, tuple], groups: dict[str, list[str]], layers: dict[str, MaskedLinear],
                 precision: str, sparse_bytes: int, metrics: Metrics) -> SparseCache | None:
    """The sparse forms of a tier whose plain product multiplies the groups' ``cat`` (``(w_q, scale, bias)`` per
    group, :func:`service.hot_weights.group_matrices`) in ``precision``; None when ``sparse_bytes`` is 0 or the
    precision has no sparse form."""
    if sparse_bytes <= 0 or precision not in ("int8", "bf16"):
        return None
    reason = cpu_hot.unavailable_reason(precision)
    if reason is not None:  # the ONNX Runtime tier can serve int8 where torch's int8 products cannot run
        log.info("no sparse forms: their plain %s products cannot run here (%s)", precision, reason)
        return None
    return SparseCache({g: (m[0], m[1]) for g, m in cat.items()}, groups,
                       {n: tuple(ml.w_q.shape) for n, ml in layers.items()}, precision, sparse_bytes, metrics)
