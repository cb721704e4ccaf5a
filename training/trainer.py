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
from dataclasses import asdict, dataclass, field, fields
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
from training.model import SCORE_INIT, SupermaskModel, apply_mask_rule

log = logging.getLogger(__name__)
BERNOULLI_SAMPLES = 10
MIN_MASK_STEPS = 200  # a user's own data: fewest optimizer steps unless max_steps fixes them (plan_schedule)
MIN_SCORE_INIT = 1.0  # smallest |ν₀| plan_schedule gives
LEARNED_NOTHING_SPARSITY = 0.001
OWN_DATA_FIELDS = ("train_file", "validation_file", "test_file", "dataset", "text_column", "text_pair_column",
                   "label_column", "labels", "problem_type", "early_stopping", "patience", "linear_probe",
                   "scale_schedule", "max_minutes", "run_dir")  # a served mask pruning fewer weights than this is reported as a linear probe


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
    # --- a user's own data (training.data); none set: the GLUE preset ``task`` read from ``data_dir`` ---
    train_file: str | None = None  # CSV / TSV / JSON Lines / Parquet; ``task`` is then the bundle's name
    validation_file: str | None = None  # the held-out split (selection); None: carved from train
    test_file: str | None = None  # reported as "test"; never chosen on
    dataset: str | None = None  # a datasets.load_from_disk folder (splits train / validation / test)
    text_column: str | None = None  # default: text, sentence or sentence1
    text_pair_column: str | None = None  # default: sentence2 beside sentence1
    label_column: str | None = None  # default: label, labels or score
    labels: tuple[str, ...] | None = None  # class names in logit order; default: from the data
    problem_type: str = "auto"  # training.data.PROBLEM_TYPES
    # None: on for a user's own data, off for the GLUE presets (whose recorded figures predate them)
    early_stopping: bool | None = None  # keep the best held-out epoch, stop after ``patience`` without a gain
    patience: int = 3  # epochs
    linear_probe: bool | None = None  # fit and report the frozen-backbone baseline
    scale_schedule: bool | None = None  # plan_schedule's scaling of steps and |ν₀| to the data
    max_minutes: float | None = None  # wall-clock limit of the training steps
    # a folder holding the run's checkpoint after every epoch (RunFolder); a run given a folder that holds one
    # continues from it. None: no checkpoints
    run_dir: str | None = None

    @property
    def uses_files(self) -> bool:
        """True when the run reads the user's own data (``train_file`` or ``dataset``), not a GLUE preset."""
        return self.train_file is not None or self.dataset is not None


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
    report_split: str = "dev"  # what dev_metrics were measured on: "dev" (GLUE), "test" or "heldout"
    linear_probe: dict = field(default_factory=dict)  # the frozen-backbone baseline ({} when not fitted)
    warnings: list[str] = field(default_factory=list)  # e.g. the mask learned nothing
    timed_out: bool = False  # stopped by max_minutes (then evaluated and written as usual)
    early_stopped: bool = False


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


