"""Supermask layers and the trainable task model (Radiya-Dixit & Wang 2020, Section 3.3).

A masked layer computes ``y = x · (deq(W_q) ⊙ μ)ᵀ + b`` with
``μ = Bern(σ(ν))`` (Eq. 3-4). The Bernoulli sample is not differentiable;
the gradient is passed straight through: ``∂L/∂ν := ∂L/∂μ`` (``ste="identity"``; our option
``ste="sigmoid"`` multiplies it by ``σ'(ν) = σ(ν)(1 − σ(ν))``, :data:`training.STE_KINDS`). In evaluation
mode the mask is deterministic, ``μ = 1[σ(ν) > 0.5] = 1[ν > 0]``: our serving rule, not the
paper's (it reports the mean over 10 Bernoulli samples and states no deterministic rule).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from backbone import Backbone, dequantize, mean_pool, replace_module
from training import STE_KINDS, check_choice

SCORE_INIT = 5.0  # |ν| at initialization (paper: ν = ±5)


class SupermaskLinear(nn.Module):
    """Linear layer with frozen de-quantized weights and trainable mask scores.

    Args:
        weight: float32 ``[out, in]``, the de-quantized backbone weight (not trained).
        bias: float32 ``[out]`` or None (not trained).
        init_sparsity: fraction ``s0`` of the smallest-|W| entries of this
            matrix that start pruned (``ν = -5``); the rest start at ``ν = +5``.
        ste: the straight-through gradient to ``ν``: ``"identity"`` (``∂L/∂μ``, the paper's) or ``"sigmoid"``
            (``∂L/∂μ · σ(ν)(1 − σ(ν))``).
        score_init: ``|ν|`` at initialization (default the paper's 5; smaller for short runs, see
            ``training.trainer.plan_schedule``).

    Attributes:
        scores: ``ν``, float32 ``[out, in]``, the trainable mask parameter.
        sample: True: ``μ ~ Bern(σ(ν))``; False: ``μ = 1[ν > τ]``; None (default): sample in training
            mode, deterministic in eval mode.
        threshold: ``τ`` of the deterministic mask, float; 0.0 (default) is ``1[σ(ν) > 0.5]``
            (our served rule; the paper reports the mean over 10 Bernoulli samples and states no deterministic rule).
        drawn: None (default: every sampling forward draws a fresh ``μ``), or one drawn mask, float32
            ``[out, in]``, that sampling forwards use until cleared (:meth:`SupermaskModel.draw_masks`).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, init_sparsity: float = 0.0,
                 ste: str = "identity", score_init: float = SCORE_INIT):
        super().__init__()
        if not 0.0 <= init_sparsity < 1.0:
            raise ValueError(f"init_sparsity must be in [0, 1), got {init_sparsity}")
        check_choice("ste", ste, STE_KINDS)
        if not score_init > 0:
            raise ValueError(f"score_init must be > 0, got {score_init}")
        self.ste = ste
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        scores = torch.full_like(self.weight, float(score_init))
        k = int(round(init_sparsity * weight.numel()))
        if k > 0:
            idx = torch.argsort(weight.abs().reshape(-1))[:k]
            scores.view(-1)[idx] = -float(score_init)
        self.scores = nn.Parameter(scores)
        self.sample: bool | None = None  # None: follow self.training
        self.threshold = 0.0  # τ of the deterministic mask 1[ν > τ]
        self.drawn: torch.Tensor | None = None  # one fixed Bernoulli draw for sampling forwards
        self.served: torch.Tensor | None = None  # a fixed deterministic mask (the "sampled" rule), else 1[ν > τ]

    def mask(self, sample: bool) -> torch.Tensor:
        """``μ`` as float32 ``[out, in]`` carrying the straight-through gradient to ``ν``."""
        if sample and self.drawn is not None:
            mu = self.drawn
        elif sample:
            mu = torch.bernoulli(torch.sigmoid(self.scores.detach()))
        else:
            mu = self.hard_mask().to(self.scores.dtype)
        # straight-through estimator: forward value exactly mu (the bracket is 0.0 in floating point, where
        # (mu + ν) − ν is not), gradient dL/dν = dL/dμ, or dL/dμ · σ'(ν) through σ(ν) − σ(ν).detach()
        through = torch.sigmoid(self.scores) if self.ste == "sigmoid" else self.scores
        return mu + (through - through.detach())

    def hard_mask(self) -> torch.Tensor:
        """Deterministic served mask, bool ``[out, in]``: the fixed draw :attr:`served` when one is set (the
        ``"sampled"`` rule), else ``1[ν > τ]`` (``τ = 0``: ``1[σ(ν) > 0.5]``)."""
        if self.served is not None:
            return self.served
        return self.scores.detach() > self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sample = self.training if self.sample is None else self.sample
        return F.linear(x, self.weight * self.mask(sample), self.bias)


