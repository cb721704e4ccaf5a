"""Load a BERT checkpoint's tensors into a plain module tree, without transformers' modeling code.

Why: importing ``transformers``' BERT modeling code pulls in ``torch._dynamo``, inductor, triton, scipy
and sympy — 188 MiB of resident memory in a serving process on this machine (torch alone: 218 MiB; the
config, tokenizer and safetensors weights: +47 MiB). A server whose CPU precision runs the lean encoder
(:mod:`service.encoder`, bf16 / int8) never calls a ``BertModel`` forward, so it only needs the tensors,
under the same names, and the config.

The tree mirrors ``transformers.BertModel``'s module names (``embeddings.word_embeddings``,
``encoder.layer.N.attention.self.query``, ...) with plain ``nn.Embedding`` / ``nn.LayerNorm`` /
``nn.Linear`` modules, so :func:`backbone.quantize_backbone` and :func:`backbone.compute_fingerprint`
see exactly the state (names, dtypes, values) a ``BertModel`` would hold: the fingerprint is the same
(tested), and bundles trained on the full model are served unchanged. It has no ``forward``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def unsupported(config, folder: Path) -> str | None:
    """Why ``folder`` cannot be loaded weights-only, or None when it can."""
    if getattr(config, "model_type", None) != "bert":
        return f"model_type {getattr(config, 'model_type', None)!r} (only 'bert')"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position_embedding_type {config.position_embedding_type!r}"
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "a decoder"
    if not (folder / "model.safetensors").is_file():
        return "no model.safetensors"
    return None


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _linear(state: dict[str, torch.Tensor], name: str) -> nn.Linear:
    """An ``nn.Linear`` holding ``state[name.weight]`` / ``state[name.bias]`` (no initialisation run: module
    constructors' random init would import torch's compiler stack, the memory this module avoids)."""
    m = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(m)
    w = state[f"{name}.weight"]
    m.out_features, m.in_features = w.shape
    m.weight, m.bias = _param(w), _param(state[f"{name}.bias"])
    return m


def _layer_norm(state: dict[str, torch.Tensor], name: str, eps: float) -> nn.LayerNorm:
    m = nn.LayerNorm.__new__(nn.LayerNorm)
    nn.Module.__init__(m)
    w = state[f"{name}.weight"]
    m.normalized_shape, m.eps, m.elementwise_affine = tuple(w.shape), eps, True
    m.weight, m.bias = _param(w), _param(state[f"{name}.bias"])
    return m


def _embedding(state: dict[str, torch.Tensor], name: str, padding_idx: int | None = None) -> nn.Embedding:
    return nn.Embedding.from_pretrained(state[f"{name}.weight"], freeze=True, padding_idx=padding_idx)


def expected_keys(cfg) -> list[str]:
    """The tensors a ``BertModel`` without pooler holds (its persistent state), in module order."""
    keys = [f"embeddings.{n}.weight" for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    keys += ["embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}"
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                  "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"):
            keys += [f"{p}.{n}.weight", f"{p}.{n}.bias"]
    return keys


def _tree(cfg, state: dict[str, torch.Tensor]) -> nn.Module:
    """The module tree of a ``BertModel`` without pooler, holding ``state``'s tensors."""
    eps = cfg.layer_norm_eps
    root = nn.Module()
    emb = root.embeddings = nn.Module()
    emb.word_embeddings = _embedding(state, "embeddings.word_embeddings", cfg.pad_token_id)
    emb.position_embeddings = _embedding(state, "embeddings.position_embeddings")
    emb.token_type_embeddings = _embedding(state, "embeddings.token_type_embeddings")
    emb.LayerNorm = _layer_norm(state, "embeddings.LayerNorm", eps)
    root.encoder = nn.Module()
    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}"
        layer = nn.Module()
        layer.attention = nn.Module()
        layer.attention.self = nn.Module()
        for n in ("query", "key", "value"):
            setattr(layer.attention.self, n, _linear(state, f"{p}.attention.self.{n}"))
        layer.attention.output = nn.Module()
        layer.attention.output.dense = _linear(state, f"{p}.attention.output.dense")
        layer.attention.output.LayerNorm = _layer_norm(state, f"{p}.attention.output.LayerNorm", eps)
        layer.intermediate = nn.Module()
        layer.intermediate.dense = _linear(state, f"{p}.intermediate.dense")
        layer.output = nn.Module()
        layer.output.dense = _linear(state, f"{p}.output.dense")
        layer.output.LayerNorm = _layer_norm(state, f"{p}.output.LayerNorm", eps)
        layers.append(layer)
    root.encoder.layer = nn.ModuleList(layers)
    return root


def load_weights_only(folder: Path) -> tuple[nn.Module | None, object, str | None]:
    """``(model, config, None)``, or ``(None, config, reason)`` when ``folder`` needs the full model.

    ``model`` holds the checkpoint's tensors (``requires_grad`` off) under ``BertModel``'s names and
    has ``model.config`` (``transformers.AutoConfig``); the pooler is left out (mean pooling is used).

    Raises:
        OSError, ValueError: the config cannot be read (as ``AutoConfig.from_pretrained`` raises them).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    reason = unsupported(config, folder)
    if reason is not None:
        return None, config, reason
    state = load_file(str(folder / "model.safetensors"))
    prefix = "bert."
    if any(k.startswith(prefix) for k in state) and not any(k.startswith("embeddings.") for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    want = expected_keys(config)
    missing = [k for k in want if k not in state]
    if missing:
        return None, config, f"the checkpoint lacks {missing[:2]}"
    if any(state[k].dtype != torch.float32 for k in want):
        return None, config, "a checkpoint not in float32"
    model = _tree(config, state)
    model.config = config
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, config, None