def _config_record(cfg: TrainConfig) -> dict:
    """``cfg`` as the bundle records it: without the output path; a GLUE preset's run leaves out the own-data
    settings still at their defaults, so its header reads as before they existed."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    return {k: v for k, v in asdict(cfg).items()
            if k != "output" and not (not cfg.uses_files and k in OWN_DATA_FIELDS and v == defaults[k])}


def plan_schedule(fit_examples: int, batch_size: int, epochs: float, max_steps: int | None, mask_lr: float,
                  scale: bool) -> dict:
    """The run's length and the mask scores' initial magnitude.

    Without scaling (the GLUE presets, the paper's recipe): ``steps = max_steps`` or ``round(epochs ·
    ceil(fit_examples / batch_size))``, ``|ν₀| = 5`` (Radiya-Dixit & Wang 2020, Section 3.3).

    With scaling (a user's own data): AdamW moves each score by about its learning rate per step at most
    (the update is ``lr · m / √v``), and linear warm-up then decay average half the peak rate, so in a run a
    score can travel about ``reach = mask_lr · steps / 2``. With ±5 at ν lr 0.1 that needs over 100 steps
    before any weight can be pruned: 200 rows × 3 epochs (18 steps) end at 0 % sparsity, a linear probe of
    the frozen backbone. So a short run gets at least :data:`MIN_MASK_STEPS` steps (unless ``max_steps``
    fixes it) and ``|ν₀| = clip(reach / 4, MIN_SCORE_INIT, 5)``.

    Returns:
        ``{"steps", "epochs", "score_init", "reach", "scaled", "steps_per_epoch"}`` (``epochs``: passes over
        the fitting rows that ``steps`` makes; recorded in the bundle as ``training["schedule"]``).
    """
    steps_per_epoch = max(1, (fit_examples + batch_size - 1) // batch_size)
    steps = max_steps or max(1, int(round(epochs * steps_per_epoch)))
    score_init = SCORE_INIT
    if scale and max_steps is None:
        steps = max(steps, MIN_MASK_STEPS)
    reach = mask_lr * steps / 2
    if scale:
        score_init = float(min(SCORE_INIT, max(MIN_SCORE_INIT, reach / 4)))
    return {"steps": steps, "epochs": round(steps / steps_per_epoch, 2), "score_init": score_init,
            "reach": round(reach, 3), "scaled": scale, "steps_per_epoch": steps_per_epoch}


def _load_data(cfg: TrainConfig):
    """``(task, fit, heldout, heldout_record, report_name, report_set, data_record)`` for a run.

    GLUE presets read the original TSV layout (train.tsv, held-out carved from it, dev.tsv reported as
    "dev"); a user's own data is read by :func:`training.data.load_task_data` (validation file as the
    held-out split when given, else carved the same way; test file reported as "test", else nothing more).
    """
    if not cfg.uses_files:
        task = get_task(cfg.task)
        fit, heldout, record = split_heldout(read_split(task, cfg.data_dir, "train"), cfg.heldout_fraction,
                                             cfg.heldout_seed)
        return task, fit, heldout, record, "dev", read_split(task, cfg.data_dir, "dev")[: cfg.dev_limit], None
    from training.data import imbalance, load_task_data

    data = load_task_data(cfg.task_name or cfg.task, train_file=cfg.train_file,
                          validation_file=cfg.validation_file, test_file=cfg.test_file, dataset_dir=cfg.dataset,
                          text_column=cfg.text_column, text_pair_column=cfg.text_pair_column,
                          label_column=cfg.label_column, labels=list(cfg.labels) if cfg.labels else None,
                          problem_type=cfg.problem_type)
    if data.validation is not None:
        fit, heldout = data.train, data.validation
        record = {"fraction": 0.0, "seed": None, "examples": len(heldout), "fit_examples": len(fit),
                  "rule": f"the validation split {data.sources['validation']}"}
    else:
        fit, heldout, record = split_heldout(data.train, cfg.heldout_fraction, cfg.heldout_seed)
        record["rule"] = record["rule"].replace("train.tsv's rows", "the training file's rows")
    test = data.test[: cfg.dev_limit] if data.test is not None else None
    data_record = {**data.task.describe(), "sources": data.sources, "train_rows": len(data.train)}
    balance = imbalance(data.class_counts)
    if balance is not None:
        data_record["class_balance"] = balance
        if balance["imbalanced"]:
            log.warning("class imbalance in %s: %s (largest / smallest class %s); the held-out split is "
                        "judged on macro-F1, which weighs every class equally", data.sources["train"],
                        balance["counts"], "inf" if balance["ratio"] is None else f"{balance['ratio']:.1f}")
    return data.task, fit, heldout, record, ("test" if test else None), test, data_record


def train(cfg: TrainConfig, backbone: Backbone | None = None, progress: bool = True,
          command: str = "") -> TrainResult:
    """Train a supermask for one task (a GLUE preset or the user's own data) and write its bundle to ``cfg.output``.

    ``command`` is the command line recorded in the bundle (the CLI passes its own). With
    ``cfg.save_scores`` the mask scores ``ν`` are also written to :func:`scores_path` (float16
    safetensors, ``<layer>.scores`` ``[out, in]``). Every setting, the bundle name, the output
    path and the data are checked before any weights are loaded, so a mistake cannot cost a finished run.

    A GLUE preset (``cfg.task`` a GLUE name, no files) runs exactly as before. A user's own data
    (``cfg.train_file`` or ``cfg.dataset``, :mod:`training.data`) also, by default: scales the schedule to
    the data (:func:`plan_schedule`), keeps the best held-out checkpoint of each epoch and stops after
    ``cfg.patience`` epochs without a gain (``cfg.early_stopping``), fits the linear-probe baseline
    (a head on the frozen, unmasked backbone; ``metrics["linear_probe"]``), and warns when the served mask
    prunes (almost) nothing (``training["warnings"]``).

    ``cfg.max_minutes`` stops training (no new step starts) after that many minutes; the best checkpoint
    so far is then evaluated and written as after a complete run (``training["stopped"]``).

    On Ctrl-C after at least one step, training stops and the bundle (and scores) of the model as it
    stands is written without dev evaluation (``training["interrupted"]``, ``metrics`` empty);
    :attr:`TrainResult.interrupted` is True. Before the first step, ``KeyboardInterrupt`` propagates.

    Raises:
        GlueDataError: data missing or malformed (:class:`training.data.DataError`, a subclass, for the
            user's own files: a missing column, an empty file, a label seen only in validation or test,
            text that is not text).
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
    for opt_name in ("batch_size", "max_steps", "train_limit", "dev_limit", "max_seq_length", "eval_batch_size",
                     "patience"):
        value = getattr(cfg, opt_name)
        if value is not None and value < 1:
            raise ValueError(f"{opt_name} must be >= 1, got {value}")
    if cfg.max_minutes is not None and not cfg.max_minutes > 0:
        raise ValueError(f"max_minutes must be > 0, got {cfg.max_minutes}")
    if cfg.head_refit_steps < 0:
        raise ValueError(f"head_refit_steps must be >= 0, got {cfg.head_refit_steps}")
    if cfg.head_refit_steps > 0 and cfg.heldout_fraction == 0 and cfg.validation_file is None:
        raise ValueError("a head refit chooses its penalty on the held-out split: give heldout_fraction > 0 "
                         "(or head_refit_steps 0)")
    check_choice("regression_scale", cfg.regression_scale, REGRESSION_SCALES)
    if cfg.epochs <= 0 or cfg.bernoulli_samples < 0:
        raise ValueError(f"epochs must be > 0 and bernoulli_samples >= 0, got {cfg.epochs}, {cfg.bernoulli_samples}")
    own_data = cfg.uses_files
    early_stopping = own_data if cfg.early_stopping is None else cfg.early_stopping
    probe = own_data if cfg.linear_probe is None else cfg.linear_probe
    scale = own_data if cfg.scale_schedule is None else cfg.scale_schedule
    check_task_name(cfg.task_name or (cfg.task if own_data else get_task(cfg.task).name))
    check_output(cfg.output)
    task, train_set, heldout_set, heldout_split, report_name, report_set, data_record = _load_data(cfg)
    train_set = train_set[: cfg.train_limit]
    if (early_stopping or probe) and not heldout_set:
        raise ValueError("early stopping and the linear probe are judged on the held-out split: give "
                         "heldout_fraction > 0 or a validation file (or turn both off)")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    backbone = backbone or load_backbone(cfg.backbone, bits=min(cfg.bits, 8))  # bits=32: int8 fingerprint
    if cfg.bits == 32:
        restore_float_weights(backbone)
    if cfg.shuffle_weights:
        shuffle_masked_weights(backbone, cfg.seed, float_weights=cfg.bits == 32)
    tokenizer = backbone.tokenizer
    num_out = 1 if task.problem_type == "regression" else len(task.labels)
    schedule = plan_schedule(len(train_set), cfg.batch_size, cfg.epochs, cfg.max_steps, cfg.mask_lr, scale)
    model = SupermaskModel(backbone, num_out, cfg.init_sparsity, cfg.head_dropout, quantized=cfg.bits < 32,
                           ste=cfg.ste, score_init=schedule["score_init"])
    model.to(device)
    extra_sets = {report_name: report_set} if report_set else {}
    linear_probe = _linear_probe(model, tokenizer, task, train_set, heldout_set, extra_sets, cfg, device,
                                 progress) if probe else {}

    total_steps = schedule["steps"]
    scores = [layer.scores for layer in model.masked_layers().values()]
    opt = torch.optim.AdamW(
        [
            {"params": scores, "lr": cfg.mask_lr, "weight_decay": 0.0},
            {"params": list(model.head.parameters()), "lr": cfg.head_lr, "weight_decay": cfg.weight_decay},
        ]
    )
    stopper = _EarlyStopping(model, tokenizer, task, heldout_set, cfg, device, cfg.patience,
                             min_step=total_steps // 4) if early_stopping else None
    folder = RunFolder(cfg.run_dir, _config_record(cfg)) if cfg.run_dir else None
    resume = folder.resume(model, opt, stopper) if folder else None
    t0 = time.perf_counter()
    deadline = time.monotonic() + 60 * cfg.max_minutes if cfg.max_minutes else None
    if resume is not None and stopper is not None and stopper.stopped:  # it had stopped early: only finish it
        losses = list(resume["losses"])
    else:
        losses = run_steps(model, task, train_set, tokenizer, opt, total_steps, batch_size=cfg.batch_size,
                           max_len=cfg.max_seq_length, seed=cfg.seed, warmup_ratio=cfg.warmup_ratio,
                           desc=f"train {task.name}", progress=progress, device=device, stop_on_interrupt=True,
                           on_epoch_end=stopper.on_epoch_end if stopper else None, deadline=deadline,
                           status=stopper.status if stopper else None,
                           checkpoint=(lambda state: folder.save(state, model, opt, stopper)) if folder else None,
                           resume=resume)
    step = len(losses)
    seconds = time.perf_counter() - t0
    timed_out = deadline is not None and step < total_steps and time.monotonic() >= deadline
    early_stopped = stopper is not None and stopper.stopped
    interrupted = step < total_steps and not (timed_out or early_stopped)
    if stopper is not None and not interrupted:
        stopper.finish(step)

    mask_rule = apply_mask_rule(model, cfg.mask_rule, seed=cfg.seed) or MASK_RULE

    dev: dict[str, float] = {}
    heldout: dict = {}
    refit: dict = {}
    dev_extra: dict = {}  # the refit's calibration / log loss on dev
    bern = {}
    if cfg.bernoulli_samples > 0 and not interrupted and report_set:  # the paper's measure: trained head, sampled masks
        bern = evaluate_bernoulli(model, tokenizer, task, report_set, cfg.max_seq_length, cfg.bernoulli_samples,
                                  cfg.eval_batch_size, seed=cfg.seed, device=device)
    if cfg.head_refit_steps > 0 and not interrupted:
        _, refit = refit_head(model, tokenizer, task, train_set, heldout_set, cfg.max_seq_length,
                              cfg.head_refit_steps, cfg.regression_scale, cfg.eval_batch_size, device, progress,
                              extra=extra_sets)
        dev, dev_extra = split_metrics(refit["after"][report_name or "heldout"])
        heldout = refit["after"]["heldout"]
    elif not interrupted:
        if report_set:
            golds = np.array([e.label for e in report_set])
            dev = compute_metrics(task, predict(model, tokenizer, task, report_set, cfg.max_seq_length,
                                                cfg.eval_batch_size,
                                                desc=f"{report_name} (deterministic mask)" if progress else None,
                                                device=device), golds)
        if heldout_set:
            held_golds = np.array([e.label for e in heldout_set])
            held_pred = predict(model, tokenizer, task, heldout_set, cfg.max_seq_length, cfg.eval_batch_size,
                                desc="held-out (deterministic mask)" if progress else None, device=device)
            heldout = compute_metrics(task, held_pred, held_golds)
            if task.problem_type == "regression":
                heldout["calibration"] = calibration(held_pred, held_golds)
        if not report_set:
            dev = {k: v for k, v in heldout.items() if k != "calibration"}
    sparsity = model.sparsity()
    name = cfg.task_name or task.name
    training = {
        "method": "supermask (Radiya-Dixit & Wang 2020), straight-through Bernoulli, "
                  + ("fp32 backbone" if cfg.bits == 32 else f"int{cfg.bits} per-channel backbone"),
        "config": _config_record(cfg),
        "steps": step,
        "train_examples": len(train_set),
        "heldout_split": heldout_split,
        "seconds": round(seconds, 1),
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-50:])),
        "hardware": {**hardware(), "device": str(device)},
        "command": command,
    }
    warnings: list[str] = []
    if own_data:
        training["data"] = data_record
        training["schedule"] = schedule
        if not interrupted and sparsity < LEARNED_NOTHING_SPARSITY:
            warnings.append(f"the served mask prunes {sparsity:.2%} of the weights: the mask learned (almost) "
                            "nothing and the task is a linear probe of the frozen backbone; train longer "
                            "(--epochs, --max-steps) or raise --mask-lr")
    if stopper is not None:
        training["early_stopping"] = stopper.record()
    if timed_out:
        training["stopped"] = f"--max-minutes {cfg.max_minutes}: stopped after {step} of {total_steps} steps"
    if refit:
        training["head_refit"] = {k: v for k, v in refit.items() if k not in ("before", "after")}
    if interrupted:
        training["interrupted"] = f"stopped by the user after {step} of {total_steps} steps; not evaluated"
    metrics: dict = {}  # an interrupted run is not evaluated
    if not interrupted:
        metrics = {"split": report_name or "heldout",
                   "dev_examples": len(report_set) if report_set else len(heldout_set),
                   "deterministic": dev, "bernoulli": bern}
        if own_data:
            metrics["problem_type"] = task.problem_type
            metrics["main_metric"] = task.main_metric
        if heldout:
            metrics["heldout"] = heldout
        if linear_probe:
            metrics["linear_probe"] = linear_probe
        if refit:
            metrics["before_head_refit"] = {
                "deterministic": split_metrics(refit["before"][report_name or "heldout"])[0],
                "heldout": refit["before"]["heldout"]}
            if "calibration" in dev_extra:
                metrics["calibration"] = dev_extra["calibration"]
            if bern:
                metrics["bernoulli_head"] = "the trained head (before the refit), under sampled masks"
    if bern:  # how the samples drew masks (evaluate_bernoulli's per="batch"), and the s.d. used (population)
        metrics["bernoulli_protocol"] = {"per": "batch", "batch_size": cfg.eval_batch_size, "std_ddof": 0}
    if warnings:
        training["warnings"] = warnings
        for w in warnings:
            log.warning("%s", w)
    data = build_bundle(model, backbone, task, name, cfg.max_seq_length, training, metrics, mask_rule)
    write_output(cfg.output, data)
    if folder is not None and not interrupted:
        folder.finish()  # the run is complete: nothing to resume
    if cfg.save_scores:
        from safetensors.torch import save_file

        save_file({f"{n}.scores": layer.scores.detach().to("cpu", torch.float16).contiguous()
                   for n, layer in model.masked_layers().items()},
                  str(scores_path(cfg.output)))
    log.info("wrote %s (%d bytes), sparsity %.4f, %s %s", cfg.output, len(data), sparsity, report_name or "heldout",
             dev)
    return TrainResult(cfg.output, step, seconds, float(np.mean(losses[-50:])), losses[0], sparsity, dev, bern,
                       heldout, refit, losses, str(device), interrupted, report_name or "heldout", linear_probe,
                       warnings, bool(timed_out), bool(early_stopped))


