"""The torch hot tier's materialised weights (:class:`HotTier`), and the product-group helpers every hot or sparse
form is built with: which groups a task masks, a group's stacked mask, a group's concatenated plain weights.

Matrices are materialised by *product group*: one module, or several that multiply the same input and are
concatenated along the output dimension (the lean encoder's fused Q|K|V, :mod:`service.encoder`). Groups a task
leaves unmasked share one materialised form of the plain backbone weights (built once at start-up).
"""

from __future__ import annotations

import torch

from service.hot_tier import HotCache
from service.kernels.cpu_hot import HotWeight, materialize
from service.kernels.packing import unpack_bits
from service.metrics import Metrics
from service.tasks import LoadedTask


def masked_groups(entry: LoadedTask, groups: dict[str, list[str]]) -> list[str]:
    """The product groups (group → member modules) in which ``entry``'s task masks at least one member."""
    return [g for g, members in groups.items()
            if any(n in entry.layers and entry.layers[n].masked for n in members)]


def group_mask(entry: LoadedTask, members: list[str], shapes: list[tuple[int, int]]) -> torch.Tensor | None:
    """bool ``[sum of outs, in]``: the masks of ``members`` (shapes ``[out, in]``, one ``in``) stacked along ``out``,
    all-ones where ``entry``'s task leaves a member unmasked; None when it masks none of them."""
    packed = [entry.layers[n].bits() if n in entry.layers else None for n in members]
    if all(p is None for p in packed):
        return None
    if len(members) == 1:
        return unpack_bits(packed[0], shapes[0])
    mask = torch.ones((sum(s[0] for s in shapes), shapes[0][1]), dtype=torch.bool)
    row = 0
    for bits, shape in zip(packed, shapes):
        if bits is not None:
            mask[row:row + shape[0]] = unpack_bits(bits, shape)
        row += shape[0]
    return mask


def group_matrices(matrices: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                   groups: dict[str, list[str]]) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Each product group's ``(w_q int8 [out, in], scale [out], bias [out] or None)``: a module's own tensors, or its
    members' concatenated along ``out`` (a bias only where every member has one)."""
    out = {}
    for g, members in groups.items():
        parts = [matrices[n] for n in members]
        if len(parts) == 1:
            out[g] = parts[0]
            continue
        biases = [p[2] for p in parts]
        out[g] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                  None if any(b is None for b in biases) else torch.cat(biases))
    return out


class HotTier(HotCache):
    """The torch hot tier: a task's masked product groups materialised as :class:`HotWeight` (its hot form:
    group name → weight, every group; unmasked ones shared from :attr:`base`).

    Args:
        matrices: module name → ``(w_q int8 [out, in], scale float32 [out], bias [out] or None)``.
        precision: "bf16" or "int8" (see :mod:`service.kernels.cpu_hot`).
        capacity_bytes, metrics, policy (``pinned``, ``promote_after``, ``window_s``): as :class:`HotCache`.
        groups: product group → its member modules (same ``in``, concatenated along ``out`` in this
            order); None: every module its own group.
    """

    def __init__(self, matrices: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
                 precision: str, capacity_bytes: int, metrics: Metrics | None = None,
                 groups: dict[str, list[str]] | None = None, **policy):
        super().__init__(capacity_bytes, metrics, **policy)
        self.matrices = matrices
        self.groups = groups if groups is not None else {n: [n] for n in matrices}
        self.precision = precision
        #: each group's (w_q, scale, bias): a module's own tensors, or several modules' concatenated once here
        #: (a promotion then only unpacks masks)
        self.cat = group_matrices(matrices, self.groups)
        #: the plain backbone weights of every group, for the groups a task does not mask (and the sparse forms'
        #: shared plain product, :mod:`service.sparse_forms`)
        self.base = {g: self._materialize(g, None) for g in self.groups}

    def _materialize(self, group: str, entry: LoadedTask | None) -> HotWeight:
        """One group's hot form: the members' ``W_q``, scales, masks (all-ones where a member is
        unmasked) and biases concatenated along ``out``."""
        w_q, scale, bias = self.cat[group]
        members = self.groups[group]
        mask = None if entry is None else group_mask(entry, members, [tuple(self.matrices[n][0].shape) for n in members])
        return materialize(w_q, scale, mask, bias, self.precision)

    def _masked_groups(self, entry: LoadedTask) -> list[str]:
        return masked_groups(entry, self.groups)

    def _promote(self, task: str, entry: LoadedTask) -> tuple[dict[str, HotWeight], int]:
        layers = dict(self.base)
        nbytes = 0
        for g in self._masked_groups(entry):
            layers[g] = self._materialize(g, entry)
            nbytes += layers[g].nbytes()
        return layers, nbytes

    def task_bytes(self, entry: LoadedTask) -> int:
        """Bytes ``entry`` would take when hot (without materialising it)."""
        return sum(self.base[g].nbytes() for g in self._masked_groups(entry))