class TaskHead(nn.Module):
    """Dense task head ``G_φ`` over mean-pooled token vectors: dropout then linear.

    Input ``[batch, hidden]``; output ``[batch, num_outputs]`` (logits, or one value for regression).
    """

    def __init__(self, hidden: int, num_outputs: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_outputs)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(pooled))


class EncoderWithHead(nn.Module):
    """An encoder and a :class:`TaskHead` over its mean-pooled token vectors: the task model that
    supermask training (:class:`SupermaskModel`) and the fine-tuning baseline
    (``training.finetune.FinetuneModel``) share. Subclasses set ``self.encoder`` (a Hugging Face
    encoder returning ``last_hidden_state``) and ``self.head`` in ``__init__``.
    """

    encoder: nn.Module
    head: TaskHead

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """Head outputs for a tokenized batch.

        Args:
            input_ids, attention_mask (and token_type_ids, optional; omitted from the encoder call
                when None): int64 ``[batch, seq]``; ``attention_mask`` is 1 for tokens, 0 for padding.
        Returns:
            ``[batch, num_outputs]`` in the encoder's dtype, float32 in training (logits; one value per
            row for regression, STS-B).
        """
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state
        return self.head(mean_pool(hidden, attention_mask))


class SupermaskModel(EncoderWithHead):
    """Backbone with every masked matrix replaced by a :class:`SupermaskLinear`, plus a task head.

    The backbone's own modules are modified in place; build one per training run.
    """

    def __init__(self, backbone: Backbone, num_outputs: int, init_sparsity: float = 0.0,
                 head_dropout: float = 0.1, quantized: bool = True, ste: str = "identity",
                 score_init: float = SCORE_INIT):
        super().__init__()
        self.encoder = backbone.model
        self.masked_names = list(backbone.masked)
        for name in self.masked_names:
            lin = self.encoder.get_submodule(name)
            weight = dequantize(backbone.qweight[name], backbone.scale[name]) if quantized else lin.weight
            replace_module(self.encoder, name, SupermaskLinear(weight, lin.bias, init_sparsity, ste, score_init))
        self.head = TaskHead(backbone.hidden_size, num_outputs, head_dropout)

    def masked_layers(self) -> dict[str, SupermaskLinear]:
        return {n: self.encoder.get_submodule(n) for n in self.masked_names}

    def set_threshold(self, tau: float) -> None:
        """Use ``μ = 1[ν > τ]`` as every masked layer's deterministic mask (``τ = 0``: ``1[σ(ν) > 0.5]``)."""
        for layer in self.masked_layers().values():
            layer.threshold = float(tau)
            layer.served = None

    def serve_one_draw(self, seed: int) -> None:
        """Fix every masked layer's deterministic mask to one draw ``μ ~ Bern(σ(ν))``: a CPU
        ``torch.Generator`` seeded with ``seed``, drawn layer by layer in :meth:`masked_layers` order
        (``torch.bernoulli`` on float32 CPU copies of the scores, the mask then moved to the scores' device),
        so one seed gives one mask wherever the model trained (CPU and CUDA generators give different streams).
        The network then serves a single member of the distribution it trained under (the paper's per-sample
        measure, Table 4, with one sample)."""
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        with torch.no_grad():
            for layer in self.masked_layers().values():
                p = torch.sigmoid(layer.scores.detach().to("cpu", torch.float32))
                layer.served = torch.bernoulli(p, generator=gen).bool().to(layer.scores.device)

    def set_sampling(self, sample: bool | None) -> None:
        """Force Bernoulli sampling on/off for every masked layer (None: follow train/eval mode)."""
        for layer in self.masked_layers().values():
            layer.sample = sample

    def draw_masks(self, generator: torch.Generator | None = None) -> None:
        """Draw one mask ``μ ~ Bern(σ(ν))`` per masked layer and use it in every sampling forward
        until :meth:`clear_drawn_masks`: a whole evaluation then sees one mask, as in the paper's
        "mean over 10 Bernoulli samples" (Table 4). ``generator``: torch RNG on the scores' device."""
        with torch.no_grad():
            for layer in self.masked_layers().values():
                layer.drawn = torch.bernoulli(torch.sigmoid(layer.scores), generator=generator)

    def clear_drawn_masks(self) -> None:
        """Back to a fresh draw per sampling forward."""
        for layer in self.masked_layers().values():
            layer.drawn = None

    def sparsity(self) -> float:
        """Fraction of zeros in the deterministic mask over all masked weights."""
        zeros = total = 0
        for layer in self.masked_layers().values():
            m = layer.hard_mask()
            zeros += int((~m).sum())
            total += m.numel()
        return zeros / total