def _linear_probe(model: SupermaskModel, tokenizer, task, fit_set: list[Example], heldout_set: list[Example],
                  extra: dict[str, list[Example]], cfg: TrainConfig, device, progress: bool) -> dict:
    """The baseline a mask must beat: a head fitted on the frozen, unmasked backbone's pooled features
    (every mask entry kept; the same head fit and held-out penalty choice as the head refit,
    :func:`training.refit.fit_head`). Returns ``{"heldout": metrics, <split>: metrics, "choice": {...}}``."""
    from training.refit import evaluate_head, fit_head, pooled_features

    model.set_threshold(float("-inf"))  # 1[ν > −inf]: every weight kept
    try:
        sets = {"fit": fit_set, "heldout": heldout_set, **extra}
        feats = {k: pooled_features(model, tokenizer, v, cfg.max_seq_length, cfg.eval_batch_size, device,
                                    desc=f"linear probe features ({k})" if progress else None)
                 for k, v in sets.items()}
    finally:
        model.set_threshold(0.0)
    golds = {k: np.array([e.label for e in v]) for k, v in sets.items()}
    fit = fit_head(task, feats["fit"], golds["fit"], feats["heldout"], golds["heldout"],
                   cfg.head_refit_steps or DEFAULT_REFIT_STEPS, cfg.regression_scale, progress)
    out = {k: split_metrics(evaluate_head(task, feats[k], golds[k], fit.weight, fit.bias))[0]
           for k in sets if k != "fit"}
    out["choice"] = {k: v for k, v in fit.choice.items() if k != "heldout"}
    out["method"] = "head on the frozen unmasked backbone (mean-pooled features), penalty chosen on held-out"
    return out


