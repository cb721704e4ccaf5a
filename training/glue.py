"""GLUE readers (original TSV layout) and the GLUE metrics (Wang et al. 2019).

Each task folder holds ``train.tsv`` and ``dev.tsv`` as distributed by GLUE.
Metrics per task follow the GLUE paper: accuracy (SST-2, RTE, WNLI), F1 and
accuracy (MRPC), Matthews correlation (CoLA), Pearson and Spearman
correlation (STS-B, regression on a 0-5 similarity score).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class GlueDataError(ValueError):
    """A GLUE file is missing or does not have the expected layout."""


@dataclass(frozen=True)
class GlueTask:
    """How to read one GLUE task.

    ``text_cols``: column indices of sentence(s); ``label_col``: column of the
    label (negative counts from the end); ``labels``: label names in logit
    order (empty for regression); ``label_map``: raw value -> label index.
    """

    name: str
    text_cols: tuple[int, ...]
    label_col: int
    header: bool
    labels: tuple[str, ...]
    label_map: dict[str, int] | None
    main_metric: str

    @property
    def problem_type(self) -> str:
        return "regression" if not self.labels else "single_label_classification"

    @property
    def is_pair(self) -> bool:
        return len(self.text_cols) == 2


TASKS: dict[str, GlueTask] = {
    "CoLA": GlueTask("CoLA", (3,), 1, False, ("unacceptable", "acceptable"), {"0": 0, "1": 1}, "mcc"),
    "SST-2": GlueTask("SST-2", (0,), -1, True, ("negative", "positive"), {"0": 0, "1": 1}, "accuracy"),
    "MRPC": GlueTask("MRPC", (3, 4), 0, True, ("not_equivalent", "equivalent"), {"0": 0, "1": 1}, "f1"),
    "RTE": GlueTask("RTE", (1, 2), -1, True, ("entailment", "not_entailment"),
                    {"entailment": 0, "not_entailment": 1}, "accuracy"),
    "STS-B": GlueTask("STS-B", (7, 8), -1, True, (), None, "pearson"),
    "WNLI": GlueTask("WNLI", (1, 2), -1, True, ("not_entailment", "entailment"), {"0": 0, "1": 1}, "accuracy"),
}


@dataclass(frozen=True)
class Example:
    """One GLUE example: ``text_b`` is None for single-sentence tasks; ``label``
    is a class index (int) or a similarity score (float, STS-B)."""

    text_a: str
    text_b: str | None
    label: int | float


def get_task(name: str) -> GlueTask:
    """Look a task up by its GLUE name (case-insensitive). Raises GlueDataError."""
    for key, task in TASKS.items():
        if key.lower() == name.lower():
            return task
    raise GlueDataError(f"unknown GLUE task {name!r}; known: {', '.join(TASKS)}")


def read_split(task: GlueTask, data_dir: str | Path, split: str) -> list[Example]:
    """Read ``<data_dir>/<task>/<split>.tsv``.

    Raises:
        GlueDataError: the file is missing, or a row has too few columns or an unknown label.
    """
    path = Path(data_dir) / task.name / f"{split}.tsv"
    if not path.is_file():
        raise GlueDataError(f"{path} not found (expected the original GLUE TSV layout under --data-dir)")
    examples = []
    with open(path, encoding="utf-8-sig", newline="") as fh:  # MRPC ships with a BOM
        # split on "\n" only: str.splitlines() would also split on U+2028 and other separators inside a field
        lines = [ln.rstrip("\r") for ln in fh.read().split("\n")]
    need = max(task.text_cols) + 1
    if task.label_col >= 0:
        need = max(need, task.label_col + 1)
    if task.header:
        need = max(need, len(lines[0].split("\t")))  # every row has as many columns as the header
        lines = lines[1:]
    for lineno, line in enumerate(lines, start=2 if task.header else 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < need:
            raise GlueDataError(f"{path}:{lineno}: {len(cols)} columns, expected at least {need}")
        raw = cols[task.label_col].strip()
        if task.label_map is None:
            try:
                label: int | float = float(raw)
            except ValueError:
                raise GlueDataError(f"{path}:{lineno}: score {raw!r} is not a number") from None
        else:
            if raw not in task.label_map:
                raise GlueDataError(f"{path}:{lineno}: unknown label {raw!r} (known: {sorted(task.label_map)})")
            label = task.label_map[raw]
        text_b = cols[task.text_cols[1]] if task.is_pair else None
        examples.append(Example(cols[task.text_cols[0]], text_b, label))
    if not examples:
        raise GlueDataError(f"{path} holds no examples")
    return examples


def _f1(pred: np.ndarray, gold: np.ndarray) -> float:
    tp = float(np.sum((pred == 1) & (gold == 1)))
    fp = float(np.sum((pred == 1) & (gold == 0)))
    fn = float(np.sum((pred == 0) & (gold == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def _mcc(pred: np.ndarray, gold: np.ndarray) -> float:
    tp = float(np.sum((pred == 1) & (gold == 1)))
    tn = float(np.sum((pred == 0) & (gold == 0)))
    fp = float(np.sum((pred == 1) & (gold == 0)))
    fn = float(np.sum((pred == 0) & (gold == 1)))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):  # average ranks over ties
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return 0.0 if denom == 0 else float((a * b).sum() / denom)


def compute_metrics(task: GlueTask, predictions: np.ndarray, golds: np.ndarray) -> dict[str, float]:
    """GLUE dev metrics.

    Args:
        predictions: class indices ``[n]`` (int) or regression values ``[n]`` (float).
        golds: same shape.
    Returns:
        ``{"accuracy"}``; MRPC adds ``"f1"``; CoLA gives ``{"mcc", "accuracy"}``;
        STS-B gives ``{"pearson", "spearman", "mse"}``. Values in [-1, 1], except ``mse`` (mean squared
        error, in squared score units, >= 0).
    """
    predictions = np.asarray(predictions)
    golds = np.asarray(golds)
    if not isinstance(task, GlueTask):  # a task from the user's own data (training.data.DataTask)
        return problem_metrics(task.problem_type, len(task.labels), predictions, golds)
    if task.problem_type == "regression":
        p, g = predictions.astype(np.float64), golds.astype(np.float64)
        return {"pearson": _pearson(p, g), "spearman": _pearson(_rank(p), _rank(g)),
                "mse": float(np.mean((p - g) ** 2))}
    out = {"accuracy": float(np.mean(predictions == golds))}
    if task.name == "MRPC":
        out["f1"] = _f1(predictions, golds)
    if task.name == "CoLA":
        out["mcc"] = _mcc(predictions, golds)
    return out


def problem_metrics(problem_type: str, num_classes: int, predictions: np.ndarray,
                    golds: np.ndarray) -> dict[str, float]:
    """Metrics chosen by problem type, for tasks from a user's own data.

    Classification (``num_classes`` >= 2, class indices ``[n]``): ``{"accuracy", "macro_f1"}`` (the unweighted
    mean over classes of each class's one-vs-rest F1; a class never predicted nor present counts 0, as
    scikit-learn's ``f1_score(average="macro", zero_division=0)`` over the task's labels), and with two classes
    ``"mcc"`` (Matthews correlation). Regression (values ``[n]``): ``{"pearson", "spearman", "mse"}`` as for STS-B.
    """
    predictions = np.asarray(predictions)
    golds = np.asarray(golds)
    if problem_type == "regression":
        p, g = predictions.astype(np.float64), golds.astype(np.float64)
        return {"pearson": _pearson(p, g), "spearman": _pearson(_rank(p), _rank(g)),
                "mse": float(np.mean((p - g) ** 2))}
    f1s = [_f1((predictions == k).astype(int), (golds == k).astype(int)) for k in range(num_classes)]
    out = {"accuracy": float(np.mean(predictions == golds)), "macro_f1": float(np.mean(f1s))}
    if num_classes == 2:
        out["mcc"] = _mcc(predictions, golds)
    return out


# The held-out validation split carved from each task's train set: what model selection (head-refit
# regularisation, mask rule, steps) is judged on, so that GLUE dev is never used to choose.
HELDOUT_FRACTION = 0.1
HELDOUT_SEED = 1234


def split_heldout(examples: list[Example], fraction: float = HELDOUT_FRACTION,
                  seed: int = HELDOUT_SEED) -> tuple[list[Example], list[Example], dict]:
    """Carve a held-out validation split from a task's training examples.

    The split is ``numpy.random.default_rng(seed).permutation(n)``: its first ``round(fraction · n)`` rows
    (at least one when ``fraction > 0``) are held out, the rest are kept for fitting, each in file order.
    It depends only on ``n``, ``fraction`` and ``seed``, never on a run's own seed, so every run of a task
    holds out the same rows.

    Args:
        examples: the whole ``train.tsv``, in file order.
        fraction: in [0, 1); 0 holds nothing out.
        seed: the split's own seed.
    Returns:
        ``(fit, heldout, record)``; ``record`` = ``{"fraction", "seed", "examples", "fit_examples", "rule"}``,
        what a bundle records so the split can be rebuilt.
    Raises:
        ValueError: ``fraction`` outside [0, 1), or nothing left to fit on.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    n = len(examples)
    k = 0 if fraction == 0 else max(1, int(round(fraction * n)))
    if n - k < 1:
        raise ValueError(f"holding out {k} of {n} training examples leaves nothing to train on")
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(seed).permutation(n)[:k]] = True
    fit = [e for e, h in zip(examples, held) if not h]
    heldout = [e for e, h in zip(examples, held) if h]
    record = {"fraction": fraction, "seed": seed, "examples": k, "fit_examples": n - k,
              "rule": "numpy.random.default_rng(seed).permutation(n)[:round(fraction * n)] of train.tsv's rows"}
    return fit, heldout, record


def calibration(predictions: np.ndarray, golds: np.ndarray) -> dict[str, float]:
    """Location and spread of regression predictions against gold: ``{"mean", "sd", "gold_mean", "gold_sd",
    "min", "max"}`` (population s.d., ``np.std``), in score units. Pearson and Spearman are blind to a shift
    or a shrinkage of the scores; these are not."""
    p, g = np.asarray(predictions, dtype=np.float64), np.asarray(golds, dtype=np.float64)
    return {"mean": float(p.mean()), "sd": float(p.std()), "gold_mean": float(g.mean()), "gold_sd": float(g.std()),
            "min": float(p.min()), "max": float(p.max())}
