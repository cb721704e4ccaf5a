"""The ONNX Runtime CPU tier (int8): one ONNX Runtime session per hot task (:mod:`service.kernels.ort_encoder`),
its masked weights ``W_q ⊙ μ`` prepacked once at promotion; a pass runs each segment's rows through its task's
session (no Python between the ops, any batch and length without per-shape set-up).

Warm tasks are the bundle's masks as stored (as for the torch hot tier); a promotion reads their pruned positions,
writes zeros there into the backbone's int8 weights (kept in the graph's layout) and creates the session (on a background thread, once the task has earned its place); least
recently used sessions are evicted beyond ``SUPERMASK_HOT_CACHE_BYTES``. A task that is not hot is served through
its sparse form (:mod:`service.sparse_forms`): torch's int8 products over the plain weights, shared by every such
task in the pass, minus each task's sparse correction.
"""

from __future__ import annotations

from typing import Any

import torch

from backbone import Backbone
from service.encoder import LeanEncoder
from service.hot_tier import HotCache
from service.hot_weights import masked_groups
from service.kernels.cpu_hot import materialize
from service.kernels.ort_encoder import OrtEncoder
from service.masked_linear import MaskedLinear
from service.metrics import Metrics
from service.tasks import LoadedTask
from service.sparse_forms import SparseForm, group_positions, sparse_pooled
from service.tiers.base import SMALL_PASS_ROWS, HotCached, Segments, few_threads, sparse_cache, split_policy


SESSION_BYTES_PER_WEIGHT_BYTE = 2.42
"""Resident memory of one hot session per byte of its int8 weights, measured: MiniLM (10.6 MB of int8 weights)
held 24.5 MiB (25.7 MB) of RSS per session after a 32-row pass (ten sessions, glibc trimmed, no memory arena):
the prepacked weights, their column sums and the session's graph and thread pool."""


SPARSE_LENGTH_BUCKET = 16
"""The sparse pass pads its token length up to a multiple of this (right padding, masked): torch's oneDNN int8
products build a primitive for every new row count, which a stream of sentences of every length would otherwise
do on the request path (the ONNX Runtime sessions take any shape); padded positions change no answer."""


def pad_to_bucket(inputs: dict[str, torch.Tensor], bucket: int) -> dict[str, torch.Tensor]:
    """``inputs`` (int64 ``[batch, T]`` each, right-padded) padded with zeros to ``T`` rounded up to ``bucket``."""
    seq = inputs["input_ids"].shape[1]
    extra = -seq % bucket
    if extra == 0:
        return inputs
    return {k: torch.nn.functional.pad(v, (0, extra)) for k, v in inputs.items()}


class OrtHotCache(HotCache):
    """Task → its ONNX Runtime session (the hot form), LRU bounded in bytes (a session's int8 weights).

    Args:
        ort_encoder: builds the sessions.
        capacity_bytes, metrics, policy: as :class:`service.hot_tier.HotCache`.
    """

    def __init__(self, ort_encoder: OrtEncoder, capacity_bytes: int, metrics: Metrics | None = None, **policy):
        super().__init__(capacity_bytes, metrics, **policy)
        self.ort = ort_encoder
        self.shapes = {g: [tuple(ort_encoder.members_shapes[n]) for n in members]
                       for g, members in ort_encoder.groups.items()}

    def _promote(self, task: str, entry: LoadedTask) -> tuple[Any, int]:
        # the pruned positions, as the bundle codes them (no mask unpacked): zeros written into W_q, exact
        pruned = {g: group_positions(entry, self.ort.groups[g], self.shapes[g])
                  for g in masked_groups(entry, self.ort.groups)}
        return self.ort.session_pruned(pruned), self.task_bytes(entry)

    def task_bytes(self, entry: LoadedTask) -> int:
        """A session's resident bytes, estimated from its int8 weights: :data:`SESSION_BYTES_PER_WEIGHT_BYTE` x."""
        return int(SESSION_BYTES_PER_WEIGHT_BYTE * self.ort.weight_bytes())


