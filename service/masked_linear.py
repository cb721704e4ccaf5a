"""The masked layer: a drop-in for each backbone ``nn.Linear`` that applies, per row segment, that segment's task mask.

At engine start-up every masked ``nn.Linear`` of the backbone is replaced by
a :class:`MaskedLinear` that *shares* the backbone's weight tensor (no copy).
For one forward pass the engine sets a :class:`SegmentTable` on every masked
layer: the token-row offsets of each task segment in the flattened
``[batch * T, hidden]`` activations and, per segment, what the tier needs
(the task's layer states on the CPU, its device slot on the device tier).
The layer holds no kernel arithmetic: it hands its rows to the dispatcher of
its tier (:mod:`service.dispatch`), which calls :mod:`service.kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from service.tasks import LayerState


@dataclass
class SegmentTable:
    """Row segments of one mixed-task forward pass, one segment per task, in batch order.

    A sequence padded to the batch's length ``T`` occupies ``T`` consecutive rows of the
    flattened ``[batch * T, in]`` activations, so segment ``s`` covers token rows
    ``row_starts[s] : row_starts[s + 1]``. CPU tier: ``states`` set (fp32) or ``hot`` (bf16, int8). Device tier: ``slots``,
    ``seg_starts``, ``seg_slots`` and ``paths`` set.
    """

    row_starts: list[int]  # [num_segments + 1] token-row offsets (host), row_starts[-1] = batch * T
    states: list[dict[str, "LayerState"]] | None = None  # [num_segments] the segment task's layer states (CPU fp32)
    hot: list[dict] | None = None  # [num_segments] module name -> HotWeight of the segment's task (CPU bf16/int8)
    slots: list[int] | None = None  # [num_segments] device-cache slot of each segment's task (host copy)
    seg_starts: torch.Tensor | None = None  # int32 [num_segments + 1] on the device, = row_starts
    seg_slots: torch.Tensor | None = None  # int32 [num_segments] on the device, = slots
    paths: dict[str, str] = field(default_factory=dict)  # module name -> kernel path for this pass


class Dispatcher(Protocol):
    """One per tier: computes a masked layer's product for the rows of a segmented batch."""

    def linear(self, layer: "MaskedLinear", x: torch.Tensor, seg: SegmentTable) -> torch.Tensor:
        """``x`` ``[rows, in]`` sorted by segment → ``[rows, out]``, each segment with its task's mask."""
        ...


class MaskedLinear(nn.Module):
    """Drop-in for a backbone ``nn.Linear`` that applies each segment's task mask.

    Holds references to the backbone's weight ``[out, in]`` (``deq(W_q)``: float32 on the CPU,
    float16 on CUDA), bias, int8 weight ``[out, in]`` and scales ``[out]`` (on the model's
    device). ``segments`` is set by the engine for one forward pass; ``dispatcher`` once at
    start-up. On the device tier ``device_words`` / ``device_pruned`` are the device cache's slot
    tensors for this matrix (set once; the cache refills them). Called outside an engine pass (no
    segment table), it is the backbone's plain unmasked ``nn.Linear``.
    """

    def __init__(self, linear: nn.Linear, w_q: torch.Tensor, scale: torch.Tensor, name: str = "",
                 dispatcher: Dispatcher | None = None):
        super().__init__()
        self.name = name
        self.weight = linear.weight  # shared, not copied
        self.bias = linear.bias
        self.w_q = w_q  # int8 [out, in]
        self.scale = scale  # float32 [out]
        self.dispatcher = dispatcher
        self.segments: SegmentTable | None = None
        self.device_words: torch.Tensor | None = None  # int32 [slots, out, ceil(in / 32)]
        self.device_pruned: list[torch.Tensor | None] | None = None  # [slots] CSR [out, in] or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seg = self.segments
        if seg is None or self.dispatcher is None:
            return nn.functional.linear(x, self.weight, self.bias)
        y = self.dispatcher.linear(self, x.reshape(-1, x.shape[-1]), seg)  # [batch * T, out]
        return y.reshape(*x.shape[:-1], y.shape[-1])
