"""The torch CPU hot tier (bf16 / int8): each hot task's masked weights materialised once
(:mod:`service.hot_tier`, :mod:`service.kernels.cpu_hot`), the encoder run as straight-line torch calls
(:mod:`service.encoder`) where the layout is plain BERT, else module by module."""

from __future__ import annotations

import logging

import torch

from backbone import Backbone
from service.dispatch import HotDispatcher
from service.encoder import LeanEncoder
from service.hot_weights import HotTier
from service.masked_linear import MaskedLinear
from service.metrics import Metrics
from service.tiers.base import SMALL_PASS_ROWS, HotCached, TorchTier, sparse_cache, split_policy

log = logging.getLogger(__name__)

class CpuHotTier(HotCached, TorchTier):
    """Args:
        backbone, layers: as :class:`service.tiers.base.TorchTier`.
        precision: "bf16" or "int8".
        hot_cache_bytes: byte budget of the hot tier.
        metrics: promotions and residency are recorded here.
        hot_policy: ``pinned`` / ``promote_after`` / ``window_s`` / ``background`` of the hot cache
            (:class:`service.hot_tier.HotCache`), and ``sparse_bytes``, the sparse forms' budget
            (:func:`service.tiers.base.split_policy`).
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
        policy, sparse_bytes = split_policy(hot_policy)
        self.hot = HotTier({n: (ml.w_q, ml.scale, ml.bias) for n, ml in layers.items()}, precision,
                           hot_cache_bytes, metrics, groups=encoder.groups if encoder else None, **policy)
        self.sparse = sparse_cache(self.hot.cat, self.hot.groups, layers, precision, sparse_bytes, metrics)
        super().__init__(backbone, layers, HotDispatcher(self.hot, self.promote), torch.device("cpu"), encoder=encoder,
                         single_thread_below=SMALL_PASS_ROWS)
        self.weights = {n: ml.w_q for n, ml in layers.items()}
        for ml in layers.values():
            ml.weight = None  # the float32 deq(W_q) is not needed in this precision: not kept
