"""Lean encoder: the BERT encoder stack as one function over the backbone's tensors, for the CPU hot tier.

At batch 1 an eager Hugging Face forward spends most of its time in Python
module calls, not arithmetic (one 12-token MiniLM sentence: ~9 ms of
eager overhead-dominated work against ~1 ms of GEMMs in int8). The hot tier
(bf16 / int8) therefore runs the encoder as straight-line torch calls over
the backbone's own tensors: embeddings + LayerNorm, then per layer one fused
Q|K|V product (the three matrices of a task concatenated at materialisation,
one GEMM instead of three), ``F.scaled_dot_product_attention``, the output
product + residual + LayerNorm, the intermediate product + activation, the
output product + residual + LayerNorm (Devlin et al. 2019; residuals and LayerNorms in
float32, attention in the products' precision where that is bf16 (the activation too was tried: CoLA's served
MCC then moved 0.7 points, two of 1,043 dev sentences; it stays float32); the same
computation as ``transformers``' ``BertModel`` in eval mode, dropout off).
Every masked product goes through the ``linear(group, x)`` callable the
caller passes (the hot tier's per-segment products).

Only the plain BERT layout is recognised (:meth:`LeanEncoder.unsupported`
says why another is not: other module names, relative positions, a
decoder); other BERT-family encoders are served by the module-by-module
path, which handles any encoder whose ``nn.Linear`` modules are masked.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # erf form, as transformers' "gelu"
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}
"""``config.hidden_act`` → the function, as transformers names them (its own table is not imported: its module
pulls in torch._dynamo and inductor, ~190 MiB of resident memory)."""

Linear = Callable[..., torch.Tensor]
"""``linear(group, x, low=False)``: ``x`` ``[rows, in]`` (float32, or the product's own low precision) →
``[rows, out]`` for the named product group: float32, or with ``low=True`` the precision the product computes
in where that is lower (bf16), for a consumer that computes in it too (attention, the activation)."""


class LeanEncoder:
    """The encoder of a ``BertModel``-layout model as one function.

    Args:
        model: the backbone's encoder model (eval mode; its masked ``nn.Linear`` modules may already
            be replaced: only their names are used here, never their weights).

    Raises:
        ValueError: the model's layout is not recognised (the reason from :meth:`unsupported`).
    """

    def __init__(self, model: nn.Module):
        reason = self.unsupported(model)
        if reason is not None:
            raise ValueError(f"lean encoder: {reason}")
        cfg = model.config
        emb = model.embeddings
        self.word = emb.word_embeddings.weight
        self.position = emb.position_embeddings.weight
        self.token_type = emb.token_type_embeddings.weight
        self.emb_norm = (emb.LayerNorm.weight, emb.LayerNorm.bias, emb.LayerNorm.eps)
        self.hidden = int(cfg.hidden_size)
        self.heads = int(cfg.num_attention_heads)
        self.act = ACTIVATIONS[cfg.hidden_act]
        #: product group → the masked modules it concatenates along the output dimension (in order)
        self.groups: dict[str, list[str]] = {}
        self.layers = []
        for i, layer in enumerate(model.encoder.layer):
            p = f"encoder.layer.{i}"
            qkv = f"{p}.attention.self.qkv"
            self.groups[qkv] = [f"{p}.attention.self.{n}" for n in ("query", "key", "value")]
            for name in (f"{p}.attention.output.dense", f"{p}.intermediate.dense", f"{p}.output.dense"):
                self.groups[name] = [name]
            ln1, ln2 = layer.attention.output.LayerNorm, layer.output.LayerNorm
            self.layers.append((qkv, f"{p}.attention.output.dense", f"{p}.intermediate.dense", f"{p}.output.dense",
                                (ln1.weight, ln1.bias, ln1.eps), (ln2.weight, ln2.bias, ln2.eps)))

    @staticmethod
    def unsupported(model: nn.Module) -> str | None:
        """Why ``model`` cannot run through this encoder, or None when it can."""
        cfg = getattr(model, "config", None)
        if cfg is None or getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
            return "not an encoder-only model"
        if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
            return f"position_embedding_type {cfg.position_embedding_type!r} (only 'absolute')"
        if getattr(cfg, "model_type", "") != "bert":
            return f"model_type {getattr(cfg, 'model_type', None)!r} (only 'bert')"
        emb = getattr(model, "embeddings", None)
        layers = getattr(getattr(model, "encoder", None), "layer", None)
        if emb is None or layers is None or not hasattr(emb, "token_type_embeddings"):
            return "no BertEmbeddings / encoder.layer"
        if cfg.hidden_size % cfg.num_attention_heads:
            return "hidden size not divisible by the head count"
        if not isinstance(cfg.hidden_act, str) or cfg.hidden_act not in ACTIVATIONS:
            return f"hidden_act {cfg.hidden_act!r} (known: {', '.join(ACTIVATIONS)})"
        return None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None,
                 linear: Linear) -> torch.Tensor:
        """Last hidden states.

        Args:
            input_ids, attention_mask: int64 ``[batch, T]`` (mask 1 for tokens, 0 for padding).
            token_type_ids: int64 ``[batch, T]`` or None (all zeros).
            linear: the masked products (see :data:`Linear`).
        Returns:
            float32 ``[batch, T, hidden]``.
        """
        batch, seq = input_ids.shape
        h, heads = self.hidden, self.heads
        x = F.embedding(input_ids, self.word) + self.position[:seq]
        x = x + (self.token_type[0] if token_type_ids is None else F.embedding(token_type_ids, self.token_type))
        x = F.layer_norm(x, (h,), *self.emb_norm[:2], self.emb_norm[2]).reshape(batch * seq, h)
        keep = attention_mask.to(torch.bool)[:, None, None, :]  # [batch, 1, 1, T]: True attends
        full = bool(keep.all())
        for qkv, out, inter, down, ln1, ln2 in self.layers:
            q, k, v = linear(qkv, x, low=True).view(batch, seq, 3, heads, h // heads).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=None if full else keep)  # [batch, heads, T, d]
            ctx = ctx.transpose(1, 2).reshape(batch * seq, h)
            a = F.layer_norm(linear(out, ctx) + x, (h,), ln1[0], ln1[1], ln1[2])
            x = F.layer_norm(linear(down, self.act(linear(inter, a))) + a, (h,), ln2[0], ln2[1], ln2[2])
        return x.reshape(batch, seq, h)