class _EarlyStopping:
    """Evaluate the deterministic mask and the current head on the held-out split after every epoch, keep
    the best checkpoint (scores ``ν`` and head, on the CPU) by the task's main metric (macro-F1 or
    Pearson for a user's task, the GLUE metric for a preset), and ask to stop after ``patience`` epochs
    without a gain. :meth:`finish` evaluates the last state too and restores the best one.
    Only checkpoints from ``min_step`` on compete (a quarter of the run: before that the scores have not
    travelled far enough from ``±|ν₀|`` to prune anything, :func:`plan_schedule`, so an early epoch would
    pick a mask that keeps every weight)."""

    def __init__(self, model: SupermaskModel, tokenizer, task, heldout_set: list[Example], cfg: TrainConfig,
                 device, patience: int, min_step: int = 0):
        self.model, self.tokenizer, self.task, self.heldout = model, tokenizer, task, heldout_set
        self.cfg, self.device, self.patience, self.min_step = cfg, device, patience, min_step
        self.golds = np.array([e.label for e in heldout_set])
        self.best: tuple[float, int, int, dict] | None = None  # (score, epoch, step, state)
        self.history: list[dict] = []
        self.status: dict = {}
        self.stopped = False
        self.since_best = 0

    def _evaluate(self, epoch: int | None, step: int) -> None:
        pred = predict(self.model, self.tokenizer, self.task, self.heldout, self.cfg.max_seq_length,
                       self.cfg.eval_batch_size, device=self.device)
        m = compute_metrics(self.task, pred, self.golds)
        score = float(m[self.task.main_metric])
        if not np.isfinite(score):
            score = -np.inf
        self.history.append({"epoch": epoch, "step": step, "sparsity": round(self.model.sparsity(), 6),
                             self.task.main_metric: score})
        self.status[f"heldout_{self.task.main_metric}"] = f"{score:.4f}"
        if step < self.min_step:
            return
        if self.best is None or score > self.best[0]:
            state = {"scores": {n: layer.scores.detach().to("cpu").clone()
                                for n, layer in self.model.masked_layers().items()},
                     "head": {k: v.detach().to("cpu").clone() for k, v in self.model.head.state_dict().items()}}
            self.best = (score, epoch, step, state)
            self.since_best = 0
        else:
            self.since_best += 1

    def on_epoch_end(self, epoch: int, step: int) -> bool:
        self._evaluate(epoch, step)
        if self.since_best >= self.patience:
            self.stopped = True
        return self.stopped

    def finish(self, step: int) -> None:
        """Evaluate the final state (unless the last epoch just was) and load the best checkpoint."""
        if not self.history or self.history[-1]["step"] != step:
            self._evaluate(None, step)
        if self.best is None:  # nothing from min_step on (a time limit): keep the last state
            return
        _, _, _, state = self.best
        with torch.no_grad():
            for n, layer in self.model.masked_layers().items():
                layer.scores.copy_(state["scores"][n].to(layer.scores.device))
            self.model.head.load_state_dict({k: v.to(self.device) for k, v in state["head"].items()})

    def get_state(self) -> dict:
        """What a :class:`RunFolder` checkpoint keeps of the early stopping (the best state included)."""
        return {"best": self.best, "history": self.history, "since_best": self.since_best, "stopped": self.stopped}

    def load_state(self, state: dict) -> None:
        self.best, self.history = state["best"], state["history"]
        self.since_best, self.stopped = state["since_best"], state["stopped"]

    def record(self) -> dict:
        b = self.best
        return {"metric": self.task.main_metric, "patience": self.patience, "from_step": self.min_step,
                "stopped_early": self.stopped,
                "best": None if b is None else {"score": b[0], "epoch": b[1], "step": b[2]},
                "history": self.history}


