"""A user's own labeled data as a training task: CSV, TSV, JSON Lines, Parquet or a ``datasets`` folder.

Files are read with Hugging Face ``datasets`` (``load_dataset("csv" | "json" | "parquet", data_files=...)``,
TSV as CSV with ``delimiter="\\t"``; ``load_from_disk`` for a folder written by ``Dataset.save_to_disk``),
always from local paths: ``HF_DATASETS_OFFLINE=1`` is set before ``datasets`` is imported, and each read
goes through a temporary cache folder, so nothing is fetched and nothing is left in ``~/.cache``.

What the data says decides the task (:func:`infer_task`):

* the text column(s): ``--text-column`` (default the first present of :data:`TEXT_COLUMNS`) and, for
  sentence pairs, ``--text-pair-column`` (default the partner :data:`PAIR_COLUMNS` names, e.g. ``sentence2``
  beside ``sentence1``, when present);
* the problem type: regression when the label column holds floats (or ``problem_type="regression"``),
  else single-label classification over the labels seen in the training file;
* the label names and their order (the logit order in the bundle): ``--labels a,b,c`` when given;
  else a ``ClassLabel`` feature's names; else integer labels in ascending order, named by their decimal
  text (``"0"``, ``"1"``, ...); else string labels sorted by Python's ``sorted`` (code-point order,
  as Hugging Face's ``run_glue.py`` does).

Every check happens before training starts and raises :class:`DataError` with one line naming the file,
the column and the offending value.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from training.glue import Example, GlueDataError

TEXT_COLUMNS = ("text", "sentence", "sentence1", "question1", "premise")  # first present is the text column
PAIR_COLUMNS = {"sentence1": "sentence2", "question1": "question2", "premise": "hypothesis"}
LABEL_COLUMNS = ("label", "labels", "score")
PROBLEM_TYPES = ("auto", "classification", "regression")
FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLITS = ("train", "validation", "test")
# a training file whose largest class has this many times the rows of the smallest one is reported as imbalanced
IMBALANCE_RATIO = 3.0


class DataError(GlueDataError):
    """A data file or folder is missing, empty, or does not fit the task (one-line message)."""


@dataclass(frozen=True)
class DataTask:
    """A task read from the user's data; the same interface as :class:`training.glue.GlueTask` where the
    trainer uses it (``name``, ``labels``, ``problem_type``, ``is_pair``, ``main_metric``).

    ``labels``: class names in logit order (empty for regression). ``label_index``: raw label text ->
    index (empty for regression). ``main_metric``: what the held-out split is judged on: ``"macro_f1"``
    (classification; robust to class imbalance) or ``"pearson"`` (regression).
    """

    name: str
    labels: tuple[str, ...]
    is_pair: bool
    text_column: str
    text_pair_column: str | None
    label_column: str
    regression: bool = False
    label_index: dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def problem_type(self) -> str:
        return "regression" if self.regression else "single_label_classification"

    @property
    def main_metric(self) -> str:
        return "pearson" if self.regression else "macro_f1"

    def describe(self) -> dict:
        """What a bundle records about the data's columns and labels (``training["data"]``)."""
        return {"text_column": self.text_column, "text_pair_column": self.text_pair_column,
                "label_column": self.label_column, "problem_type": self.problem_type, "labels": list(self.labels)}


@dataclass
class TaskData:
    """A task and its splits: ``train`` (fitting rows), ``validation`` (None: carve a held-out split from
    train), ``test`` (None: report on the held-out split). ``sources``: split -> file read."""

    task: DataTask
    train: list[Example]
    validation: list[Example] | None
    test: list[Example] | None
    sources: dict[str, str]
    class_counts: dict[str, int] = field(default_factory=dict)


def _format_of(path: Path) -> tuple[str, dict]:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: unknown file type {suffix or '(none)'!r}; use one of {', '.join(FORMATS)}")
    return FORMATS[suffix], ({"delimiter": "\t"} if suffix == ".tsv" else {})


