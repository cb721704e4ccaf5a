"""Head refit on the served network: an explicit extension of the paper's method.

Supermask training (Radiya-Dixit & Wang 2020) fits the task head while the encoder runs under
sampled masks ``μ ~ Bern(σ(ν))``; the paper reports the mean over 10 such samples and states no
deterministic rule. A server runs one deterministic mask (``1[ν > τ]``), which is a different network
from every sampled one, so the head it inherits is fitted to other features: on STS-B the served
scores came out shrunk (mean 1.59, s.d. 0.95 against gold 2.36, 1.50).

The refit freezes the served mask, runs that network once over the training examples to cache the
mean-pooled features ``h(x)`` (float32 ``[n, hidden]``), and fits the head on the cache:

* regression: ridge regression, closed form, over a grid of penalties; then optionally the affine
  output map that gives the predictions the training gold's s.d. (``match-sd``, see :func:`fit_head`);
* classification: L2-penalised multinomial logistic regression, ``steps`` full-batch L-BFGS
  iterations (``torch.optim.LBFGS``) per candidate, over a grid of penalties, plain and class-balanced.

Each candidate is judged on the held-out split carved from the train set
(:func:`training.glue.split_heldout`); GLUE dev is never looked at to choose.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from backbone import Backbone, mean_pool
from mask_store.format import HEAD_BIAS, HEAD_WEIGHT, MASK_RULE
from training.bundles import build_bundle, check_output, write_output
from training.glue import Example, GlueTask, calibration, compute_metrics
from training.loop import encode
from training.model import SCORE_INIT, SupermaskModel, apply_mask_rule

log = logging.getLogger(__name__)

RIDGE_PENALTIES = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)  # × mean eigenvalue of the feature covariance
LOGISTIC_PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1)  # L2 on the weights, per example (mean loss + λ/2 ‖W‖²)
REGRESSION_SCALES = ("mse", "match-sd")
DEFAULT_REFIT_STEPS = 200


@dataclass
class HeadFit:
    """The chosen head and what the choice was made on.

    ``weight``: float32 ``[num_outputs, hidden]``; ``bias``: float32 ``[num_outputs]``; ``choice``: the
    chosen candidate's settings; ``candidates``: every candidate with its held-out score (``"score"``,
    higher is better: minus MSE for regression, the task's main metric for classification).
    """

    weight: np.ndarray
    bias: np.ndarray
    choice: dict
    candidates: list[dict] = field(default_factory=list)


def model_from_bundle(bundle, backbone: Backbone) -> SupermaskModel:
    """A :class:`SupermaskModel` over ``backbone`` whose deterministic mask is the bundle's stored mask
    (scores set to ±5, ``τ = 0``) and whose head is the bundle's head. Modifies ``backbone`` in place.

    Raises:
        KeyError: the bundle lacks a mask for one of the backbone's masked matrices.
    """
    model = SupermaskModel(backbone, bundle.header.num_outputs)
    with torch.no_grad():
        for name, layer in model.masked_layers().items():
            mask = torch.from_numpy(bundle.mask_array(f"{name}.weight"))
            layer.scores.copy_(torch.where(mask, SCORE_INIT, -SCORE_INIT))
        model.head.classifier.weight.copy_(torch.from_numpy(np.array(bundle.head[HEAD_WEIGHT])))
        model.head.classifier.bias.copy_(torch.from_numpy(np.array(bundle.head[HEAD_BIAS])))
    return model


@torch.no_grad()
def pooled_features(model: SupermaskModel, tokenizer, examples: list[Example], max_len: int, batch_size: int = 64,
                    device: torch.device | str = "cpu", desc: str | None = None) -> np.ndarray:
    """Mean-pooled last hidden states of ``examples`` under the deterministic mask, float32 ``[n, hidden]``.

    Inputs are truncated to ``max_len`` tokens, as the server does. Examples are run sorted by length
    (less padding; mean pooling ignores padding) and returned in input order.
    """
    model.set_sampling(False)
    model.eval()
    try:
        lengths = [len(e.text_a) + len(e.text_b or "") for e in examples]
        order = np.argsort(lengths, kind="stable")
        out = np.empty((len(examples), model.head.classifier.in_features), dtype=np.float32)
        for i in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False,
                      dynamic_ncols=True):
            idx = order[i : i + batch_size]
            batch = {k: v.to(device) for k, v in encode(tokenizer, [examples[j] for j in idx], max_len).items()}
            kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            if "token_type_ids" in batch:
                kwargs["token_type_ids"] = batch["token_type_ids"]
            hidden = model.encoder(**kwargs).last_hidden_state
            out[idx] = mean_pool(hidden.float(), batch["attention_mask"]).cpu().numpy()
        return out
    finally:
        model.set_sampling(None)


def head_outputs(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``features @ weight.T + bias``: what the head gives for cached features (eval mode, no dropout)."""
    return features.astype(np.float64) @ np.asarray(weight, np.float64).T + np.asarray(bias, np.float64)