def expected_sparsity(scores: list[torch.Tensor]) -> float:
    """Expected fraction of zeros of a Bernoulli mask ``μ ~ Bern(σ(ν))``: ``mean(1 − σ(ν))``.

    Args:
        scores: the mask scores ``ν`` of every masked matrix (any shapes, floating dtype).
    Returns:
        A float in [0, 1], weighted by entry count (Radiya-Dixit & Wang 2020, Eq. 3-4).
    Raises:
        ValueError: when ``scores`` holds no entries.
    """
    n = sum(s.numel() for s in scores)
    if n == 0:
        raise ValueError("no mask scores given")
    return float(sum((1.0 - torch.sigmoid(s.detach().double())).sum() for s in scores) / n)


def threshold_for_sparsity(scores: list[torch.Tensor], sparsity: float) -> float:
    """The global threshold ``τ`` such that ``μ = 1[ν > τ]`` prunes ``sparsity`` of all entries.

    ``τ = 0`` is the served default ``1[σ(ν) > 0.5]`` (not the paper's: it states no deterministic rule). One threshold over all
    matrices (ties at ``τ`` are pruned, so the achieved sparsity is at least ``sparsity``).

    Args:
        scores: the mask scores ``ν`` of every masked matrix (any shapes, floating dtype).
        sparsity: target fraction of zeros in [0, 1).
    Returns:
        ``τ`` as a float; ``-inf`` for ``sparsity = 0``.
    Raises:
        ValueError: for a sparsity outside [0, 1) or no entries.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores]) if scores else torch.empty(0)
    if flat.numel() == 0:
        raise ValueError("no mask scores given")
    k = int(round(sparsity * flat.numel()))
    if k == 0:
        return float("-inf")
    return float(torch.kthvalue(flat, k).values)


def apply_mask_rule(model: SupermaskModel, rule: str, seed: int = 0) -> str | None:
    """Set the deterministic mask a trained model serves, by its rule name; returns the bundle's rule text.

    ``"sign"``: ``μ = 1[ν > 0]`` (``τ = 0``; returns None, the bundle format's default text). ``"expected"``:
    ``μ = 1[ν > τ]`` with one global ``τ`` (:func:`threshold_for_sparsity`) pruning the expected sparsity of
    the sampled masks the network trained under, ``mean(1 − σ(ν))`` (:func:`expected_sparsity`).
    ``"sampled"``: one draw ``μ ~ Bern(σ(ν))`` fixed by ``seed`` (:meth:`SupermaskModel.serve_one_draw`),
    a network from the very distribution training sampled. All three are our choices: the paper
    (Radiya-Dixit & Wang 2020, Table 4) reports the mean over 10 Bernoulli samples and states no
    deterministic rule.

    Raises:
        ValueError: an unknown rule (one of :data:`training.MASK_RULES`).
    """
    from training import MASK_RULES

    check_choice("mask_rule", rule, MASK_RULES)
    if rule == "sign":
        model.set_threshold(0.0)
        return None
    if rule == "sampled":
        model.set_threshold(0.0)
        model.serve_one_draw(seed)
        return (f"mu ~ Bern(sigmoid(nu)): one draw, CPU torch.Generator seed {int(seed)}, layers in bundle order; "
                f"sparsity {model.sparsity():.6f}")
    nu = [layer.scores.detach() for layer in model.masked_layers().values()]
    target = expected_sparsity(nu)
    tau = threshold_for_sparsity(nu, target)
    model.set_threshold(tau)
    return (f"mu = 1[nu > {tau!r}]: one global threshold pruning the expected sampled sparsity "
            f"mean(1 - sigmoid(nu)) = {target:.6f}")
