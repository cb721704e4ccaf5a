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

import torch
from torch import nn

from backbone import replace_module

from service.dispatch import Dispatcher, SegmentTable


class MaskedLinear(nn.Module):
    """Drop-in for a backbone ``nn.Linear`` that applies each segment's task mask.

    Holds references to the backbone's weight ``[out, in]`` (``deq(W_q)``: float32 on the CPU,
    float16 on CUDA; None in the CPU bf16 / int8 precisions, whose hot tier keeps its own forms), bias,
    int8 weight ``[out, in]`` and scales ``[out]`` (on the model's device). ``segments`` is set by the
    engine for one forward pass; ``dispatcher`` once at start-up. On the device tier ``device_words`` /
    ``device_pruned`` are the device cache's slot tensors for this matrix (set once; the cache refills
    them). Called outside an engine pass (no segment table), it is the backbone's plain unmasked
    ``nn.Linear`` (where the weight is kept).
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


def wrap_backbone(backbone) -> dict[str, MaskedLinear]:
    """Replace each masked ``nn.Linear`` of ``backbone`` (a :class:`backbone.Backbone`) by a :class:`MaskedLinear`
    sharing its tensors; return them by module name.

    Raises:
        ValueError: another engine wrapped them already.
    """
    layers: dict[str, MaskedLinear] = {}
    for name in backbone.masked:
        lin = backbone.model.get_submodule(name)
        if isinstance(lin, MaskedLinear):
            raise ValueError("backbone modules are already wrapped by another engine")
        layers[name] = MaskedLinear(lin, backbone.qweight[name], backbone.scale[name], name=name)
        replace_module(backbone.model, name, layers[name])
    return layers