def predictions(task: GlueTask, outputs: np.ndarray) -> np.ndarray:
    """Regression values ``[n]`` or class indices ``[n]`` from head outputs ``[n, num_outputs]``."""
    return outputs[:, 0] if task.problem_type == "regression" else outputs.argmax(-1)


def evaluate_head(task: GlueTask, features: np.ndarray, golds: np.ndarray, weight: np.ndarray,
                  bias: np.ndarray) -> dict:
    """GLUE metrics of a head over cached features (plus, for regression, :func:`training.glue.calibration`)."""
    out = head_outputs(features, weight, bias)
    pred = predictions(task, out)
    metrics = compute_metrics(task, pred, golds)
    if task.problem_type == "regression":
        metrics["calibration"] = calibration(pred, golds)
    else:
        metrics["log_loss"] = _log_loss(out, golds)
    return metrics


def _log_loss(logits: np.ndarray, golds: np.ndarray) -> float:
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(golds)), golds.astype(int)].mean())


def _score(task: GlueTask, metrics: dict) -> float:
    """Held-out selection score, higher is better: −MSE for regression, the main metric otherwise."""
    return -metrics["mse"] if task.problem_type == "regression" else metrics[task.main_metric]


def fit_head(task: GlueTask, fit_x: np.ndarray, fit_y: np.ndarray, held_x: np.ndarray, held_y: np.ndarray,
             steps: int = DEFAULT_REFIT_STEPS, regression_scale: str = "match-sd",
             progress: bool = True) -> HeadFit:
    """Fit the task head on cached features and choose its regularisation on the held-out split.

    Args:
        fit_x, held_x: float32 ``[n, hidden]`` pooled features (:func:`pooled_features`) of the fitting
            and the held-out examples; fit_y, held_y: ``[n]`` gold scores or class indices.
        steps: L-BFGS iterations per classification candidate (regression is solved in closed form).
        regression_scale: "mse", the ridge solution as it is (least squares shrinks predictions towards
            the mean by the correlation it reaches); "match-sd", then the affine output map that gives
            the predictions on the fitting set the fitting gold's mean and s.d. (a similarity score
            served on the gold's scale: identical sentences near 5). Recorded; not selected on.
    Returns:
        A :class:`HeadFit`; ties in the held-out score go to the stronger penalty.
    Raises:
        ValueError: ``steps < 1``, an unknown ``regression_scale``, or an empty held-out split.
    """
    if steps < 1:
        raise ValueError(f"head refit steps must be >= 1, got {steps}")
    if regression_scale not in REGRESSION_SCALES:
        raise ValueError(f"regression_scale must be one of {', '.join(REGRESSION_SCALES)}, got {regression_scale!r}")
    if len(held_y) == 0:
        raise ValueError("the held-out split is empty: a head refit chooses its penalty on it")
    if task.problem_type == "regression":
        cands = _ridge_candidates(fit_x, fit_y, regression_scale)
    else:
        cands = _logistic_candidates(fit_x, fit_y, len(task.labels), steps, progress)
    best = None
    records = []
    for settings, w, b in cands:
        m = evaluate_head(task, held_x, held_y, w, b)
        rec = {**settings, "heldout": m, "score": _score(task, m)}
        records.append(rec)
        if best is None or rec["score"] > best[0]["score"] + 1e-12:
            best = (rec, w, b)
    rec, w, b = best
    choice = {k: v for k, v in rec.items() if k not in ("heldout", "score")}
    return HeadFit(np.asarray(w, np.float32), np.asarray(b, np.float32), {**choice, "heldout": rec["heldout"]},
                   records)


