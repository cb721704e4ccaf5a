"""Held-out split, head refit on cached features, and the refit of an existing bundle (tiny backbone)."""

from __future__ import annotations

import numpy as np
import pytest

from training.glue import Example, get_task, split_heldout
from training.refit import fit_head

from tests.conftest import make_bundle, write_glue


def _examples(n: int) -> list[Example]:
    return [Example(f"sentence {i}", None, i % 2) for i in range(n)]


def test_heldout_split_is_disjoint_fixed_and_recorded():
    ex = _examples(200)
    fit, held, rec = split_heldout(ex, 0.1, seed=7)
    assert len(held) == 20 and len(fit) == 180 and rec["examples"] == 20 and rec["fit_examples"] == 180
    assert {e.text_a for e in fit}.isdisjoint({e.text_a for e in held})
    assert {e.text_a for e in fit} | {e.text_a for e in held} == {e.text_a for e in ex}
    # file order kept within each part; the same rows for the same (n, fraction, seed) ...
    assert [e.text_a for e in fit] == [e.text_a for e in ex if e not in held]
    assert split_heldout(ex, 0.1, seed=7)[1] == held
    # ... and other rows for another seed
    assert split_heldout(ex, 0.1, seed=8)[1] != held
    assert rec["seed"] == 7 and rec["fraction"] == 0.1


def test_heldout_split_edges():
    ex = _examples(5)
    fit, held, _ = split_heldout(ex, 0.0)
    assert fit == ex and held == []
    assert len(split_heldout(ex, 0.01)[1]) == 1  # a positive fraction holds out at least one row
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        split_heldout(ex, 1.0)
    with pytest.raises(ValueError, match="nothing to train on"):
        split_heldout(_examples(1), 0.5)


def _regression_data(n: int, d: int, seed: int, noise: float):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = 2.5 + 0.4 * (x @ w) + noise * rng.normal(size=n)
    return x, y


def test_ridge_refit_recovers_a_linear_target_and_matches_the_gold_spread():
    task = get_task("STS-B")
    x, y = _regression_data(600, 16, 0, noise=0.5)
    fx, fy, hx, hy = x[:500], y[:500], x[500:], y[500:]
    mse = fit_head(task, fx, fy, hx, hy, regression_scale="mse", progress=False)
    pred = hx @ mse.weight[0] + mse.bias[0]
    assert mse.weight.shape == (1, 16) and mse.bias.shape == (1,) and mse.weight.dtype == np.float32
    assert np.mean((pred - hy) ** 2) < 0.35  # noise variance 0.25 plus a little estimation error
    # the chosen candidate is the best held-out one, every penalty was tried
    assert mse.choice["penalty"] == max(mse.candidates, key=lambda c: c["score"])["penalty"]
    assert len(mse.candidates) == 7
    # least squares shrinks: the predictions' s.d. is below the gold's; match-sd restores it on the fitting set
    sd = fit_head(task, fx, fy, hx, hy, regression_scale="match-sd", progress=False)
    fit_pred = fx @ sd.weight[0] + sd.bias[0]
    assert np.std(fx @ mse.weight[0] + mse.bias[0]) < 0.99 * np.std(fy)
    assert np.std(fit_pred) == pytest.approx(np.std(fy), rel=1e-4)
    assert np.mean(fit_pred) == pytest.approx(np.mean(fy), abs=1e-4)
    assert sd.choice["output_scale"] > 1.0


def test_logistic_refit_separates_and_chooses_on_heldout():
    task = get_task("CoLA")
    rng = np.random.default_rng(1)
    y = (rng.random(800) < 0.7).astype(int)  # 70 % one class, as CoLA
    x = rng.normal(size=(800, 8)).astype(np.float32)
    x[:, 0] += 1.5 * (2 * y - 1)
    fit = fit_head(task, x[:600], y[:600], x[600:], y[600:], steps=50, progress=False)
    pred = (x[600:] @ fit.weight.T + fit.bias).argmax(-1)
    assert fit.weight.shape == (2, 8)
    assert np.mean(pred == y[600:]) > 0.85
    assert fit.choice["heldout"]["mcc"] == max(c["heldout"]["mcc"] for c in fit.candidates)
    assert {c["balanced"] for c in fit.candidates} == {False, True}
    with pytest.raises(ValueError, match="steps"):
        fit_head(task, x, y, x, y, steps=0)
    with pytest.raises(ValueError, match="held-out split is empty"):
        fit_head(task, x, y, x[:0], y[:0])


