"""``supermask evaluate``: GLUE dev metrics of a bundle through the serving engine.

The deterministic-mask figure is computed by :class:`service.engine.Engine`,
the same code that answers ``POST /v1/tasks/{task}/predict``, so it must
reproduce the figure recorded in the bundle at training time. When the mask
scores ``ν`` saved by ``supermask train`` are available, the mean ± s.d. over
Bernoulli samples ``μ ~ Bern(σ(ν))`` is reported too (the paper's protocol).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mask_store.format import HEAD_BIAS, HEAD_WEIGHT, decode_bundle
from mask_store.local import LocalMaskStore
from backbone import Backbone, load_backbone
from service.engine import Engine
from service.metrics import Metrics
from training import BERNOULLI_PER, check_choice
from training.controls import restore_float_weights
from training.glue import calibration, compute_metrics, get_task, read_split
from training.trainer import evaluate_bernoulli, scores_path
from training.model import SupermaskModel

FORMS = ("hot", "sparse")
"""How ``evaluate_bundle`` serves a bf16 / int8 task: its materialised weights, or its sparse form."""
NEVER_PROMOTE = 1 << 30
"""``hot_promote_after`` that keeps a task on its sparse form for a whole evaluation."""


def recorded_config(training: dict, need_task: bool) -> tuple[str | None, int]:
    """The GLUE task and weight width a bundle's header records (``training["config"]``, as ``supermask
    train`` writes it): ``(task or None, bits)``, bits 8 when not recorded. A bundle the server accepted may
    carry any JSON there; what is unusable is a clear error, not a traceback.

    Raises:
        ValueError: ``config`` is not an object, or its ``task`` is not a name, while the task is needed
            (``need_task``: no ``--glue-task`` / ``--test-file``); ``bits`` is not 1..8 or 32.
    """
    config = training.get("config")
    if config is None:
        config = {}
    if not isinstance(config, dict):
        if need_task:
            raise ValueError(f"the bundle's training.config is a JSON {type(config).__name__}, not an object: it "
                             "records no GLUE task; name one with --glue-task")
        config = {}
    task = config.get("task")
    if task is not None and not (isinstance(task, str) and task):
        if need_task:
            raise ValueError(f"the bundle's training.config.task is {task!r}, not a GLUE task name; name one with "
                             "--glue-task")
        task = None
    bits = config.get("bits", 8)
    if isinstance(bits, bool) or not isinstance(bits, int) or not (1 <= bits <= 8 or bits == 32):
        raise ValueError(f"the bundle's training.config.bits is {bits!r}: expected an integer 1..8 or 32 (the width "
                         "its masked weights were trained at)")
    return task, bits


def evaluate_bundle(bundle_path: str, data_dir: str, backbone: str | None = None, scores: str | None = None,
                    samples: int | None = 10, dev_limit: int | None = None, glue_task: str | None = None,
                    batch_size: int = 64, bernoulli_per: str = "batch", precision: str = "fp32", runtime: str = "auto",
                    form: str = "hot",
                    identical_pairs: int = 200, test_file: str | None = None, text_column: str | None = None,
                    text_pair_column: str | None = None, label_column: str | None = None) -> dict:
    """Evaluate a bundle on its GLUE task's dev split, or on the user's own labeled file (``test_file``).

    ``test_file`` (CSV, TSV, JSON Lines, Parquet; :mod:`training.data`): rows read with the columns the
    bundle's training recorded (``training["data"]``; ``text_column`` / ``text_pair_column`` /
    ``label_column`` override them, else the usual names), labels mapped by the bundle's own label names;
    metrics chosen by problem type as at training time (:func:`training.glue.problem_metrics`). The result
    then says ``"split": "test"`` and ``"dev_examples"`` counts the file's rows.

    ``precision``: the server's CPU compute precision to serve it in ("fp32", "bf16", "int8" or "auto",
    see :class:`service.settings.Settings`); recorded in the result (resolved). ``runtime``: what runs a bf16 /
    int8 hot tier ("auto", "torch", "onnxruntime"); recorded too. ``form`` (bf16 / int8): "hot" serves the task
    through its materialised weights, "sparse" through its sparse form (:mod:`service.sparse_forms`, never promoted);
    recorded too.

    ``identical_pairs`` (sentence-pair regression, STS-B): also score that many distinct dev first sentences
    paired with themselves (gold would be 5), ``result["identical_pairs"] = {"n", "mean", "min",
    "share_at_least_4"}``; 0: not. Regression results also give ``"calibration"`` (mean / s.d. against gold,
    :func:`training.glue.calibration`).

    ``bernoulli_per``: how the Bernoulli samples draw masks ("batch" or "mask", see
    :func:`training.trainer.evaluate_bernoulli`); recorded in the result.

    Returns:
        ``{"task", "dev_examples", "deterministic": {metric: value}, "recorded": {...},
        "bernoulli": {metric: {"mean", "std", "n"}} (when scores are available), "seconds"}``.
    Raises:
        BundleInvalid, BackboneMismatch, GlueDataError (DataError for a test file: a missing column, a label
        the bundle does not know, ...), FileNotFoundError; ValueError (``bernoulli_per``).
    """
    check_choice("bernoulli_per", bernoulli_per, BERNOULLI_PER)  # before any loading
    check_choice("form", form, FORMS)
    data = Path(bundle_path).read_bytes()
    bundle = decode_bundle(data)
    header = bundle.header
    recorded_task, bits = recorded_config(header.training, need_task=test_file is None and not glue_task)
    if test_file is not None:
        task, dev = _own_test_set(header, test_file, text_column, text_pair_column, label_column)
        dev = dev[:dev_limit]
    else:
        if "data" in header.training and glue_task is None:
            data_rec = header.training["data"] if isinstance(header.training["data"], dict) else {}
            sources = data_rec.get("sources") if isinstance(data_rec.get("sources"), dict) else {}
            raise ValueError(f"{bundle_path} was trained on your own data ({sources.get('train', '?')}): "
                             "evaluate it with --test-file FILE")
        task = get_task(glue_task or recorded_task or header.task)
        if list(task.labels) != list(header.labels):
            raise ValueError(f"GLUE task {task.name} has labels {list(task.labels)}, the bundle {header.labels}: "
                             "not a bundle for this task (--glue-task)")
        dev = read_split(task, data_dir, "dev")[:dev_limit]
    golds = np.array([e.label for e in dev])
    # served path: the quantized backbone the bundle's fingerprint names (a --bits 32 control was trained
    # over fp32 weights but carries the int8 fingerprint, and is served, so evaluated, over int8 weights)
    bb = load_backbone(backbone, bits=min(bits, 8))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalMaskStore(tmp)
        store.put(header.task, data, bb.fingerprint)
        engine = Engine(bb, store, Metrics(), cache_bytes=1 << 34, max_batch_size=batch_size, device="cpu",
                        precision=precision, runtime=runtime,
                        # every task the chosen form: the hot tier (no sparse forms to fall back to), or sparse forms
                        # only (never promoted, their budget never the limit)
                        hot_cache_bytes=1 << 34, sparse_cache_bytes=0 if form == "hot" else 1 << 34,
                        hot_promote_after=1 if form == "hot" else NEVER_PROMOTE)
        outs = []
        for i in tqdm(range(0, len(dev), batch_size), desc=f"dev {task.name} (served mask, {engine.precision})",
                      leave=False):
            rows = [(e.text_a, e.text_b) for e in dev[i : i + batch_size]]
            outs.append(engine.logits(header.task, rows))
        identical = None
        if task.problem_type == "regression" and task.is_pair and identical_pairs > 0:
            firsts = list(dict.fromkeys(e.text_a for e in dev))[:identical_pairs]
            identical = torch.cat([engine.logits(header.task, [(a, a) for a in firsts[i : i + batch_size]])
                                   for i in range(0, len(firsts), batch_size)]).squeeze(-1).numpy()
    logits = torch.cat(outs)
    preds = logits.squeeze(-1).numpy() if task.problem_type == "regression" else logits.argmax(-1).numpy()
    result = {
        "task": header.task,
        "glue_task": None if test_file is not None else task.name,
        "split": "test" if test_file is not None else "dev",
        "dev_examples": len(dev),
        "precision": engine.precision,
        "runtime": engine.compute_tier.runtime,
        "form": form if engine.precision in ("bf16", "int8") else None,
        "sparsity": header.sparsity,
        "deterministic": compute_metrics(task, preds, golds),
        "recorded": header.metrics.get("deterministic", {}) if test_file is None
        or header.metrics.get("split") == "test" else {},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if task.problem_type == "regression":
        result["calibration"] = calibration(preds, golds)
    if identical is not None:
        result["identical_pairs"] = {"n": len(identical), "mean": float(identical.mean()),
                                     "min": float(identical.min()), "share_at_least_4": float((identical >= 4).mean())}
    spath = Path(scores) if scores else scores_path(bundle_path)
    if samples is None:  # as at training time: 10 Bernoulli samples for a GLUE task, none for the user's own data
        samples = 0 if "data" in header.training else 10
    if samples > 0 and spath.is_file():
        result["bernoulli"] = _bernoulli(spath, bundle, backbone, bits, task, dev, samples, batch_size, bernoulli_per)
        result["bernoulli_per"] = bernoulli_per
    elif scores:
        raise FileNotFoundError(f"mask scores file {scores} not found")
    return result


def _own_test_set(header, test_file: str, text_column: str | None, text_pair_column: str | None,
                  label_column: str | None):
    """The task a bundle serves, rebuilt from its header, and the rows of ``test_file`` for it.

    Raises:
        DataError: as :func:`training.data.to_examples` (a label the bundle does not know is "seen only in test").
    """
    from training.data import LABEL_COLUMNS, TEXT_COLUMNS, DataTask, read_table, to_examples

    data = header.training.get("data")
    recorded = {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}  # names only
    regression = header.problem_type == "regression"
    table = read_table(test_file)
    cols = table.column_names

    def column(given, key, defaults):
        if given is not None:
            return given
        if recorded.get(key) in cols:
            return recorded[key]
        return next((c for c in defaults if c in cols), recorded.get(key) or defaults[0])

    text = column(text_column, "text_column", TEXT_COLUMNS)
    pair = column(text_pair_column, "text_pair_column", ("sentence2",)) if header.text_pairs else None
    label = column(label_column, "label_column", LABEL_COLUMNS)
    task = DataTask(header.task, tuple(header.labels), header.text_pairs, text, pair, label, regression=regression,
                    label_index={v: k for k, v in enumerate(header.labels)})
    return task, to_examples(task, table, str(test_file), "test")


def model_from_scores(bundle, scores_file: str | Path, backbone: str | None = None,
                      bits: int = 8) -> tuple[SupermaskModel, Backbone]:
    """A :class:`SupermaskModel` with a bundle's head and the mask scores ``ν`` saved beside it,
    and the backbone it was built on (for its tokenizer).

    Args:
        bundle: a decoded bundle (its head and number of outputs are used).
        scores_file: ``<bundle>.scores.safetensors`` (``<layer>.scores`` tensors, float16 ``[out, in]``).
        backbone: local encoder folder (default: all-MiniLM-L6-v2); bits: its weight width (1..8, or 32
            for the checkpoint's fp32 weights).
    Raises:
        FileNotFoundError, KeyError (a masked layer without scores), BackboneLoadError.
    """
    from safetensors.torch import load_file

    tensors = load_file(str(scores_file))
    bb = load_backbone(backbone, bits=min(bits, 8))
    if bits == 32:  # trained over the checkpoint's fp32 weights: sample over those, as training did
        restore_float_weights(bb)
    model = SupermaskModel(bb, bundle.header.num_outputs, quantized=bits < 32)
    with torch.no_grad():
        for name, layer in model.masked_layers().items():
            layer.scores.copy_(tensors[f"{name}.scores"].to(torch.float32))
        model.head.classifier.weight.copy_(torch.from_numpy(np.array(bundle.head[HEAD_WEIGHT])))
        model.head.classifier.bias.copy_(torch.from_numpy(np.array(bundle.head[HEAD_BIAS])))
    return model, bb


def _bernoulli(spath: Path, bundle, backbone: str | None, bits: int, task, dev, samples: int,
               batch_size: int, per: str = "batch") -> dict:
    model, bb = model_from_scores(bundle, spath, backbone, bits)
    return evaluate_bernoulli(model, bb.tokenizer, task, dev, bundle.header.max_seq_length, samples, batch_size,
                              per=per)
