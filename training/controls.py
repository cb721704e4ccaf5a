"""Controls for the supermask study: backbones that are *not* the pre-trained one.

* :func:`shuffle_masked_weights` — Radiya-Dixit & Wang 2020, Section 4.4: "supermask
  fine-tuning on pre-trained parameters with components shuffled (thusly
  norm-preserved)". Each masked matrix's entries are randomly permuted; a good
  mask over the shuffled weights should not exist if good masks are a property
  of pre-training.
* :func:`restore_float_weights` — the fp32 ("no quantization") row of Wang 2020,
  Table 1: put the checkpoint's un-quantized weights back into the masked modules
  of a loaded backbone, so that ``SupermaskModel(..., quantized=False)`` masks them.

Both modify the backbone in place; build a fresh backbone per run.
"""

from __future__ import annotations

import logging

import torch

from backbone import Backbone, compute_fingerprint, dequantize, quantize_per_channel

log = logging.getLogger(__name__)


def shuffle_masked_weights(backbone: Backbone, seed: int, float_weights: bool = False) -> Backbone:
    """Randomly permute the entries of every masked weight matrix, in place.

    For each masked ``nn.Linear`` the current float weight ``W`` (``[out, in]``,
    the de-quantized int8 values, or the fp32 checkpoint values after
    :func:`restore_float_weights`) is flattened, permuted with one random
    permutation over all ``out·in`` entries and reshaped, so the multiset of
    values (and the Frobenius norm) is unchanged. The permuted matrix is then
    re-quantized per output channel at ``backbone.bits`` and ``backbone.qweight``,
    ``backbone.scale`` and ``backbone.fingerprint`` are updated, so a bundle
    trained on the shuffled backbone can never be served on the real one.

    Args:
        backbone: a loaded backbone (``backbone.load_backbone``).
        seed: seed of the permutations (one independent permutation per matrix).
        float_weights: keep the permuted float values in the modules (fp32 study);
            by default the modules hold ``deq(W_q)`` of the re-quantized matrix,
            as after loading.
    Returns:
        ``backbone`` itself.
    """
    gen = torch.Generator().manual_seed(seed)
    for name in backbone.masked:
        lin = backbone.model.get_submodule(name)
        w = lin.weight.detach().to(torch.float32)
        perm = torch.randperm(w.numel(), generator=gen)
        shuffled = w.reshape(-1)[perm].reshape(w.shape).contiguous()
        q, s = quantize_per_channel(shuffled, backbone.bits)
        backbone.qweight[name], backbone.scale[name] = q, s
        lin.weight.data = shuffled if float_weights else dequantize(q, s)
    backbone.fingerprint = compute_fingerprint(backbone.model, backbone.bits, backbone.qweight, backbone.scale)
    log.info("shuffled %d masked matrices (seed %d); fingerprint now %s", len(backbone.masked), seed,
             backbone.fingerprint[:16])
    return backbone


def restore_float_weights(backbone: Backbone) -> Backbone:
    """Put the checkpoint's un-quantized float32 weights back into the masked modules, in place.

    ``load_backbone`` replaces each masked weight by ``deq(W_q)``; this reloads the
    folder at ``backbone.path`` and copies the original weights back. ``qweight``,
    ``scale`` and ``fingerprint`` are left as they are (those of the quantized
    backbone), so the fingerprint stays well defined.

    Raises:
        BackboneLoadError: the folder cannot be loaded again.
    """
    from transformers import AutoModel

    from backbone import BackboneLoadError

    try:
        original = AutoModel.from_pretrained(backbone.path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BackboneLoadError(f"cannot reload {backbone.path} for its float weights: {exc}") from None
    for name in backbone.masked:
        src = original.get_submodule(name).weight.detach().to(torch.float32)
        dst = backbone.model.get_submodule(name)
        if tuple(src.shape) != tuple(dst.weight.shape):
            raise BackboneLoadError(f"{name}: reloaded shape {tuple(src.shape)} != {tuple(dst.weight.shape)}")
        dst.weight.data = src.clone()
    return backbone