def read_table(path: str | os.PathLike):
    """One local file as a ``datasets.Dataset`` (kept in memory).

    Raises:
        DataError: missing, empty, unknown suffix, or unreadable by ``datasets`` (its message, first line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    builder, kwargs = _format_of(path)
    ds_mod = _datasets()
    with tempfile.TemporaryDirectory(prefix="supermask-data-") as cache:
        try:
            dd = ds_mod.load_dataset(builder, data_files={"train": str(path)}, cache_dir=cache,
                                     keep_in_memory=True, **kwargs)
        except ValueError as exc:
            if "corresponds to no data" in str(exc):
                raise DataError(f"{path}: the file holds no rows") from None
            raise DataError(f"{path}: cannot read it as {builder}: {_first_line(exc)}") from None
        except Exception as exc:  # datasets wraps the reader's error (pandas, pyarrow) in DatasetGenerationError
            cause = exc.__cause__ or exc.__context__ or exc
            raise DataError(f"{path}: cannot read it as {builder}: {_first_line(cause)}") from None
    ds = dd["train"]
    if len(ds) == 0:
        raise DataError(f"{path}: the file holds no rows")
    return ds


def read_folder(path: str | os.PathLike) -> dict:
    """A ``datasets.load_from_disk`` folder as ``{split: Dataset}`` (a bare ``Dataset`` is ``{"train": ...}``;
    a ``dev`` split counts as ``validation``).

    Raises:
        DataError: not a saved dataset folder, or it has no ``train`` split.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a folder (--dataset takes a folder written by Dataset.save_to_disk)")
    ds_mod = _datasets()
    try:
        loaded = ds_mod.load_from_disk(str(path), keep_in_memory=True)
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: not a saved dataset folder: {_first_line(exc)}") from None
    if isinstance(loaded, ds_mod.Dataset):
        return {"train": loaded}
    splits = dict(loaded)
    if "dev" in splits and "validation" not in splits:
        splits["validation"] = splits.pop("dev")
    if "train" not in splits:
        raise DataError(f"{path}: no 'train' split (it has {', '.join(sorted(splits)) or 'none'})")
    return splits


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never reach a hub
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _pick(columns: Iterable[str], wanted: str | None, defaults: tuple[str, ...], what: str, source: str,
          option: str) -> str:
    columns = list(columns)
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{source}: no {what} column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    raise DataError(f"{source}: no {what} column (looked for {', '.join(defaults)}; columns: {', '.join(columns)}); "
                    f"name it with {option}")


def _dtype(feature) -> str:
    return getattr(feature, "dtype", type(feature).__name__)


def _is_text(feature) -> bool:
    return _dtype(feature) in ("string", "large_string")


def _is_float(feature) -> bool:
    return _dtype(feature) in ("float16", "float32", "float64", "double", "float")


def _is_int(feature) -> bool:
    return _dtype(feature) in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool")


def infer_task(name: str, ds, source: str, *, text_column: str | None = None, text_pair_column: str | None = None,
               label_column: str | None = None, labels: list[str] | None = None,
               problem_type: str = "auto") -> DataTask:
    """The task the training split describes (see the module docstring for the rules).

    Args:
        name: the task's name in the bundle; ds: the training ``datasets.Dataset``; source: its file, for messages.
        labels: the label names in logit order (``--labels``), or None to take them from the data.
        problem_type: "auto" (float label column -> regression), "classification" or "regression".
    Raises:
        DataError: a column is missing, a text column is not text, a regression label is not numeric,
            ``labels`` misses a label of the data or repeats one, or fewer than two classes.
    """
    if problem_type not in PROBLEM_TYPES:
        raise DataError(f"problem type must be one of {', '.join(PROBLEM_TYPES)}, got {problem_type!r}")
    cols = ds.column_names
    text = _pick(cols, text_column, TEXT_COLUMNS, "text", source, "--text-column")
    pair = text_pair_column
    if pair is None and text_column is None and text in PAIR_COLUMNS and PAIR_COLUMNS[text] in cols:
        pair = PAIR_COLUMNS[text]
    if pair is not None:
        _pick(cols, pair, (), "text pair", source, "--text-pair-column")
    label = _pick(cols, label_column, LABEL_COLUMNS, "label", source, "--label-column")
    for col in (text, pair):
        if col is not None and not _is_text(ds.features[col]):
            raise DataError(f"{source}: column {col!r} holds {_dtype(ds.features[col])}, not text")
    feature = ds.features[label]
    class_names = getattr(feature, "names", None)  # datasets.ClassLabel
    regression = problem_type == "regression" or (problem_type == "auto" and _is_float(feature))
    if regression:
        if labels:
            raise DataError("--labels names classes: not for a regression task")
        if class_names is not None or not (_is_float(feature) or _is_int(feature)):
            raise DataError(f"{source}: a regression label column must hold numbers; {label!r} holds {_dtype(feature)}")
        return DataTask(name, (), pair is not None, text, pair, label, regression=True)
    if _is_float(feature):
        raise DataError(f"{source}: label column {label!r} holds floats: a classification task needs integer or "
                        "text labels (or use --problem-type regression)")
    if class_names is not None:
        seen = list(class_names)
    else:
        raw = [_label_text(v, label, source, i) for i, v in enumerate(ds[label])]
        values = set(raw)
        numeric = _is_int(feature) and _dtype(feature) != "bool"
        seen = sorted(values, key=int) if numeric else sorted(values)
    if labels:
        if len(set(labels)) != len(labels):
            raise DataError(f"--labels repeats a name: {','.join(labels)}")
        missing = [v for v in seen if v not in labels]
        if missing:
            raise DataError(f"{source}: label(s) {', '.join(map(repr, missing))} in the data are not in --labels "
                            f"({','.join(labels)})")
        seen = list(labels)
    if len(seen) < 2:
        raise DataError(f"{source}: label column {label!r} holds only {seen!r}: a classifier needs at least two classes")
    return DataTask(name, tuple(seen), pair is not None, text, pair, label,
                    label_index={v: k for k, v in enumerate(seen)})


