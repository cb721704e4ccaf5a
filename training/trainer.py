"""Supermask training and evaluation on GLUE, producing a task bundle.

Recipe (Radiya-Dixit & Wang 2020, Section 3.3 and Devlin et al. 2018): mask
scores ``ν`` initialised to ±5 by per-matrix magnitude, ``μ = Bern(σ(ν))``
with a straight-through gradient, masks over the de-quantized int8 backbone,
a dense task head, AdamW with linear warm-up and linear decay, a separate
learning rate (and no weight decay) for ``ν``.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mask_store.format import MASK_RULE
from mask_store.local import check_task_name
from backbone import Backbone, load_backbone, resolve_torch_device
from training import BERNOULLI_PER, MASK_RULES, STE_KINDS, check_choice
from training.controls import restore_float_weights, shuffle_masked_weights
from training.glue import (HELDOUT_FRACTION, HELDOUT_SEED, Example, GlueTask, calibration, compute_metrics, get_task,
                           read_split, split_heldout)
from training.loop import predict_examples, run_steps
from training.bundles import build_bundle, check_output, write_output
from training.refit import DEFAULT_REFIT_STEPS, REGRESSION_SCALES, refit_head, split_metrics
from training.supermask import SupermaskModel, apply_mask_rule

log = logging.getLogger(__name__)
BERNOULLI_SAMPLES = 10


@dataclass
class TrainConfig:
    """Everything that determines a training run (recorded in the bundle)."""

    task: str
    data_dir: str
    output: str
    backbone: str | None = None
    bits: int = 8  # 1..8: masks over deq(int-b weights); 32: over the un-quantized fp32 weights
    max_seq_length: int = 128
    batch_size: int = 32
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    mask_lr: float = 0.1  # learning rate of the mask scores ν
    head_lr: float = 1e-3
    weight_decay: float = 0.01  # head only; ν has none
    warmup_ratio: float = 0.1
    init_sparsity: float = 0.0
    head_dropout: float = 0.1
    seed: int = 0
    train_limit: int | None = None  # use only the first N training examples
    dev_limit: int | None = None
    eval_batch_size: int = 64
    bernoulli_samples: int = BERNOULLI_SAMPLES
    save_scores: bool = True  # also write ν next to the bundle, for Bernoulli evaluation later
    task_name: str | None = None  # name in the bundle; default: the GLUE name
    shuffle_weights: bool = False  # control (paper §4.4): permute each masked matrix's entries first
    device: str = "auto"  # "auto": cuda when available, else cpu; "cpu", "cuda", "cuda:1", ...
    # deterministic mask written to the bundle: "sign" = 1[ν > 0] (ours, the paper states no rule); "expected" = 1[ν > τ] with one
    # global τ that prunes the expected sparsity of the sampled masks trained with, mean(1 − σ(ν))
    mask_rule: str = "sign"  # one of training.MASK_RULES
    ste: str = "identity"  # straight-through gradient to ν, one of training.STE_KINDS
    # held-out validation split carved from train.tsv (training.glue.split_heldout): not trained on; model
    # selection is judged on it, never on dev. 0.0: train on every row (runs before held-out splits)
    heldout_fraction: float = HELDOUT_FRACTION
    heldout_seed: int = HELDOUT_SEED
    # head refit on the frozen served mask after the Bernoulli phase (training.refit; an extension of the
    # paper's method): L-BFGS iterations per classification candidate, regression in closed form; 0: no refit
    head_refit_steps: int = DEFAULT_REFIT_STEPS
    regression_scale: str = "match-sd"  # training.refit.REGRESSION_SCALES


@dataclass
class TrainResult:
    bundle_path: str
    steps: int
    seconds: float
    final_loss: float
    first_loss: float
    sparsity: float
    dev_metrics: dict[str, float]
    bernoulli: dict[str, dict[str, float]] = field(default_factory=dict)
    heldout_metrics: dict[str, float] = field(default_factory=dict)  # served mask on the held-out split
    head_refit: dict = field(default_factory=dict)  # training.refit.refit_head's record ({} without a refit)
    losses: list[float] = field(default_factory=list)  # training loss per step
    device: str = "cpu"  # where it trained
    interrupted: bool = False  # stopped by Ctrl-C before all steps: bundle written unevaluated


def predict(model: SupermaskModel, tokenizer, task: GlueTask, examples: list[Example], max_len: int,
            batch_size: int = 64, sample: bool = False, desc: str | None = None,
            device: torch.device | str = "cpu") -> np.ndarray:
    """Class indices (or regression values) ``[n]`` for ``examples``.

    ``sample=False`` uses the deterministic mask ``1[ν > τ]`` (``τ = 0`` unless set); True draws one
    Bernoulli mask per layer per batch.
    """
    model.set_sampling(sample)
    try:
        return predict_examples(model, tokenizer, task, examples, max_len, batch_size, device, desc=desc)
    finally:
        model.set_sampling(None)


def evaluate_bernoulli(model: SupermaskModel, tokenizer, task: GlueTask, examples: list[Example], max_len: int,
                       samples: int, batch_size: int = 64, seed: int = 0,
                       device: torch.device | str = "cpu", per: str = "batch") -> dict[str, dict[str, float]]:
    """Mean and standard deviation of each metric over ``samples`` Bernoulli mask draws
    (the paper's Table 4 protocol).

    Returns:
        ``{metric: {"mean", "std", "n"}}``; ``std`` is the population s.d. (``np.std``, divides by n).

    ``per``: "batch" (what every recorded run used so far) draws a fresh mask for each batch of
    ``batch_size`` examples, so one sample's metric averages several masks and the s.d. comes out
    smaller than the spread between single masks; "mask" draws one mask per sample and evaluates
    every example with it (:meth:`SupermaskModel.draw_masks`), the paper's reading.

    Raises:
        ValueError: ``per`` is neither "batch" nor "mask".
    """
    check_choice("per", per, BERNOULLI_PER)
    golds = np.array([e.label for e in examples])
    runs: dict[str, list[float]] = {}
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # seeds the CUDA generators too
    for s in tqdm(range(samples), desc="bernoulli samples", leave=False):
        if per == "mask":
            model.draw_masks()  # from the global generator seeded above
        try:
            m = compute_metrics(task, predict(model, tokenizer, task, examples, max_len, batch_size, sample=True,
                                              device=device), golds)
        finally:
            model.clear_drawn_masks()
        for k, v in m.items():
            runs.setdefault(k, []).append(v)
    torch.random.set_rng_state(gen_state)
    return {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for k, v in runs.items()}


def hardware() -> dict[str, object]:
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def train(cfg: TrainConfig, backbone: Backbone | None = None, progress: bool = True,
          command: str = "") -> TrainResult:
    """Train a supermask for one GLUE task and write its bundle to ``cfg.output``.

    ``command`` is the command line recorded in the bundle (the CLI passes its own). With
    ``cfg.save_scores`` the mask scores ``ν`` are also written to :func:`scores_path` (float16
    safetensors, ``<layer>.scores`` ``[out, in]``). Every setting, the bundle name and the output
    path are checked before any data or weights are loaded, so a mistake cannot cost a finished run.

    On Ctrl-C after at least one step, training stops and the bundle (and scores) of the model as it
    stands is written without dev evaluation (``training["interrupted"]``, ``metrics`` empty);
    :attr:`TrainResult.interrupted` is True. Before the first step, ``KeyboardInterrupt`` propagates.

    Raises:
        GlueDataError: data missing or malformed.
        BackboneLoadError: backbone folder unusable.
        InvalidTaskName: the bundle name (``cfg.task_name`` or the GLUE name) is not a valid task name.
        ValueError: inconsistent settings, an output path that is a folder, or a CUDA device asked
            for without CUDA.
        OSError: the output cannot be written.
    """
    device = resolve_torch_device(cfg.device)
    if cfg.mask_lr <= 0 or cfg.head_lr <= 0:
        raise ValueError(f"learning rates must be positive, got mask_lr={cfg.mask_lr}, head_lr={cfg.head_lr}")
    check_choice("mask_rule", cfg.mask_rule, MASK_RULES)
    check_choice("ste", cfg.ste, STE_KINDS)
    if not (1 <= cfg.bits <= 8 or cfg.bits == 32):
        raise ValueError(f"bits must be in 1..8 or 32 (un-quantized), got {cfg.bits}")
    for opt_name in ("batch_size", "max_steps", "train_limit", "dev_limit", "max_seq_length", "eval_batch_size"):
        value = getattr(cfg, opt_name)
        if value is not None and value < 1:
            raise ValueError(f"{opt_name} must be >= 1, got {value}")
    if cfg.head_refit_steps < 0:
        raise ValueError(f"head_refit_steps must be >= 0, got {cfg.head_refit_steps}")
    if cfg.head_refit_steps > 0 and cfg.heldout_fraction == 0:
        raise ValueError("a head refit chooses its penalty on the held-out split: give heldout_fraction > 0 "
                         "(or head_refit_steps 0)")
    check_choice("regression_scale", cfg.regression_scale, REGRESSION_SCALES)
    if cfg.epochs <= 0 or cfg.bernoulli_samples < 0:
        raise ValueError(f"epochs must be > 0 and bernoulli_samples >= 0, got {cfg.epochs}, {cfg.bernoulli_samples}")
    task = get_task(cfg.task)
    check_task_name(cfg.task_name or task.name)
    check_output(cfg.output)
    train_set, heldout_set, heldout_split = split_heldout(read_split(task, cfg.data_dir, "train"),
                                                          cfg.heldout_fraction, cfg.heldout_seed)
    train_set = train_set[: cfg.train_limit]
    dev_set = read_split(task, cfg.data_dir, "dev")[: cfg.dev_limit]
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    backbone = backbone or load_backbone(cfg.backbone, bits=min(cfg.bits, 8))  # bits=32: int8 fingerprint
    if cfg.bits == 32:
        restore_float_weights(backbone)
    if cfg.shuffle_weights:
        shuffle_masked_weights(backbone, cfg.seed, float_weights=cfg.bits == 32)
    tokenizer = backbone.tokenizer
    num_out = 1 if task.problem_type == "regression" else len(task.labels)
    model = SupermaskModel(backbone, num_out, cfg.init_sparsity, cfg.head_dropout, quantized=cfg.bits < 32,
                           ste=cfg.ste)
    model.to(device)

    steps_per_epoch = (len(train_set) + cfg.batch_size - 1) // cfg.batch_size
    total_steps = cfg.max_steps or max(1, int(round(cfg.epochs * steps_per_epoch)))
    scores = [layer.scores for layer in model.masked_layers().values()]
    opt = torch.optim.AdamW(
        [
            {"params": scores, "lr": cfg.mask_lr, "weight_decay": 0.0},
            {"params": list(model.head.parameters()), "lr": cfg.head_lr, "weight_decay": cfg.weight_decay},
        ]
    )
    t0 = time.perf_counter()
    losses = run_steps(model, task, train_set, tokenizer, opt, total_steps, batch_size=cfg.batch_size,
                       max_len=cfg.max_seq_length, seed=cfg.seed, warmup_ratio=cfg.warmup_ratio,
                       desc=f"train {task.name}", progress=progress, device=device, stop_on_interrupt=True)
    step = len(losses)
    seconds = time.perf_counter() - t0
    interrupted = step < total_steps

    mask_rule = apply_mask_rule(model, cfg.mask_rule, seed=cfg.seed) or MASK_RULE

    golds = np.array([e.label for e in dev_set])
    dev: dict[str, float] = {}
    heldout: dict = {}
    refit: dict = {}
    dev_extra: dict = {}  # the refit's calibration / log loss on dev
    bern = {}
    if cfg.bernoulli_samples > 0 and not interrupted:  # the paper's measure: the trained head, sampled masks
        bern = evaluate_bernoulli(model, tokenizer, task, dev_set, cfg.max_seq_length, cfg.bernoulli_samples,
                                  cfg.eval_batch_size, seed=cfg.seed, device=device)
    if cfg.head_refit_steps > 0 and not interrupted:
        _, refit = refit_head(model, tokenizer, task, train_set, heldout_set, cfg.max_seq_length,
                              cfg.head_refit_steps, cfg.regression_scale, cfg.eval_batch_size, device, progress,
                              extra={"dev": dev_set})
        dev, dev_extra = split_metrics(refit["after"]["dev"])
        heldout = refit["after"]["heldout"]
    elif not interrupted:
        dev = compute_metrics(task, predict(model, tokenizer, task, dev_set, cfg.max_seq_length,
                                            cfg.eval_batch_size, desc="dev (deterministic mask)" if progress else None,
                                            device=device), golds)
        if heldout_set:
            held_golds = np.array([e.label for e in heldout_set])
            held_pred = predict(model, tokenizer, task, heldout_set, cfg.max_seq_length, cfg.eval_batch_size,
                                desc="held-out (deterministic mask)" if progress else None, device=device)
            heldout = compute_metrics(task, held_pred, held_golds)
            if task.problem_type == "regression":
                heldout["calibration"] = calibration(held_pred, held_golds)
    sparsity = model.sparsity()
    name = cfg.task_name or task.name
    training = {
        "method": "supermask (Radiya-Dixit & Wang 2020), straight-through Bernoulli, "
                  + ("fp32 backbone" if cfg.bits == 32 else f"int{cfg.bits} per-channel backbone"),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("output",)},
        "steps": step,
        "train_examples": len(train_set),
        "heldout_split": heldout_split,
        "seconds": round(seconds, 1),
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-50:])),
        "hardware": {**hardware(), "device": str(device)},
        "command": command,
    }
    if refit:
        training["head_refit"] = {k: v for k, v in refit.items() if k not in ("before", "after")}
    if interrupted:
        training["interrupted"] = f"stopped by the user after {step} of {total_steps} steps; not evaluated"
    metrics: dict = {}  # an interrupted run is not evaluated
    if not interrupted:
        metrics = {"split": "dev", "dev_examples": len(dev_set), "deterministic": dev, "bernoulli": bern}
        if heldout:
            metrics["heldout"] = heldout
        if refit:
            metrics["before_head_refit"] = {
                "deterministic": split_metrics(refit["before"]["dev"])[0],
                "heldout": refit["before"]["heldout"]}
            if "calibration" in dev_extra:
                metrics["calibration"] = dev_extra["calibration"]
            if bern:
                metrics["bernoulli_head"] = "the trained head (before the refit), under sampled masks"
    if bern:  # how the samples drew masks (evaluate_bernoulli's per="batch"), and the s.d. used (population)
        metrics["bernoulli_protocol"] = {"per": "batch", "batch_size": cfg.eval_batch_size, "std_ddof": 0}
    data = build_bundle(model, backbone, task, name, cfg.max_seq_length, training, metrics, mask_rule)
    write_output(cfg.output, data)
    if cfg.save_scores:
        from safetensors.torch import save_file

        save_file({f"{n}.scores": layer.scores.detach().to("cpu", torch.float16).contiguous()
                   for n, layer in model.masked_layers().items()},
                  str(scores_path(cfg.output)))
    log.info("wrote %s (%d bytes), sparsity %.4f, dev %s", cfg.output, len(data), sparsity, dev)
    return TrainResult(cfg.output, step, seconds, float(np.mean(losses[-50:])), losses[0], sparsity, dev, bern,
                       heldout, refit, losses, str(device), interrupted)


def scores_path(bundle_path: str | Path) -> Path:
    """Where :func:`train` writes the mask scores ``ν`` of a bundle (float16 safetensors)."""
    p = Path(bundle_path)
    return p.with_name(p.name + ".scores.safetensors")