def _ridge_candidates(x: np.ndarray, y: np.ndarray, scale: str):
    """Ridge solutions ``w = (XᵀX + α·n·mean(λ)·I)⁻¹ Xᵀy`` over centred features (unpenalised bias),
    from one eigendecomposition, strongest penalty first."""
    x = x.astype(np.float64)
    y = np.asarray(y, np.float64)
    xm, ym = x.mean(0), y.mean()
    xc, yc = x - xm, y - ym
    evals, evecs = np.linalg.eigh(xc.T @ xc / len(x))
    proj = evecs.T @ (xc.T @ yc / len(x))
    for alpha in sorted(RIDGE_PENALTIES, reverse=True):
        lam = alpha * float(evals.mean())
        w = evecs @ (proj / (evals + lam))
        b = ym - xm @ w
        settings = {"model": "ridge", "penalty": alpha, "penalty_abs": lam, "scale": scale}
        if scale == "match-sd":
            pred = x @ w + b
            a = y.std() / max(pred.std(), 1e-12)
            w, b = a * w, ym + a * (b - pred.mean())
            settings["output_scale"] = float(a)
        yield settings, w[None, :], np.array([b])


def _logistic_candidates(x: np.ndarray, y: np.ndarray, classes: int, steps: int, progress: bool):
    """L2-penalised multinomial logistic regressions (full-batch L-BFGS, strong-Wolfe line search) over
    the penalty grid, each plain and class-balanced (every class weighted ``n / (classes · n_c)``)."""
    xt = torch.from_numpy(x.astype(np.float32))
    yt = torch.from_numpy(np.asarray(y, np.int64))
    counts = torch.bincount(yt, minlength=classes).clamp(min=1).float()
    grid = [(lam, bal) for lam in sorted(LOGISTIC_PENALTIES, reverse=True) for bal in (False, True)]
    for lam, balanced in tqdm(grid, desc="head refit (logistic)", disable=not progress, leave=False):
        weights = (len(yt) / (classes * counts)) if balanced else None
        lin = torch.nn.Linear(x.shape[1], classes)
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
        opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=steps, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

        def objective() -> torch.Tensor:
            return torch.nn.functional.cross_entropy(lin(xt), yt, weight=weights) \
                + 0.5 * lam * lin.weight.pow(2).sum()

        def closure():
            opt.zero_grad()
            loss = objective()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            final = float(objective())
        if not math.isfinite(final):
            log.warning("logistic head refit with penalty %g diverged; skipped", lam)
            continue
        yield ({"model": "logistic", "penalty": lam, "balanced": balanced, "steps": steps, "fit_loss": final},
               lin.weight.detach().numpy().copy(), lin.bias.detach().numpy().copy())


