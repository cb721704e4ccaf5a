"""The fp32 CPU tier: float32 over the shared de-quantized backbone plus each task's resident CPU form (a sparse
correction, or its bool mask), through the model's own modules. The exact reference the other tiers are checked
against."""

from __future__ import annotations

import torch

from backbone import Backbone
from service.dispatch import CpuDispatcher
from service.masked_linear import MaskedLinear
from service.tiers.base import TorchTier


class CpuReferenceTier(TorchTier):
    """Args: as :class:`service.tiers.base.TorchTier` (the dispatcher is :class:`CpuDispatcher`)."""

    precision = "fp32"
    warm_form = "cpu"

    def __init__(self, backbone: Backbone, layers: dict[str, MaskedLinear]):
        super().__init__(backbone, layers, CpuDispatcher(), torch.device("cpu"))
        self.weights = {n: ml.weight for n, ml in layers.items()}
