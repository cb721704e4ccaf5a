"""The torch CPU hot tier (bf16 / int8): each hot task's masked weights materialised once
(:mod:`service.hot_tier`, :mod:`service.kernels.cpu_hot`), the encoder run as straight-line torch calls
(:mod:`service.encoder`) where the layout is plain BERT, else module by module."""

from __future__ import annotations

import logging

import torch

from backbone import Backbone
from service.dispatch import HotDispatcher
from service.encoder import LeanEncoder
from service.hot_tier import HotTier
from service.masked_linear import MaskedLinear
from service.metrics import Metrics
from service.tiers.base import HotCached, TorchTier

log = logging.getLogger(__name__)

SMALL_PASS_ROWS = 448
"""Hot-tier CPU passes of fewer token rows (batch x padded length) run on one intra-op thread.

Measured on a 2-core AMD EPYC, torch 2.13 (GNU OpenMP): in a thread other than the main one — where the
server runs its passes — each parallel region costs ~50 us more than on the main thread (LayerNorm over 12
rows: 57 vs 7 us). A bf16 MiniLM pass of 44 / 176 / 352 token rows took 4.6 / 12.0 / 24.8 ms on one thread
against 7.3 / 14.6 / 33.3 on two; of 528 / 704 / 1,408 rows 57 / 69 / 131 ms against 35 / 48 / 100."""


class CpuHotTier(HotCached, TorchTier):
    """Args:
        backbone, layers: as :class:`service.tiers.base.TorchTier`.
        precision: "bf16" or "int8".
        hot_cache_bytes: byte budget of the hot tier.
        metrics: promotions and residency are recorded here.
        hot_policy: ``pinned`` / ``promote_after`` / ``window_s`` of the hot cache (:class:`service.hot_tier.HotCache`).
    """

    warm_form = "packed"
    dedicated_thread = True  # its passes, mostly small and on one intra-op thread: b32 66 vs 85 ms on a pool thread

    def __init__(self, backbone: Backbone, layers: dict[str, MaskedLinear], precision: str, hot_cache_bytes: int,
                 metrics: Metrics, hot_policy: dict | None = None):
        reason = LeanEncoder.unsupported(backbone.model)  # None: the lean encoder can run this layout
        encoder = LeanEncoder(backbone.model) if reason is None else None
        if reason is not None:
            log.info("lean encoder not used (%s): the hot tier runs the model module by module", reason)
        self.precision = precision
        self.hot = HotTier({n: (ml.w_q, ml.scale, ml.bias) for n, ml in layers.items()}, precision,
                           hot_cache_bytes, metrics, groups=encoder.groups if encoder else None, **(hot_policy or {}))
        super().__init__(backbone, layers, HotDispatcher(self.hot), torch.device("cpu"), encoder=encoder,
                         single_thread_below=SMALL_PASS_ROWS)
        self.weights = {n: ml.w_q for n, ml in layers.items()}
        for ml in layers.values():
            ml.weight = None  # the float32 deq(W_q) is not needed in this precision: not kept