def refit_head(model: SupermaskModel, tokenizer, task: GlueTask, fit_set: list[Example], heldout: list[Example],
               max_len: int, steps: int = DEFAULT_REFIT_STEPS, regression_scale: str = "match-sd",
               batch_size: int = 64, device: torch.device | str = "cpu", progress: bool = True,
               extra: dict[str, list[Example]] | None = None) -> tuple[HeadFit, dict]:
    """Refit ``model``'s head on its frozen deterministic mask (in place) and say what it did.

    Caches the pooled features of ``fit_set``, ``heldout`` and each ``extra`` split (e.g. ``{"dev": ...}``,
    evaluated, never chosen on), fits the head (:func:`fit_head`) and copies it into ``model.head``.

    Returns:
        ``(fit, record)``; ``record`` = ``{"method", "steps", "regression_scale", "choice", "candidates",
        "before": {split: metrics}, "after": {split: metrics}}`` with the old and the new head's metrics on
        the held-out split and every extra split, for the bundle's ``training``/``metrics`` dicts.
    Raises:
        ValueError: as :func:`fit_head`.
    """
    splits = {"fit": fit_set, "heldout": heldout, **(extra or {})}
    feats, golds = {}, {}
    for name, examples in splits.items():
        feats[name] = pooled_features(model, tokenizer, examples, max_len, batch_size, device,
                                      desc=f"features {task.name} {name} (served mask)" if progress else None)
        golds[name] = np.array([e.label for e in examples])
    old_w = model.head.classifier.weight.detach().cpu().numpy().copy()
    old_b = model.head.classifier.bias.detach().cpu().numpy().copy()
    fit = fit_head(task, feats["fit"], golds["fit"], feats["heldout"], golds["heldout"], steps, regression_scale,
                   progress)
    with torch.no_grad():
        model.head.classifier.weight.copy_(torch.from_numpy(fit.weight))
        model.head.classifier.bias.copy_(torch.from_numpy(fit.bias))
    evaluated = [s for s in splits if s != "fit"]
    record = {
        "method": "head refit on the frozen deterministic mask (extension of Radiya-Dixit & Wang 2020): "
                  + ("closed-form ridge" if task.problem_type == "regression" else "L2 logistic regression, L-BFGS")
                  + " on cached mean-pooled features; penalty chosen on the held-out split",
        "steps": steps,
        "regression_scale": regression_scale if task.problem_type == "regression" else None,
        "fit_examples": len(fit_set),
        "choice": {k: v for k, v in fit.choice.items() if k != "heldout"},
        "candidates": [{k: v for k, v in c.items() if k != "heldout"} for c in fit.candidates],
        "before": {s: evaluate_head(task, feats[s], golds[s], old_w, old_b) for s in evaluated},
        "after": {s: evaluate_head(task, feats[s], golds[s], fit.weight, fit.bias) for s in evaluated},
    }
    return fit, record


def split_metrics(m: dict) -> tuple[dict, dict]:
    """GLUE metrics and the extras (calibration, log loss) of :func:`evaluate_head`'s result."""
    return ({k: v for k, v in m.items() if k not in ("calibration", "log_loss")},
            {k: v for k, v in m.items() if k in ("calibration", "log_loss")})


