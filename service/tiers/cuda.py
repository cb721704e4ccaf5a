"""The device tier: a host tier of packed masks, GPU mask slots and the segmented CUDA kernels
(:class:`service.dispatch.DeviceDispatcher`), through the model's own modules. On the CPU only as a test hook
(``Engine(emulate_device_path=...)``)."""

from __future__ import annotations

import contextlib

import torch

from backbone import Backbone
from service.dispatch import DeviceDispatcher
from service.masked_linear import MaskedLinear
from service.metrics import Metrics
from service.tiers.base import TorchTier


class DeviceTier(TorchTier):
    """Args:
        backbone, layers: as :class:`service.tiers.base.TorchTier`.
        device: the device of the tier.
        override: the kernel path override ("auto": the selector's rule).
        device_slots: GPU mask slots.
        metrics: swap-ins and residency are recorded here.
    """

    precision = "device"
    warm_form = "device"

    def __init__(self, backbone: Backbone, layers: dict[str, MaskedLinear], device: torch.device, override: str,
                 device_slots: int, metrics: Metrics):
        dispatcher = DeviceDispatcher(backbone, layers, device, override, device_slots, metrics)
        super().__init__(backbone, layers, dispatcher, device)
        self.weights = {n: ml.weight for n, ml in layers.items()}

    @property
    def cache(self):
        """The :class:`service.device_cache.DeviceTaskCache` of the GPU slots."""
        return self.dispatcher.cache

    def forget(self, task: str, pass_lock: contextlib.AbstractContextManager) -> None:
        with pass_lock:  # a pass may be using the slot
            self.dispatcher.invalidate(task)