def test_refit_bundle_keeps_masks_replaces_head_and_records_what_the_server_serves(tiny_backbone, tiny_backbone_dir,
                                                                                   tmp_path):
    from mask_store.format import decode_bundle
    from supermask.evaluate import evaluate_bundle
    from training.refit import refit_bundle

    data = write_glue(tmp_path / "glue", n=60)
    src = tmp_path / "SST-2.smask"
    src.write_bytes(make_bundle(tiny_backbone, task="SST-2", labels=("negative", "positive"), seed=3))
    out = tmp_path / "refit.smask"
    summary = refit_bundle(str(src), str(out), data, steps=30, backbone=str(tiny_backbone_dir), progress=False,
                           command="test refit")
    old, new = decode_bundle(src.read_bytes()), decode_bundle(out.read_bytes())
    assert old.masks == new.masks  # bit for bit
    assert not np.array_equal(old.head["classifier.weight"], new.head["classifier.weight"])
    h = new.header
    assert h.task == "SST-2" and h.max_seq_length == old.header.max_seq_length
    assert h.training["heldout_split"]["examples"] == 6 and h.training["head_refit"]["command"] == "test refit"
    assert h.training["head_refit"]["choice"]["model"] == "logistic"
    assert h.metrics["heldout"]["accuracy"] == summary["after"]["heldout"]["accuracy"]
    assert "deterministic" in h.metrics["before_head_refit"]
    # the recorded dev figure is what the serving engine computes for the new bundle
    served = evaluate_bundle(str(out), data_dir=data, backbone=str(tiny_backbone_dir), samples=0)
    assert abs(served["deterministic"]["accuracy"] - served["recorded"]["accuracy"]) <= 1.0 / served["dev_examples"]
    with pytest.raises(ValueError, match="labels"):
        refit_bundle(str(src), str(tmp_path / "x.smask"), data, glue_task="STS-B", backbone=str(tiny_backbone_dir),
                     progress=False)


def test_training_refits_the_head_and_records_split_and_refit(tiny_backbone_dir, tmp_path):
    from mask_store.format import decode_bundle
    from training.trainer import TrainConfig, train

    data = write_glue(tmp_path / "glue", n=40)
    kw = dict(task="MRPC", data_dir=data, backbone=str(tiny_backbone_dir), max_steps=2, batch_size=8,
              max_seq_length=16, bernoulli_samples=1, save_scores=False, device="cpu")
    res = train(TrainConfig(output=str(tmp_path / "a.smask"), head_refit_steps=20, **kw), progress=False)
    h = decode_bundle((tmp_path / "a.smask").read_bytes()).header
    assert h.training["heldout_split"]["examples"] == 4 and h.training["train_examples"] == 36
    assert h.training["head_refit"]["steps"] == 20 and h.training["config"]["head_refit_steps"] == 20
    assert h.metrics["deterministic"] == res.dev_metrics and set(h.metrics["heldout"]) >= {"accuracy", "f1"}
    assert set(h.metrics["before_head_refit"]) == {"deterministic", "heldout"}
    # without a refit: the head as trained, still judged on the held-out split
    res0 = train(TrainConfig(output=str(tmp_path / "b.smask"), head_refit_steps=0, **kw), progress=False)
    h0 = decode_bundle((tmp_path / "b.smask").read_bytes()).header
    assert "head_refit" not in h0.training and res0.head_refit == {} and "accuracy" in h0.metrics["heldout"]
    with pytest.raises(ValueError, match="held-out split"):
        train(TrainConfig(output=str(tmp_path / "c.smask"), head_refit_steps=5, heldout_fraction=0.0, **kw))


def test_regression_training_records_the_refit_heads_calibration_on_dev(tiny_backbone_dir, tmp_path):
    """The served (refitted) head's dev calibration is in the bundle's metrics; the GLUE figures stay clean."""
    from mask_store.format import decode_bundle
    from training.trainer import TrainConfig, train

    data = write_glue(tmp_path / "glue", n=40)
    sts = tmp_path / "glue" / "STS-B"
    sts.mkdir()
    for split in ("train", "dev"):  # the original layout: sentences in columns 7 and 8, the score last
        rows = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"] + [
            f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\ta cat {i} sat\ta cat {i % 7} sat down\t{(i * 0.37) % 5:.3f}"
            for i in range(40)]
        (sts / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    res = train(TrainConfig(output=str(tmp_path / "r.smask"), task="STS-B", data_dir=data,
                            backbone=str(tiny_backbone_dir), max_steps=2, batch_size=8, max_seq_length=16,
                            bernoulli_samples=0, save_scores=False, device="cpu", head_refit_steps=10),
                progress=False)
    m = decode_bundle((tmp_path / "r.smask").read_bytes()).header.metrics
    assert {"mean", "sd"} <= set(m["calibration"]) and m["calibration"] == res.head_refit["after"]["dev"]["calibration"]
    assert "calibration" not in m["deterministic"] and "pearson" in m["deterministic"]