class OrtTier(HotCached):
    """Args:
        backbone: a plain-BERT-layout backbone (:meth:`service.encoder.LeanEncoder.unsupported` is None).
        layers: the engine's masked layers (their int8 weights, scales and biases).
        hot_cache_bytes: byte budget of the hot sessions.
        metrics: promotions and residency are recorded here.
        threads: intra-op threads of each session.
        hot_policy: ``pinned`` / ``promote_after`` / ``window_s`` / ``background`` of the hot cache
            (:class:`service.hot_tier.HotCache`), and ``sparse_bytes``: the budget of the sparse forms that serve a
            task not (yet) hot (:mod:`service.sparse_forms`; the rows of those tasks run through torch's int8
            products over the plain weights, minus each task's sparse correction).

    Raises:
        ValueError: the layout is not plain BERT, or its activation has no graph form.
        RuntimeError: ONNX Runtime is missing or cannot run its int8 ops here.
    """

    precision = "int8"
    runtime = "onnxruntime"
    sparse_max_pruned = 1.0  # a session for one pass (~100 ms) never beats a sparse form (a few ms more than hot)
    device = torch.device("cpu")
    max_tasks = None
    warm_form = "packed"
    dedicated_thread = True

    def __init__(self, backbone: Backbone, layers: dict[str, MaskedLinear], hot_cache_bytes: int, metrics: Metrics,
                 threads: int, hot_policy: dict | None = None):
        reason = LeanEncoder.unsupported(backbone.model)
        if reason is not None:
            raise ValueError(f"the onnxruntime tier needs the plain BERT layout: {reason}")
        matrices = {n: (ml.w_q, ml.scale, ml.bias) for n, ml in layers.items()}
        self.ort = OrtEncoder(LeanEncoder(backbone.model), matrices, threads=threads)
        policy, sparse_bytes = split_policy(hot_policy)
        self.hot = OrtHotCache(self.ort, hot_cache_bytes, metrics, **policy)
        # the groups' plain int8 weights are the encoder's own (Q|K|V concatenated once, not again here)
        cat = {g: (self.ort.base[g], torch.from_numpy(self.ort.const(f"{g}.scale")),
                   torch.from_numpy(self.ort.const(f"{g}.bias"))) for g in self.ort.groups}
        self.sparse = sparse_cache(cat, self.ort.groups, layers, self.precision, sparse_bytes, metrics)
        #: the plain int8 products (torch, oneDNN) that serve the rows of tasks on their sparse forms
        self.plain = ({g: materialize(w, s, None, b, self.precision) for g, (w, s, b) in cat.items()}
                      if self.sparse is not None else {})
        self.weights = {n: ml.w_q for n, ml in layers.items()}
        for ml in layers.values():
            ml.weight = None  # the float32 deq(W_q) is not used by this tier: not kept

    def pooled(self, segs: Segments, forms: dict[str, Any] | None, inputs: dict[str, torch.Tensor],
               seq_starts: list[int]) -> torch.Tensor:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        chosen = [forms[task] if forms and task in forms else self.promote(task, entry) for task, entry in segs]
        outs: list[torch.Tensor | None] = [None] * len(segs)
        sparse = [i for i, f in enumerate(chosen) if isinstance(f, SparseForm)]
        if sparse:
            self._sparse_pass(sparse, chosen, inputs, seq_starts, outs)
        if len(sparse) == len(segs):
            return torch.cat(outs) if len(outs) > 1 else outs[0]
        embedded = self.ort.embed(ids, inputs.get("token_type_ids"))
        for i, session in enumerate(chosen):
            if outs[i] is not None:
                continue
            a, b = seq_starts[i], seq_starts[i + 1]
            seg_mask = mask[a:b]
            width = int(seg_mask.sum(dim=1).max())  # right padding: this segment's own longest row
            if bool(seg_mask[:, width:].any()):
                width = seg_mask.shape[1]  # left padding: keep every column
            outs[i] = OrtEncoder.run(session, embedded[a:b, :width], seg_mask[:, :width])
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _sparse_pass(self, which: list[int], chosen: list, inputs: dict[str, torch.Tensor], seq_starts: list[int],
                     outs: list) -> None:
        """The segments ``which`` (on their sparse forms) in one torch pass; their pooled rows into ``outs``."""
        spans = [(seq_starts[i], seq_starts[i + 1]) for i in which]
        if len(which) == len(chosen):
            sub = dict(inputs)
        else:
            rows = torch.cat([torch.arange(a, b) for a, b in spans])
            sub = {k: v[rows] for k, v in inputs.items()}
        mask = sub["attention_mask"]
        width = int(mask.sum(dim=1).max())
        if not bool(mask[:, width:].any()):  # right padding: the columns no row of these segments uses go, and
            sub = {k: v[:, :width] for k, v in sub.items()}  # the length is padded up to a bucket
            sub = pad_to_bucket(sub, SPARSE_LENGTH_BUCKET)
        starts = [0]
        for a, b in spans:
            starts.append(starts[-1] + b - a)
        with few_threads(starts[-1] * sub["input_ids"].shape[1], SMALL_PASS_ROWS):
            pooled = sparse_pooled(self.ort.encoder, self.plain, [chosen[i] for i in which], sub, starts)
        for j, i in enumerate(which):
            outs[i] = pooled[starts[j]:starts[j + 1]]