def _label_text(value, column: str, source: str, row: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise DataError(f"{source}: row {row + 1}: label column {column!r} is empty")
    return str(value).strip() if isinstance(value, str) else str(value)


def to_examples(task: DataTask, ds, source: str, split: str) -> list[Example]:
    """Rows of ``ds`` as :class:`training.glue.Example` (label: class index, or float score).

    A ``ClassLabel`` column's integers are mapped through its names. Raises :class:`DataError` for a
    missing column, a text cell that is empty or not text, a label not in ``task.labels`` (``"label 'x'
    seen only in <split>"``), or a regression score that is not a finite number.
    """
    for col in (task.text_column, task.text_pair_column, task.label_column):
        if col is not None and col not in ds.column_names:
            raise DataError(f"{source}: no column {col!r} (columns: {', '.join(ds.column_names)})")
    for col in (task.text_column, task.text_pair_column):
        if col is not None and not _is_text(ds.features[col]):
            raise DataError(f"{source}: column {col!r} holds {_dtype(ds.features[col])}, not text")
    if len(ds) == 0:
        raise DataError(f"{source}: the {split} split holds no rows")
    names = getattr(ds.features[task.label_column], "names", None)
    texts = ds[task.text_column]
    pairs = ds[task.text_pair_column] if task.text_pair_column else [None] * len(ds)
    out = []
    for i, (a, b, y) in enumerate(zip(texts, pairs, ds[task.label_column])):
        for col, v in ((task.text_column, a), (task.text_pair_column, b)):
            if col is not None and (not isinstance(v, str) or not v.strip()):
                raise DataError(f"{source}: row {i + 1}: column {col!r} is empty")
        if task.regression:
            try:
                score = float(y)
            except (TypeError, ValueError):
                raise DataError(f"{source}: row {i + 1}: score {y!r} is not a number") from None
            if not math.isfinite(score):
                raise DataError(f"{source}: row {i + 1}: score {y!r} is not a finite number")
            out.append(Example(a, b, score))
            continue
        raw = names[y] if names is not None and isinstance(y, int) else _label_text(y, task.label_column, source, i)
        if raw not in task.label_index:
            raise DataError(f"{source}: row {i + 1}: label {raw!r} seen only in {split}, not among the training "
                            f"labels ({', '.join(task.labels)})")
        out.append(Example(a, b, task.label_index[raw]))
    return out


def load_task_data(name: str, *, train_file: str | None = None, validation_file: str | None = None,
                   test_file: str | None = None, dataset_dir: str | None = None, text_column: str | None = None,
                   text_pair_column: str | None = None, label_column: str | None = None,
                   labels: list[str] | None = None, problem_type: str = "auto") -> TaskData:
    """Read a task's splits from files (``train_file`` ...) or a ``load_from_disk`` folder (``dataset_dir``).

    Returns:
        :class:`TaskData`; ``class_counts``: training rows per class name (classification).
    Raises:
        DataError: as :func:`read_table`, :func:`infer_task` and :func:`to_examples`; or neither / both of
            ``train_file`` and ``dataset_dir``.
    """
    if (train_file is None) == (dataset_dir is None):
        raise DataError("give either a training file (--train-file) or a dataset folder (--dataset), not both")
    if dataset_dir is not None:
        if validation_file or test_file:
            raise DataError("--dataset reads its own splits: no --validation-file / --test-file with it")
        folder = read_folder(dataset_dir)
        tables = {s: folder[s] for s in SPLITS if s in folder}
        sources = {s: f"{dataset_dir}[{s}]" for s in tables}
    else:
        files = {"train": train_file, "validation": validation_file, "test": test_file}
        tables = {s: read_table(f) for s, f in files.items() if f is not None}
        sources = {s: str(f) for s, f in files.items() if f is not None}
    task = infer_task(name, tables["train"], sources["train"], text_column=text_column,
                      text_pair_column=text_pair_column, label_column=label_column, labels=labels,
                      problem_type=problem_type)
    splits = {s: to_examples(task, t, sources[s], s) for s, t in tables.items()}
    counts: dict[str, int] = {}
    if not task.regression:
        c = Counter(e.label for e in splits["train"])
        counts = {task.labels[k]: c.get(k, 0) for k in range(len(task.labels))}
    return TaskData(task, splits["train"], splits.get("validation"), splits.get("test"), sources, counts)


def imbalance(counts: dict[str, int]) -> dict | None:
    """``{"counts", "ratio", "imbalanced"}`` of training rows per class (``ratio`` = largest / smallest
    class, inf when a class has no rows; ``imbalanced`` when ``ratio >= IMBALANCE_RATIO``), None for regression."""
    if not counts:
        return None
    lo, hi = min(counts.values()), max(counts.values())
    ratio = math.inf if lo == 0 else hi / lo
    return {"counts": counts, "ratio": ratio if math.isfinite(ratio) else None, "imbalanced": ratio >= IMBALANCE_RATIO}
