"""Serving tiers: where a task's weights live and how one mixed-task pass runs. One module per tier:

=======================  ==========================================================================================
tier (``Engine.precision``)  module
=======================  ==========================================================================================
``fp32``                 :mod:`service.tiers.cpu_reference`: float32 over the shared de-quantized backbone plus each
                         task's sparse correction (the exact reference)
``bf16``, ``int8``       :mod:`service.tiers.cpu_hot`: torch/oneDNN, each hot task's masked weights materialised once
``int8`` on onnxruntime  :mod:`service.tiers.onnxruntime`: one ONNX Runtime session per hot task
``device``               :mod:`service.tiers.cuda`: GPU mask slots and the segmented CUDA kernels (also emulated on
                         the CPU by tests)
=======================  ==========================================================================================

Each implements :class:`service.tiers.base.Tier`; :func:`service.tiers.select.select_tier` picks one once, from
the engine's settings. Adding a tier is one module here and one line in the selector.
"""

from service.tiers.base import Tier

__all__ = ["Tier"]