def refit_bundle(bundle_path: str, output: str, data_dir: str, *, steps: int = DEFAULT_REFIT_STEPS,
                 regression_scale: str = "match-sd", heldout_fraction: float | None = None,
                 heldout_seed: int | None = None, train_limit: int | None = None, backbone: str | None = None,
                 glue_task: str | None = None, batch_size: int = 64, progress: bool = True,
                 command: str = "", scores_file: str | None = None, mask_rule: str | None = None) -> dict:
    """Refit the head of an existing bundle on its own stored (served) mask and write the result to ``output``.

    With ``scores_file`` (the bundle's ``.scores.safetensors``, float16 ``ν`` per masked matrix) and
    ``mask_rule`` (:func:`training.model.apply_mask_rule`), the served mask is first rebuilt from the
    trained scores with that rule, and the head is refitted on it: the bundle a run with that mask rule would
    have written (the rule is applied only after training; the scores were rounded to float16 when saved;
    the ``"sampled"`` rule draws with the seed of the run the bundle's config records, else 0).

    Otherwise the masks, the task's name, labels and max length are kept bit for bit; the head is replaced by the one
    :func:`refit_head` chooses on the held-out split of the task's train set (the split the bundle records,
    else ``heldout_fraction``/``heldout_seed``, else :data:`training.glue.HELDOUT_FRACTION` / ``HELDOUT_SEED``).
    The header's ``training["head_refit"]`` records the refit (choice, candidates, command) and
    ``training["heldout_split"]`` the split; ``metrics["deterministic"]`` becomes the new head's dev figure,
    ``metrics["heldout"]`` its held-out figure and ``metrics["before_head_refit"]`` keeps the old ones.
    The Bernoulli figures (if any) are left as recorded: they measure the trained head under sampled masks.

    Bundles trained before held-out splits existed saw the held-out rows in training, so the old head's
    held-out figure is flattered against the new one's (fitted without them): a refit that wins on it wins
    despite that.

    Returns:
        A summary: ``{"bundle", "output", "task", "heldout_split", "choice", "before", "after", "seconds",
        "sparsity"}`` (the served mask's fraction of zeros)
        (``before``/``after``: ``{"heldout", "dev"}`` metrics).
    Raises:
        BundleInvalid, GlueDataError, BackboneLoadError, ValueError (settings, a bundle for another
        task's labels, an output that is a folder), OSError.
    """
    import time
    from pathlib import Path

    from mask_store.format import decode_bundle
    from backbone import load_backbone
    from training.glue import HELDOUT_FRACTION, HELDOUT_SEED, get_task, read_split, split_heldout

    t0 = time.perf_counter()
    bundle = decode_bundle(Path(bundle_path).read_bytes())
    header = bundle.header
    task = get_task(glue_task or header.training.get("config", {}).get("task") or header.task)
    if list(task.labels) != list(header.labels):
        raise ValueError(f"GLUE task {task.name} has labels {list(task.labels)}, the bundle {header.labels}: "
                         "not a bundle for this task (--glue-task)")
    check_output(output)
    recorded = header.training.get("heldout_split") or {}
    fraction = heldout_fraction if heldout_fraction is not None else recorded.get("fraction", HELDOUT_FRACTION)
    seed = heldout_seed if heldout_seed is not None else recorded.get("seed", HELDOUT_SEED)
    fit_set, heldout, split = split_heldout(read_split(task, data_dir, "train"), fraction, seed)
    fit_set = fit_set[:train_limit]
    dev = read_split(task, data_dir, "dev")
    bb = load_backbone(backbone, bits=8)  # the served backbone: int8 (the fingerprint the bundle names)
    if bb.fingerprint != header.backbone_fingerprint:
        from mask_store.errors import BackboneMismatch

        raise BackboneMismatch(f"bundle {bundle_path} was trained for backbone {header.backbone_fingerprint[:12]}, "
                               f"this backbone is {bb.fingerprint[:12]}")
    model = model_from_bundle(bundle, bb)
    rule_text = header.mask_rule
    if scores_file is not None:
        from safetensors.torch import load_file

        if mask_rule is None:
            raise ValueError("a scores file rebuilds the mask: give its mask_rule (one of training.MASK_RULES)")
        tensors = load_file(str(scores_file))
        with torch.no_grad():
            for name, layer in model.masked_layers().items():
                layer.scores.copy_(tensors[f"{name}.scores"].to(torch.float32))
        rule_text = apply_mask_rule(model, mask_rule, seed=(header.training.get("config") or {}).get("seed", 0)) \
            or MASK_RULE
    fit, record = refit_head(model, bb.tokenizer, task, fit_set, heldout, header.max_seq_length, steps,
                             regression_scale, batch_size, progress=progress, extra={"dev": dev})
    record["command"] = command
    record["heldout_split"] = split
    training = {**header.training, "heldout_split": recorded or split, "head_refit": {
        k: v for k, v in record.items() if k not in ("before", "after")}}
    dev_after, dev_extra = split_metrics(record["after"]["dev"])
    dev_before, _ = split_metrics(record["before"]["dev"])
    metrics = {**header.metrics, "split": "dev", "dev_examples": len(dev), "deterministic": dev_after,
               "heldout": record["after"]["heldout"],
               "before_head_refit": {"deterministic": dev_before, "heldout": record["before"]["heldout"]}}
    if "calibration" in dev_extra:
        metrics["calibration"] = dev_extra["calibration"]
    if header.metrics.get("bernoulli"):
        metrics["bernoulli_head"] = "the trained head (before the refit), under sampled masks"
    if scores_file is not None:
        training["mask_rule_applied"] = {"rule": mask_rule, "scores": Path(scores_file).name,
                                         "from_bundle": Path(bundle_path).name}
        if "config" in training:  # the config of the run this bundle now stands for
            training["config"] = {**training["config"], "mask_rule": mask_rule}
    data = build_bundle(model, bb, task, header.task, header.max_seq_length, training, metrics, rule_text)
    write_output(output, data)
    return {"bundle": bundle_path, "output": output, "task": header.task, "heldout_split": split,
            "choice": record["choice"], "before": record["before"], "after": record["after"],
            "bytes": len(data), "seconds": round(time.perf_counter() - t0, 1), "sparsity": model.sparsity()}
