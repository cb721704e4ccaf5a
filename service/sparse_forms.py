"""Sparse forms: a task that is not hot is served without materialising its weights.

Semantics (same as reference, :func:`service.kernels.reference.masked_linear_reference`)::

    x · (W ⊙ μ)ᵀ + b = (x · Wᵀ + b) − x̂ · (W ⊙ ¬μ)ᵀ

where ``x · Wᵀ + b`` is the backbone's *plain* product in the hot tier's precision and layout — one form per
product group, shared by every task (:attr:`service.hot_weights.HotTier.base`) — and the correction is a CSR of the
task's pruned entries of that same stored weight (int8: ``W_q[o, i] · scale[o]``; bf16: ``deq(W_q)`` rounded to
bfloat16), multiplied by ``x̂``, the activation the plain product saw (int8: its uint8 codes decoded, ``lo + step ·
q``; bf16: ``x`` rounded to bfloat16; :func:`service.kernels.cpu_hot.plain_product`). Both terms sum over the same
products, so the result is the torch tier's hot product up to float rounding (tests/unit/test_sparse_forms.py;
the ONNX Runtime tier's sessions compute the same int8 products with their own float rounding).

Why: a hot form costs a promotion (int8 on ONNX Runtime: ~100 ms to build a session, 25 MiB held) that pays off
only for a task asked for often; a sparse form costs decoding the pruned positions straight from the bundle's
entropy-coded gaps (format v3) and one gather, a few ms, and holds ``8 · pruned + 4 · (out + 1)`` bytes per matrix
(MiniLM at 3 % pruned: ~2.4 MB). Every sparse row shares one plain GEMM per product whatever its task; the
correction costs about ``rows · pruned`` multiply-adds (torch's CSR product, MKL on x86).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from backbone import mean_pool
from service.hot_tier import HotCache
from service.hot_weights import masked_groups
from service.kernels import cpu_hot
from service.kernels.sparse_complement import csr_nbytes
from service.metrics import Metrics
from service.tasks import LoadedTask


@dataclass
class SparseForm:
    """One task's sparse form: product group → CSR ``[out, in]`` float32 of its pruned entries (groups it leaves
    unmasked are absent)."""

    pruned: dict[str, torch.Tensor]
    nbytes: int


def pruned_values(w_q: torch.Tensor, scale: torch.Tensor, positions: np.ndarray, counts: np.ndarray,
                  precision: str) -> torch.Tensor:
    """float32 ``[k]``: the stored plain weight at the row-major ``positions`` (int64 ``[k]``, ascending; ``counts``
    int64 ``[out]`` of them per row) of ``w_q`` int8 ``[out, in]`` with ``scale`` float32 ``[out]`` — what the plain
    product of ``precision`` multiplies by there (int8: ``W_q · scale``; bf16: that rounded to bfloat16, as
    :func:`service.kernels.cpu_hot.materialize` rounds it). ``w_q`` may be any strided view (indexed in place, never
    copied whole)."""
    # numpy, one thread: a torch gather of a few thousand entries opens a parallel region, which stalls for
    # milliseconds whenever the CPU is busy with anything else
    w = w_q.numpy()
    if w.flags.c_contiguous:
        raw = w.reshape(-1)[positions]  # one flat gather (the positions are row-major already)
    else:
        rows, cols = np.divmod(positions, w.shape[1])
        raw = w[rows, cols]
    vals = torch.from_numpy(raw.astype(np.float32) * np.repeat(scale.numpy(), counts))
    return vals.to(torch.bfloat16).to(torch.float32) if precision == "bf16" else vals


def group_positions(entry: LoadedTask, members: list[str], shapes: list[tuple[int, int]]) -> np.ndarray:
    """int64 ascending positions of the pruned weights of ``members`` stacked along ``out`` (row-major in the
    group's ``[sum of outs, in]``)."""
    parts, row = [], 0
    for name, (out, in_) in zip(members, shapes):
        st = entry.layers.get(name)
        if st is not None and st.masked:
            parts.append(st.pruned_positions() + row * in_)
        row += out
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def csr_from_positions(w_q: torch.Tensor, scale: torch.Tensor, positions: np.ndarray, precision: str
                       ) -> torch.Tensor | None:
    """CSR ``[out, in]`` float32 of the plain weight's values (:func:`pruned_values`) at the row-major ``positions``
    (int64, ascending), int32 indices; None when there are none."""
    out, in_ = w_q.shape
    if positions.size == 0:
        return None
    # the positions are ascending: each row's first one by binary search, no division per position
    crow = np.searchsorted(positions, np.arange(out + 1, dtype=np.int64) * in_)  # int64 [out + 1]
    counts = np.diff(crow)
    cols = positions - np.repeat(np.arange(out, dtype=np.int64) * in_, counts)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(torch.from_numpy(crow.astype(np.int32)), torch.from_numpy(cols.astype(np.int32)),
                                       pruned_values(w_q, scale, positions, counts, precision),
                                       size=(out, in_), check_invariants=False)


class SparseCache(HotCache):
    """Task → :class:`SparseForm`, LRU bounded in bytes (``SUPERMASK_SPARSE_CACHE_BYTES``), built once per task.

    Args:
        matrices: product group → ``(w_q int8 [out, in], scale float32 [out])`` of the plain weight the hot tier's
            shared plain product multiplies by (members concatenated along ``out``).
        groups: product group → its member modules, in that order.
        shapes: module name → ``(out, in)``.
        precision: the hot tier's precision ("int8" or "bf16"), which fixes the correction's values.
        capacity_bytes, metrics: as :class:`service.hot_tier.HotCache`.
    """

    kind = "sparse"

    def __init__(self, matrices: dict[str, tuple[torch.Tensor, torch.Tensor]], groups: dict[str, list[str]],
                 shapes: dict[str, tuple[int, int]], precision: str, capacity_bytes: int,
                 metrics: Metrics | None = None):
        super().__init__(capacity_bytes, metrics)
        self.groups = groups
        self.shapes = {g: [tuple(shapes[n]) for n in members] for g, members in groups.items()}
        self.matrices = matrices  # shared with the tier, not copied
        self.precision = precision

    def _promote(self, task: str, entry: LoadedTask) -> tuple[SparseForm, int]:
        pruned = {}
        for g in masked_groups(entry, self.groups):
            w_q, scale = self.matrices[g]
            csr = csr_from_positions(w_q, scale, group_positions(entry, self.groups[g], self.shapes[g]), self.precision)
            if csr is not None:
                pruned[g] = csr
        nbytes = sum(csr_nbytes(c) for c in pruned.values())
        return SparseForm(pruned, nbytes), nbytes

    def task_bytes(self, entry: LoadedTask) -> int:
        """Bytes of ``entry``'s sparse form, from its pruned counts (without building it)."""
        total = 0
        for g in masked_groups(entry, self.groups):
            zeros = sum(round(st.sparsity * st.shape[0] * st.shape[1])
                        for n in self.groups[g] if (st := entry.layers.get(n)) is not None and st.masked)
            total += 8 * zeros + 4 * (sum(o for o, _ in self.shapes[g]) + 1)
        return total

    def form(self, task: str, entry: LoadedTask) -> SparseForm:
        """``task``'s sparse form, built on a miss (a :meth:`service.hot_tier.HotCache.get` fallback)."""
        return self.get(task, entry)

    def _observe(self, task: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.sparse_form_seconds.observe(seconds)

    def _admitted(self, decision: str) -> None:
        return None  # the hot tier counts the decision that sent a request here


def sparse_product(x: torch.Tensor, base: cpu_hot.HotWeight, group: str, row_starts: list[int],
                   forms: list[SparseForm | None], low: bool = False) -> torch.Tensor:
    """The masked product of group ``group`` for rows of several tasks, each through its sparse form.

    Args:
        x: ``[rows, in]`` float32 (or bf16), rows sorted by segment.
        base: the group's plain hot weight (:attr:`service.hot_weights.HotTier.base`).
        row_starts: ``[len(forms) + 1]`` row offsets of the segments.
        forms: each segment's sparse form (None: the plain product, nothing pruned).
        low: as :func:`service.kernels.cpu_hot.hot_linear` (bf16 only: the result in bfloat16).

    Returns:
        float32 ``[rows, out]`` (bfloat16 with ``low`` in bf16): one plain product for every row, then each
        segment's correction ``x̂ · (W ⊙ ¬μ)ᵀ`` subtracted.
    """
    y, seen = cpu_hot.plain_product(x, base)
    seen_t = None
    for i, form in enumerate(forms):
        csr = None if form is None else form.pruned.get(group)
        a, b = row_starts[i], row_starts[i + 1]
        if csr is not None and b > a:
            if seen_t is None:
                seen_t = seen.t().contiguous()  # [in, rows]: MKL's CSR x dense product wants a row-major dense side
            y[a:b].sub_(torch.sparse.mm(csr, seen_t[:, a:b]).t())
    return y.to(torch.bfloat16) if low and base.precision == "bf16" else y


def sparse_pooled(encoder, plain: dict[str, cpu_hot.HotWeight], forms: list[SparseForm | None],
                  inputs: dict[str, torch.Tensor], seq_starts: list[int]) -> torch.Tensor:
    """One lean-encoder pass (:class:`service.encoder.LeanEncoder`) over the rows of several tasks, each through its
    sparse form: mean-pooled last hidden states float32 ``[batch, hidden]``.

    Args:
        encoder: the lean encoder.
        plain: product group → its plain hot weight.
        forms: each segment's sparse form.
        inputs: int64 ``[batch, T]`` ``input_ids``, ``attention_mask`` (and ``token_type_ids``), rows sorted by segment.
        seq_starts: ``[len(forms) + 1]`` row offsets of the segments.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    seq_len = ids.shape[1]
    rows = [s * seq_len for s in seq_starts]
    hidden = encoder(ids, mask, inputs.get("token_type_ids"),
                     lambda group, x, low=False: sparse_product(x, plain[group], group, rows, forms, low))
    return mean_pool(hidden.float(), mask)