def scores_path(bundle_path: str | Path) -> Path:
    """Where :func:`train` writes the mask scores ``ν`` of a bundle (float16 safetensors)."""
    p = Path(bundle_path)
    return p.with_name(p.name + ".scores.safetensors")


class RunFolder:
    """A resumable run: ``<run_dir>/checkpoint.pt`` (``torch.save``), written atomically after every epoch.

    It holds the run's config record (a run resumes only with the same settings, ``max_minutes`` and
    ``run_dir`` aside), the loop's state (:func:`training.loop.run_steps`' ``checkpoint``: epoch, losses, the
    learning-rate schedule, the data-order and global torch generators), the mask scores ``ν`` and the head,
    the optimizer's state and the early-stopping record, so that a resumed run takes the steps an
    uninterrupted one would (CPU generators; a CUDA run resumes with a fresh CUDA stream). The file is
    removed when the run completes. For all-MiniLM-L6-v2 it is about 270 MB (ν and AdamW's two moments,
    float32).
    """

    FILE = "checkpoint.pt"
    IGNORED = ("max_minutes", "run_dir")

    def __init__(self, run_dir: str | Path, config: dict):
        self.dir = Path(run_dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"run folder {str(run_dir)!r} is a file")
        self.config = {k: v for k, v in config.items() if k not in self.IGNORED}
        self.path = self.dir / self.FILE

    def resume(self, model: SupermaskModel, opt: torch.optim.Optimizer, stopper) -> dict | None:
        """Load the checkpoint into ``model``, ``opt`` and ``stopper``; returns the loop state (None: no checkpoint).

        Raises:
            ValueError: the checkpoint was written by a run with other settings (the differing keys are named).
        """
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        saved = state["config"]
        diff = sorted(k for k in set(saved) | set(self.config) if saved.get(k) != self.config.get(k))
        if diff:
            raise ValueError(f"run folder {str(self.dir)!r} holds a run with other settings (differing: "
                             f"{', '.join(diff)}); use another --run-dir or the same settings")
        with torch.no_grad():
            for n, layer in model.masked_layers().items():
                layer.scores.copy_(state["scores"][n].to(layer.scores.device))
        model.head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        if stopper is not None and state.get("stopper") is not None:
            stopper.load_state(state["stopper"])
        log.info("resuming %s from epoch %d (%d steps done)", self.dir, state["loop"]["epoch"],
                 len(state["loop"]["losses"]))
        return state["loop"]

    def save(self, loop_state: dict, model: SupermaskModel, opt: torch.optim.Optimizer, stopper) -> None:
        """Write the checkpoint (atomically: a temporary file in the folder, then ``os.replace``)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        state = {"config": self.config, "loop": loop_state,
                 "scores": {n: layer.scores.detach().to("cpu") for n, layer in model.masked_layers().items()},
                 "head": {k: v.detach().to("cpu") for k, v in model.head.state_dict().items()},
                 "optimizer": opt.state_dict(), "stopper": stopper.get_state() if stopper is not None else None}
        tmp = self.path.with_name(self.FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def finish(self) -> None:
        """The run completed: remove the checkpoint."""
        self.path.unlink(missing_ok=True)
