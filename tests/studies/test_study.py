"""The GLUE study tooling: shuffled-weights control, fp32 weights, fine-tuning baseline,
heat-map / overlap analysis and resumable experiment scripts (studies/glue/)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from backbone import dequantize, load_backbone
from studies.glue import common, heatmap_overlap, table_a
from training.controls import restore_float_weights, shuffle_masked_weights

from tests.conftest import make_bundle, write_glue


# ------------------------------------------------------------------ shuffled control


def test_shuffle_permutes_each_matrix_and_changes_fingerprint(tiny_backbone):
    bb = tiny_backbone
    before = {n: bb.model.get_submodule(n).weight.detach().clone() for n in bb.masked}
    fp_before = bb.fingerprint
    shuffle_masked_weights(bb, seed=0, float_weights=True)
    for n in bb.masked:
        after = bb.model.get_submodule(n).weight.detach()
        assert after.shape == before[n].shape
        # the same multiset of values within this matrix ...
        torch.testing.assert_close(after.reshape(-1).sort().values, before[n].reshape(-1).sort().values,
                                   rtol=0, atol=0)
        # ... in a different order
        assert not torch.equal(after, before[n])
        assert float((after != before[n]).float().mean()) > 0.5
    assert bb.fingerprint != fp_before


def test_shuffle_requantizes_and_is_seeded(tiny_backbone_dir):
    a = load_backbone(tiny_backbone_dir)
    b = load_backbone(tiny_backbone_dir)
    c = load_backbone(tiny_backbone_dir)
    orig = {n: a.model.get_submodule(n).weight.detach().clone() for n in a.masked}
    shuffle_masked_weights(a, seed=1)
    shuffle_masked_weights(b, seed=1)
    shuffle_masked_weights(c, seed=2)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    for n in a.masked:
        w = a.model.get_submodule(n).weight.detach()
        # the modules hold deq(W_q) of the re-quantized shuffled matrix, as after loading
        torch.testing.assert_close(w, dequantize(a.qweight[n], a.scale[n]), rtol=0, atol=0)
        # norm-preserving up to int8 rounding
        step = float(a.scale[n].max())
        assert abs(float(w.norm()) - float(orig[n].norm())) < step * w.numel() ** 0.5
        assert torch.allclose(w.reshape(-1).sort().values, orig[n].reshape(-1).sort().values, atol=step)


def test_restore_float_weights_gives_checkpoint_weights(tiny_backbone_dir):
    from transformers import AutoModel

    bb = load_backbone(tiny_backbone_dir)
    fp = bb.fingerprint
    raw = AutoModel.from_pretrained(str(tiny_backbone_dir), local_files_only=True)
    name = bb.masked[0]
    assert not torch.equal(bb.model.get_submodule(name).weight, raw.get_submodule(name).weight)  # int8 rounding
    restore_float_weights(bb)
    for n in bb.masked:
        torch.testing.assert_close(bb.model.get_submodule(n).weight, raw.get_submodule(n).weight, rtol=0, atol=0)
    assert bb.fingerprint == fp


def test_trainer_bits32_keeps_int8_fingerprint_and_shuffle_changes_it(tiny_backbone_dir, tmp_path):
    from mask_store.format import read_header_file
    from training.trainer import TrainConfig, train

    data = write_glue(tmp_path / "glue")
    fp_int8 = load_backbone(tiny_backbone_dir).fingerprint
    common_kw = dict(task="SST-2", data_dir=data, backbone=str(tiny_backbone_dir), max_steps=2, batch_size=4,
                     max_seq_length=16, bernoulli_samples=0, save_scores=False)
    train(TrainConfig(output=str(tmp_path / "fp32.smask"), bits=32, **common_kw), progress=False)
    train(TrainConfig(output=str(tmp_path / "shuf.smask"), shuffle_weights=True, **common_kw), progress=False)
    fp32 = read_header_file(str(tmp_path / "fp32.smask"))
    shuf = read_header_file(str(tmp_path / "shuf.smask"))
    assert fp32.backbone_fingerprint == fp_int8
    assert fp32.training["config"]["bits"] == 32
    assert shuf.backbone_fingerprint != fp_int8
    assert shuf.training["config"]["shuffle_weights"] is True
    with pytest.raises(ValueError, match="bits"):
        train(TrainConfig(output=str(tmp_path / "x.smask"), bits=16, **common_kw), progress=False)


def test_trainer_device_recorded_and_cuda_without_cuda_is_a_clear_error(tiny_backbone_dir, tmp_path):
    from mask_store.format import read_header_file
    from training.trainer import TrainConfig, train

    data = write_glue(tmp_path / "glue")
    common_kw = dict(task="SST-2", data_dir=data, backbone=str(tiny_backbone_dir), max_steps=2, batch_size=4,
                     max_seq_length=16, bernoulli_samples=0, save_scores=False)
    res = train(TrainConfig(output=str(tmp_path / "cpu.smask"), device="cpu", **common_kw), progress=False)
    assert res.device == "cpu"
    assert read_header_file(str(tmp_path / "cpu.smask")).training["hardware"]["device"] == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            train(TrainConfig(output=str(tmp_path / "gpu.smask"), device="cuda", **common_kw), progress=False)
        assert not (tmp_path / "gpu.smask").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trainer_on_cuda_writes_a_servable_bundle(tiny_backbone_dir, tmp_path):
    from mask_store.format import decode_bundle
    from training.trainer import TrainConfig, train

    data = write_glue(tmp_path / "glue")
    res = train(TrainConfig(task="SST-2", data_dir=data, output=str(tmp_path / "gpu.smask"),
                            backbone=str(tiny_backbone_dir), max_steps=3, batch_size=4, max_seq_length=16,
                            bernoulli_samples=2, device="cuda"), progress=False)
    assert res.device.startswith("cuda")
    bundle = decode_bundle((tmp_path / "gpu.smask").read_bytes())
    assert bundle.header.training["hardware"]["device"].startswith("cuda")
    assert set(res.bernoulli) == {"accuracy"} and res.bernoulli["accuracy"]["n"] == 2
    assert (tmp_path / "gpu.smask.scores.safetensors").is_file()


# ------------------------------------------------------------------ fine-tuning baseline


def test_finetune_trains_every_weight_and_writes_json(tiny_backbone_dir, tmp_path):
    from training.finetune import FinetuneConfig, FinetuneModel, _param_groups, finetune, load_encoder

    encoder, _ = load_encoder(str(tiny_backbone_dir), bits=32)
    model = FinetuneModel(encoder, 32, 2)
    cfg = FinetuneConfig(task="SST-2", data_dir="unused", lr=3e-5, head_lr=1e-3)
    groups = _param_groups(model, cfg)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # every parameter, once
    assert all(p.requires_grad for p in model.parameters())
    by_id = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_id[id(named["head.classifier.weight"])]["lr"] == 1e-3
    assert by_id[id(named["encoder.encoder.layer.0.attention.self.query.weight"])]["weight_decay"] == 0.01
    assert by_id[id(named["encoder.encoder.layer.0.attention.self.query.bias"])]["weight_decay"] == 0.0
    assert by_id[id(named["encoder.embeddings.LayerNorm.weight"])]["weight_decay"] == 0.0

    data = write_glue(tmp_path / "glue")
    out = tmp_path / "ft.json"
    res = finetune(FinetuneConfig(task="MRPC", data_dir=data, output=str(out), backbone=str(tiny_backbone_dir),
                                  max_steps=3, batch_size=4, max_seq_length=16, lr=1e-3, device="cpu"),
                   progress=False, command="test")
    assert res.steps == 3 and len(res.losses) == 3
    doc = json.loads(out.read_text())
    assert set(doc["dev_metrics"]) == {"accuracy", "f1"}
    assert doc["dev_examples"] == 12 and doc["config"]["bits"] == 32 and doc["command"] == "test"
    assert doc["hardware"]["device"] == "cpu"


# ------------------------------------------------------------------ heat map and overlap


def test_overlap_hand_example():
    # one matrix of 8 weights: A prunes {0,1,2,3}, B prunes {2,...,7}
    a = np.zeros(8, bool)
    a[:4] = True
    b = np.zeros(8, bool)
    b[2:] = True
    tasks, observed, chance = heatmap_overlap.pruned_overlap({"A": [a], "B": [b]})
    assert tasks == ["A", "B"]
    assert observed[1, 0] == pytest.approx(2 / 4)  # of A's pruned, the fraction B prunes too
    assert observed[0, 1] == pytest.approx(2 / 6)  # of B's pruned, the fraction A prunes too
    assert observed[0, 0] == observed[1, 1] == 1.0
    assert chance[1, 0] == pytest.approx(6 / 8)  # B's sparsity
    assert chance[0, 1] == pytest.approx(4 / 8)  # A's sparsity


def test_overlap_chance_over_several_matrices():
    # matrix 1 (4 weights): A prunes 2, B prunes 2 (the same ones); matrix 2 (4 weights): A prunes 0, B prunes 4
    a = [np.array([1, 1, 0, 0], bool), np.zeros(4, bool)]
    b = [np.array([1, 1, 0, 0], bool), np.ones(4, bool)]
    _, observed, chance = heatmap_overlap.pruned_overlap({"A": a, "B": b})
    assert observed[1, 0] == pytest.approx(1.0)  # all of A's pruned are pruned in B
    assert observed[0, 1] == pytest.approx(2 / 6)
    # independence within each matrix: B in A's column = (2·2/4 + 4·0/4) / 2; A in B's column = (2·2/4 + 0·4/4) / 6
    assert chance[1, 0] == pytest.approx(0.5)
    assert chance[0, 1] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="shapes"):
        heatmap_overlap.pruned_overlap({"A": a, "C": [np.zeros(3, bool)]})


def test_overlap_of_task_with_nothing_pruned_is_nan():
    _, observed, chance = heatmap_overlap.pruned_overlap({"A": [np.zeros(4, bool)], "B": [np.ones(4, bool)]})
    assert np.isnan(observed[1, 0]) and np.isnan(chance[1, 0])
    assert observed[0, 1] == 0.0


def test_heatmap_grid_shape_and_placement(tiny_backbone):
    from mask_store.format import decode_bundle

    header = decode_bundle(make_bundle(tiny_backbone, sparsity=0.2)).header
    grid, layers, columns = heatmap_overlap.sparsity_grid([(m.name, m.sparsity) for m in header.masks])
    assert grid.shape == (2, 6)
    assert layers == [0, 1]
    assert columns == ["W_Q", "W_K", "W_V", "W_D", "W_I", "W_O"]
    s = {m.name: m.sparsity for m in header.masks}
    assert grid[1, 4] == s["encoder.layer.1.intermediate.dense.weight"]
    assert grid[0, 3] == s["encoder.layer.0.attention.output.dense.weight"]
    assert grid[1, 5] == s["encoder.layer.1.output.dense.weight"]
    with pytest.raises(ValueError):
        heatmap_overlap.sparsity_grid([("embeddings.word_embeddings.weight", 0.1)])


def test_heatmap_overlap_script_on_bundles(tiny_backbone, tmp_path):
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    (bundles / "A.smask").write_bytes(make_bundle(tiny_backbone, task="A", sparsity=0.3, seed=0))
    (bundles / "B.smask").write_bytes(make_bundle(tiny_backbone, task="B", sparsity=0.3, seed=0))  # same mask as A
    (bundles / "C.smask").write_bytes(make_bundle(tiny_backbone, task="C", sparsity=0.3, seed=7))  # independent
    args = heatmap_overlap.build_parser().parse_args(["--bundles", str(bundles), "--out-dir", str(tmp_path / "out")])
    out = heatmap_overlap.run(args, "cmd")
    tasks, observed, chance = out["scopes"]["all masked matrices"]
    i = {t: k for k, t in enumerate(tasks)}
    assert observed[i["B"], i["A"]] == pytest.approx(1.0)  # identical masks overlap fully
    assert observed[i["C"], i["A"]] == pytest.approx(chance[i["C"], i["A"]], abs=0.02)  # independent: chance
    assert chance[i["C"], i["A"]] == pytest.approx(0.3, abs=0.02)
    doc = json.loads((tmp_path / "out" / "heatmap_overlap.json").read_text())
    assert np.array(doc["heatmap"]["A"]["sparsity"]).shape == (2, 6)
    assert "cmd" in (tmp_path / "out" / "heatmap_overlap.md").read_text()
    if common.pyplot() is not None:
        assert (tmp_path / "out" / "sparsity_heatmap.png").stat().st_size > 1000
        assert (tmp_path / "out" / "mask_overlap.png").stat().st_size > 1000


def test_heatmap_rejects_bundles_of_different_backbones(tiny_backbone, tmp_path):
    (tmp_path / "A.smask").write_bytes(make_bundle(tiny_backbone, task="A"))
    (tmp_path / "B.smask").write_bytes(make_bundle(tiny_backbone, task="B", fingerprint="0" * 64))
    with pytest.raises(SystemExit, match="different backbones"):
        heatmap_overlap.load_bundles([str(tmp_path)], None)


# ------------------------------------------------------------------ resumable scripts


def test_run_name_depends_on_every_config_value():
    args = table_a.build_parser().parse_args([])
    a = common.supermask_config("MRPC", 0, args)
    assert common.run_name("supermask", a) == common.run_name("supermask", dict(a))
    assert common.run_name("supermask", a) != common.run_name("supermask", {**a, "seed": 1})
    assert common.run_name("supermask", a) != common.run_name("supermask", {**a, "mask_lr": 0.2})
    assert common.run_name("supermask", a) != common.run_name("finetune", a)
    assert common.supermask_config("SST-2", 0, args)["max_seq_length"] == 64
    assert common.supermask_config("MRPC", 0, table_a.build_parser().parse_args(["--epochs", "1"]))["max_steps"] is None


def test_table_a_is_resumable(tmp_path, monkeypatch):
    data = write_glue(tmp_path / "glue")
    calls = {"supermask": 0, "finetune": 0}
    commands = []
    devices = []

    def fake_supermask(config, bundle_path, data_dir, save_scores, progress, command, device="auto"):
        calls["supermask"] += 1
        commands.append(command)
        devices.append(device)
        f1 = 0.80 + 0.01 * config["seed"]
        return {"steps": 1, "train_seconds": 0.1, "first_loss": 0.7, "final_loss": 0.6, "sparsity": 0.04,
                "dev": {"accuracy": 0.7, "f1": f1}, "bundle": bundle_path.name, "device": "cpu",
                "bernoulli": {"f1": {"mean": f1 - 0.01, "std": 0.005, "n": 10}}}

    def fake_finetune(config, data_dir, progress, command, device="auto"):
        calls["finetune"] += 1
        return {"steps": 1, "train_seconds": 0.1, "first_loss": 0.7, "final_loss": 0.5, "sparsity": 0.0,
                "dev": {"accuracy": 0.75, "f1": 0.82}, "device": "cpu"}

    monkeypatch.setattr(common, "train_supermask", fake_supermask)
    monkeypatch.setattr(common, "train_finetune", fake_finetune)
    argv = ["--tasks", "MRPC", "--seeds", "0", "1", "--data-dir", data, "--out-dir", str(tmp_path / "out"), "-q"]
    assert table_a.main(argv) == 0
    assert calls == {"supermask": 2, "finetune": 2}
    # the exact command reaches the trainer, which records it in each bundle
    assert all("studies/glue/table_a.py --tasks MRPC --seeds 0 1" in c for c in commands), commands
    assert len(list((tmp_path / "out" / "runs").glob("*.json"))) == 4
    assert table_a.main(argv) == 0  # everything read back
    assert calls == {"supermask": 2, "finetune": 2}
    assert table_a.main(argv + ["--device", "cpu"]) == 0  # where a run trains is not part of its name
    assert calls == {"supermask": 2, "finetune": 2}
    assert table_a.main(argv + ["--max-steps", "5"]) == 0  # a different config is a new run
    assert calls == {"supermask": 4, "finetune": 4}
    assert table_a.main(argv + ["--force", "--device", "cpu"]) == 0
    assert calls == {"supermask": 6, "finetune": 6}
    assert devices == ["auto"] * 4 + ["cpu"] * 2  # --device reaches the trainer

    md = (tmp_path / "out" / "table_a.md").read_text()
    assert "studies/glue/table_a.py --tasks MRPC --seeds 0 1" in md
    doc = json.loads((tmp_path / "out" / "table_a.json").read_text())
    row = doc["rows"][0]
    assert row["task"] == "MRPC" and row["metric"] == "f1"
    assert row["gap_points"] == pytest.approx(100 * (0.805 - 0.82))
    rec = doc["runs"][0]
    assert {"hardware", "wall_seconds", "seed", "command", "config", "git_commit"} <= set(rec)

    # --report-only trains nothing; runs of a config never trained are listed as missing
    assert table_a.main(argv + ["--report-only", "--seeds", "0", "7"]) == 0
    assert calls == {"supermask": 6, "finetune": 6}
    md = (tmp_path / "out" / "table_a.md").read_text()
    assert "Not run yet (2;" in md and "supermask-MRPC-s7-" in md and "finetune-MRPC-s7-" in md
    assert json.loads((tmp_path / "out" / "table_a.json").read_text())["rows"][0]["seeds"] == [0]


def test_table_a_ship_copies_best_bundle_and_skips_a_missing_one(tmp_path, monkeypatch):
    data = write_glue(tmp_path / "glue")

    def fake_supermask(config, bundle_path, data_dir, save_scores, progress, command, device="auto"):
        f1 = 0.80 + 0.01 * config["seed"]
        bundle_path.parent.mkdir(parents=True, exist_ok=True)
        bundle_path.write_bytes(f"bundle of seed {config['seed']}".encode())
        held = {0: 0.70, 1: 0.75, 2: 0.72}[config["seed"]]  # seed 1 best on held-out, seed 2 best on dev
        return {"steps": 1, "train_seconds": 0.1, "first_loss": 0.7, "final_loss": 0.6, "sparsity": 0.04,
                "dev": {"accuracy": 0.7, "f1": f1}, "bundle": bundle_path.name, "device": "cpu",
                "bernoulli": {"f1": {"mean": f1, "std": 0.0, "n": 1}}, "heldout": {"accuracy": 0.6, "f1": held}}

    monkeypatch.setattr(common, "train_supermask", fake_supermask)
    out, ship_dir = tmp_path / "out", tmp_path / "examples"
    argv = ["--tasks", "MRPC", "--seeds", "0", "2", "1", "--skip-baseline", "--data-dir", data,
            "--out-dir", str(out), "-q", "--ship-to", str(ship_dir)]
    assert table_a.main(argv) == 0
    assert (ship_dir / "MRPC.smask").read_bytes() == b"bundle of seed 1"  # the best held-out F1, not the best dev F1
    assert json.loads((out / "table_a.json").read_text())["not_shipped"] == []

    # the best run's bundle disappears: the task is reported, the shipped file is left as it was
    best = next((out / "runs").glob("supermask-MRPC-s1-*.smask"))
    best.unlink()
    (ship_dir / "MRPC.smask").write_bytes(b"previously shipped")
    assert table_a.main(argv + ["--report-only"]) == 0
    assert (ship_dir / "MRPC.smask").read_bytes() == b"previously shipped"
    doc = json.loads((out / "table_a.json").read_text())
    assert doc["shipped"] == [] and len(doc["not_shipped"]) == 1 and best.name in doc["not_shipped"][0]
    assert "Not shipped" in (out / "table_a.md").read_text()


def test_table_a_does_not_ship_from_runs_without_a_heldout_split(tmp_path, monkeypatch):
    def fake_supermask(config, bundle_path, data_dir, save_scores, progress, command, device="auto"):
        bundle_path.parent.mkdir(parents=True, exist_ok=True)
        bundle_path.write_bytes(b"legacy run")
        return {"steps": 1, "train_seconds": 0.1, "first_loss": 0.7, "final_loss": 0.6, "sparsity": 0.04,
                "dev": {"accuracy": 0.7, "f1": 0.9}, "bundle": bundle_path.name, "device": "cpu", "bernoulli": {}}

    monkeypatch.setattr(common, "train_supermask", fake_supermask)
    out, ship_dir = tmp_path / "out", tmp_path / "examples"
    assert table_a.main(["--tasks", "MRPC", "--seeds", "0", "--skip-baseline", "--data-dir", write_glue(tmp_path / "g"),
                         "--out-dir", str(out), "-q", "--ship-to", str(ship_dir)]) == 0
    assert not (ship_dir / "MRPC.smask").exists()
    assert "no run with a held-out figure" in json.loads((out / "table_a.json").read_text())["not_shipped"][0]


def test_legacy_supermask_configs_mean_no_split_and_no_refit(tmp_path, monkeypatch):
    """A recorded config without the held-out keys re-runs as it ran (no split, no refit); ``heldout=True``
    configs name the split and the refit, so they are other runs."""
    import argparse

    seen = []
    monkeypatch.setattr("training.trainer.train", lambda cfg, progress, command: seen.append(cfg) or (_ for _ in ()).throw(
        RuntimeError("stop")))
    args = argparse.Namespace(backbone=None, train_limit=None, dev_limit=None, bernoulli_samples=0, max_steps=None,
                              epochs=None)
    legacy, new = common.supermask_config("RTE", 0, args), common.supermask_config("RTE", 0, args, heldout=True)
    assert "heldout_fraction" not in legacy and new["heldout_fraction"] == 0.1 and new["head_refit_steps"] == 200
    assert common.run_name("supermask", legacy) != common.run_name("supermask", new)
    for cfg in (legacy, new):
        with pytest.raises(RuntimeError, match="stop"):
            common.train_supermask(cfg, tmp_path / "x.smask", "data", False, False)
    assert (seen[0].heldout_fraction, seen[0].head_refit_steps) == (0.0, 0)
    assert (seen[1].heldout_fraction, seen[1].head_refit_steps) == (0.1, 200)


def test_expected_sparsity_and_threshold_for_sparsity():
    from training.model import expected_sparsity, threshold_for_sparsity

    nu = [torch.tensor([[-2.0, 0.5], [3.0, 4.0]]), torch.tensor([1.0, -1.0, 6.0, 2.0])]
    flat = torch.cat([t.reshape(-1) for t in nu]).double()
    assert expected_sparsity(nu) == pytest.approx(float((1 - torch.sigmoid(flat)).mean()))
    assert threshold_for_sparsity(nu, 0.0) == float("-inf")
    assert threshold_for_sparsity(nu, 0.25) == -1.0  # the 2 smallest of 8: -2, -1
    tau = threshold_for_sparsity(nu, 0.5)
    assert tau == 1.0 and int((flat <= tau).sum()) == 4
    with pytest.raises(ValueError, match="sparsity"):
        threshold_for_sparsity(nu, 1.0)
    with pytest.raises(ValueError, match="no mask scores"):
        expected_sparsity([])


def _tiny_trained_bundle(tmp_path, task: str, backbone_dir) -> tuple[str, Path]:
    """A 2-step supermask bundle (with its mask scores, 2 Bernoulli samples recorded) on the tiny GLUE folder."""
    from training.trainer import TrainConfig, train

    data = write_glue(tmp_path / "glue")
    bundle = tmp_path / f"{task.lower().replace('-', '')}.smask"
    train(TrainConfig(task=task, data_dir=data, backbone=str(backbone_dir), max_steps=2, batch_size=4,
                      max_seq_length=16, bernoulli_samples=2, output=str(bundle)), progress=False)
    return data, bundle


def test_mask_threshold_script_matches_expected_sparsity(tiny_backbone_dir, tmp_path):
    from studies.glue import mask_threshold
    from mask_store.format import read_header_file

    data, bundle = _tiny_trained_bundle(tmp_path, "SST-2", tiny_backbone_dir)
    out = tmp_path / "out"
    argv = [str(bundle), "--data-dir", data, "--backbone", str(tiny_backbone_dir), "--out-dir", str(out)]
    assert mask_threshold.main(argv) == 0
    row = json.loads((out / "mask_threshold.json").read_text())["rows"][0]
    assert row["paper_rule"]["sparsity"] == pytest.approx(read_header_file(str(bundle)).sparsity)
    # ν starts at +5, so after 2 steps the sampled masks prune about 1 − σ(5) = 0.67 % while 1[ν > 0] prunes ~0
    assert row["expected_sparsity"] > 0.005
    # ties at τ_e are pruned (early Adam steps move many scores by the same amount), so at least that much
    assert row["matched_rule"]["sparsity"] >= row["expected_sparsity"] - 1e-6
    assert row["matched_rule"]["sparsity"] > row["paper_rule"]["sparsity"]
    assert set(row["matched_rule"]["dev"]) == {"accuracy"}
    assert "1[ν > τ_e]" in (out / "mask_threshold.md").read_text()

    (tmp_path / "sst2.smask.scores.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="mask scores"):
        mask_threshold.main(argv)


def test_trainer_expected_mask_rule_prunes_the_sampled_sparsity(tiny_backbone_dir, tmp_path):
    from safetensors.torch import load_file

    from mask_store.format import MASK_RULE, read_header_file
    from supermask.evaluate import evaluate_bundle
    from training.model import expected_sparsity
    from training.trainer import TrainConfig, train

    data = write_glue(tmp_path / "glue")
    kw = dict(task="SST-2", data_dir=data, backbone=str(tiny_backbone_dir), max_steps=3, batch_size=4,
              max_seq_length=16, bernoulli_samples=0, seed=3)
    sign = train(TrainConfig(output=str(tmp_path / "sign.smask"), **kw), progress=False)
    exp = train(TrainConfig(output=str(tmp_path / "exp.smask"), mask_rule="expected", **kw), progress=False)
    h_sign, h_exp = read_header_file(str(tmp_path / "sign.smask")), read_header_file(str(tmp_path / "exp.smask"))
    assert h_sign.mask_rule == MASK_RULE and "expected sampled sparsity" in h_exp.mask_rule
    assert h_exp.training["config"]["mask_rule"] == "expected"
    nu = list(load_file(str(tmp_path / "exp.smask.scores.safetensors")).values())
    assert exp.sparsity >= expected_sparsity(nu) - 1e-3 and exp.sparsity > sign.sparsity
    assert h_exp.sparsity == pytest.approx(exp.sparsity)
    # the same training run: only the written mask differs, and the served bundle reproduces its metric
    assert exp.losses == sign.losses
    res = evaluate_bundle(str(tmp_path / "exp.smask"), data_dir=data, backbone=str(tiny_backbone_dir), samples=2)
    assert res["deterministic"] == res["recorded"]
    # Bernoulli masks come from the saved scores, whatever rule wrote the bundle's bits
    assert res["bernoulli"]["accuracy"]["n"] == 2 and 0.0 <= res["bernoulli"]["accuracy"]["mean"] <= 1.0
    assert res["bernoulli_per"] == "batch"
    per_mask = evaluate_bundle(str(tmp_path / "exp.smask"), data_dir=data, backbone=str(tiny_backbone_dir),
                               samples=2, bernoulli_per="mask")
    assert per_mask["bernoulli_per"] == "mask" and per_mask["bernoulli"]["accuracy"]["n"] == 2
    assert per_mask["deterministic"] == res["deterministic"]
    with pytest.raises(ValueError, match="bernoulli_per"):
        evaluate_bundle(str(tmp_path / "exp.smask"), data_dir=data, bernoulli_per="example")
    with pytest.raises(ValueError, match="mask_rule"):
        train(TrainConfig(output=str(tmp_path / "x.smask"), mask_rule="median", **kw), progress=False)
    assert not (tmp_path / "x.smask").exists()


def test_bernoulli_protocol_script_lists_recorded_and_per_mask_figures(tiny_backbone_dir, tmp_path):
    from studies.glue import bernoulli_protocol
    from mask_store.format import read_header_file

    data, bundle = _tiny_trained_bundle(tmp_path, "MRPC", tiny_backbone_dir)
    out = tmp_path / "out"
    argv = [str(bundle), "--samples", "3", "--data-dir", data, "--backbone", str(tiny_backbone_dir),
            "--out-dir", str(out)]
    assert bernoulli_protocol.main(argv) == 0
    row = json.loads((out / "bernoulli_protocol.json").read_text())["rows"][0]
    h = read_header_file(str(bundle))
    assert row["per_batch_recorded"] == h.metrics["bernoulli"]  # read back from the header, n = 2
    assert row["per_mask"]["f1"]["n"] == 3 and row["deterministic"] == h.metrics["deterministic"]
    assert "one mask per sample" in (out / "bernoulli_protocol.md").read_text()

    (tmp_path / "mrpc.smask.scores.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="mask scores"):
        bernoulli_protocol.main(argv)


@pytest.mark.parametrize("change,error,match", [
    ({"task_name": "mrpc v2"}, "InvalidTaskName", "not allowed"),
    ({"output": "{tmp}"}, "ValueError", "is a folder"),
    ({"dev_limit": 0}, "ValueError", "dev_limit"),
    ({"train_limit": 0}, "ValueError", "train_limit"),
    ({"batch_size": 0}, "ValueError", "batch_size"),
    ({"max_steps": -5}, "ValueError", "max_steps"),
])
def test_bad_settings_are_refused_before_any_loading(tiny_backbone_dir, tmp_path, monkeypatch, change, error, match):
    from mask_store.errors import InvalidTaskName
    from training import trainer

    def no_loading(*a, **k):
        raise AssertionError("loaded the backbone before checking the settings")

    monkeypatch.setattr(trainer, "load_backbone", no_loading)
    monkeypatch.setattr(trainer, "read_split", no_loading)
    kw = dict(task="SST-2", data_dir=str(tmp_path), backbone=str(tiny_backbone_dir), max_steps=2,
              output=str(tmp_path / "x.smask"))
    kw.update({k: (v.format(tmp=tmp_path) if isinstance(v, str) and "{tmp}" in v else v) for k, v in change.items()})
    with pytest.raises({"InvalidTaskName": InvalidTaskName, "ValueError": ValueError}[error], match=match):
        trainer.train(trainer.TrainConfig(**kw), progress=False)


def test_ctrl_c_during_training_writes_the_model_so_far(tiny_backbone_dir, tmp_path, monkeypatch):
    from mask_store.format import decode_bundle
    from training import loop
    from training.trainer import TrainConfig, scores_path, train

    data = write_glue(tmp_path / "glue")
    real_loss, calls = loop.loss_fn, []

    def loss_then_interrupt(*a):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_loss(*a)

    monkeypatch.setattr(loop, "loss_fn", loss_then_interrupt)
    out = tmp_path / "sst2.smask"
    cfg = TrainConfig(task="SST-2", data_dir=data, backbone=str(tiny_backbone_dir), max_steps=10, batch_size=4,
                      max_seq_length=16, output=str(out))
    try:
        res = train(cfg, progress=False)
    except KeyboardInterrupt:  # would otherwise stop the whole pytest session
        pytest.fail("Ctrl-C during training was not turned into a saved, unevaluated bundle")
    assert res.interrupted and res.steps == 2 and res.dev_metrics == {}
    bundle = decode_bundle(out.read_bytes())
    assert "after 2 of 10 steps" in bundle.header.training["interrupted"] and bundle.header.metrics == {}
    assert scores_path(out).is_file()
    calls.clear()
    monkeypatch.setattr(loop, "loss_fn", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # nothing trained yet: nothing to save
        train(TrainConfig(**{**cfg.__dict__, "output": str(tmp_path / "none.smask")}), progress=False)
    assert not (tmp_path / "none.smask").exists()


def test_evaluate_a_renamed_and_an_fp32_bundle(tiny_backbone_dir, tmp_path):
    from supermask.evaluate import evaluate_bundle
    from training.trainer import TrainConfig, train

    data = write_glue(tmp_path / "glue")
    for name, bits in (("sentiment", 8), ("fp32-control", 32)):
        out = tmp_path / f"{name}.smask"
        res = train(TrainConfig(task="SST-2", data_dir=data, backbone=str(tiny_backbone_dir), max_steps=2,
                                batch_size=4, max_seq_length=16, bernoulli_samples=2, bits=bits, task_name=name,
                                output=str(out)), progress=False)
        got = evaluate_bundle(str(out), data, backbone=str(tiny_backbone_dir), samples=2)
        assert got["glue_task"] == "SST-2" and got["task"] == name  # the task it trained on, not its name
        if bits == 8:  # the served path is the model trained: the recorded figure is reproduced
            assert got["deterministic"] == pytest.approx(res.dev_metrics)
        assert set(got["bernoulli"]) == set(res.bernoulli)
    with pytest.raises(ValueError, match="labels"):  # an SST-2 bundle is not an MRPC one
        evaluate_bundle(str(tmp_path / "sentiment.smask"), data, backbone=str(tiny_backbone_dir), samples=0,
                        glue_task="MRPC")


def test_recipe_sweep_chooses_on_heldout_shows_dev_only_for_the_choice_and_ships_only_a_better_run(
        tmp_path, monkeypatch, tiny_backbone):
    from studies.glue import recipe_sweep
    from mask_store.format import decode_bundle, encode_bundle

    seen = []

    def fake_supermask(config, bundle_path, data_dir, save_scores, progress, command, device="auto"):
        seen.append(config)
        lr = config["mask_lr"]
        bundle_path.parent.mkdir(parents=True, exist_ok=True)
        bundle_path.write_bytes(f"bundle lr {lr} seed {config['seed']}".encode())
        held = {0.1: 0.70, 0.3: 0.80}[lr] + 0.01 * config["seed"]  # ν lr 0.3 wins on held-out ...
        dev = {0.1: 0.90, 0.3: 0.60}[lr]  # ... and loses on dev: dev must not decide
        return {"steps": 1, "train_seconds": 0.1, "first_loss": 0.7, "final_loss": 0.6, "sparsity": 0.04,
                "dev": {"accuracy": dev, "f1": dev}, "bundle": bundle_path.name, "device": "cpu", "bernoulli": {},
                "heldout": {"accuracy": held, "f1": held}}

    monkeypatch.setattr(common, "train_supermask", fake_supermask)
    monkeypatch.setattr(common, "majority_baseline", lambda task, data_dir, dev_limit=None: None)
    out, ship_dir = tmp_path / "out", tmp_path / "examples"
    ship_dir.mkdir()
    argv = ["--tasks", "MRPC", "--mask-lrs", "0.1", "0.3", "--seeds", "0", "1", "--out-dir", str(out), "-q",
            "--data-dir", str(tmp_path), "--ship-to", str(ship_dir)]
    assert recipe_sweep.main(argv) == 0
    assert all(c["heldout_fraction"] == 0.1 and c["head_refit_steps"] == 200 for c in seen) and len(seen) == 4
    md = (out / "recipe_sweep-MRPC.md").read_text()
    chosen = next(line for line in md.splitlines() if "**chosen**" in line)
    assert "| 0.3 |" in chosen and "60.0" in chosen  # chosen on held-out; its dev shown
    other = next(line for line in md.splitlines() if line.startswith("| MRPC | 0.1 |"))
    assert "(not chosen)" in other and "90.0" not in other  # the better dev figure is not shown
    shipped = ship_dir / "MRPC.smask"
    assert shipped.read_bytes() == b"bundle lr 0.3 seed 1"  # nothing was there: the best held-out run ships
    # a shipped bundle that records a better held-out figure is kept
    b = decode_bundle(make_bundle(tiny_backbone, task="MRPC", labels=("not_equivalent", "equivalent")))

    def with_heldout(f1: float, heldout_fraction) -> bytes:
        return encode_bundle(task="MRPC", problem_type=b.header.problem_type, labels=b.header.labels,
                             max_seq_length=b.header.max_seq_length,
                             backbone_fingerprint=b.header.backbone_fingerprint,
                             masks={m.name: b.mask_array(m.name) for m in b.header.masks}, head=b.head,
                             metrics={"heldout": {"f1": f1}},
                             training={"config": {"heldout_fraction": heldout_fraction}})

    better = with_heldout(0.95, 0.1)
    shipped.write_bytes(better)
    assert recipe_sweep.main(argv) == 0
    assert shipped.read_bytes() == better
    assert "not shipped" in json.loads((out / "recipe_sweep-MRPC.json").read_text())["shipped"][0]
    # a legacy bundle's held-out figure (its mask trained on those rows too) is not comparable: it is replaced
    shipped.write_bytes(with_heldout(0.99, None))
    assert recipe_sweep.main(argv) == 0
    assert shipped.read_bytes() == b"bundle lr 0.3 seed 1"
    assert "none comparable" in json.loads((out / "recipe_sweep-MRPC.json").read_text())["shipped"][0]
    # the best run's bundle is gone (bundles are not kept in git): the best run still on disk ships, and says so
    best_bundle = next(p for p in (out / "runs").glob("*.smask") if p.read_bytes() == b"bundle lr 0.3 seed 1")
    best_bundle.unlink()
    shipped.write_bytes(with_heldout(0.99, None))
    assert recipe_sweep.main(argv) == 0
    assert shipped.read_bytes() == b"bundle lr 0.3 seed 0"
    assert "bundle not on disk for seed 1" in json.loads((out / "recipe_sweep-MRPC.json").read_text())["shipped"][0]


def test_recipe_sweep_report_only_does_not_choose_a_row_with_fewer_seeds(tmp_path, monkeypatch):
    from studies.glue import recipe_sweep

    def fake_supermask(config, bundle_path, data_dir, save_scores, progress, command, device="auto"):
        held = {0.1: 0.70, 0.3: 0.90}[config["mask_lr"]]  # ν lr 0.3's one finished seed beats 0.1's mean
        return {"steps": 1, "train_seconds": 0.1, "first_loss": 0.7, "final_loss": 0.6, "sparsity": 0.04,
                "dev": {"accuracy": 0.5, "f1": 0.5}, "bundle": bundle_path.name, "device": "cpu", "bernoulli": {},
                "heldout": {"accuracy": held, "f1": held}}

    monkeypatch.setattr(common, "train_supermask", fake_supermask)
    monkeypatch.setattr(common, "majority_baseline", lambda task, data_dir, dev_limit=None: None)
    out = tmp_path / "out"
    base = ["--tasks", "MRPC", "--out-dir", str(out), "-q", "--data-dir", str(tmp_path)]
    assert recipe_sweep.main(base + ["--mask-lrs", "0.1", "--seeds", "0", "1", "2"]) == 0
    assert recipe_sweep.main(base + ["--mask-lrs", "0.3", "--seeds", "0"]) == 0
    assert recipe_sweep.main(base + ["--mask-lrs", "0.1", "0.3", "--seeds", "0", "1", "2", "--report-only"]) == 0
    doc = json.loads((out / "recipe_sweep-MRPC.json").read_text())
    (chosen,) = [r for r in doc["rows"] if r["chosen"]]
    assert chosen["mask_lr"] == 0.1 and len(doc["missing_runs"]) == 2
    md = (out / "recipe_sweep-MRPC.md").read_text()
    assert "not eligible: 1 of 3 seeds" in next(line for line in md.splitlines() if line.startswith("| MRPC | 0.3 |"))


def test_recipe_sweep_default_ste_keeps_recorded_run_names_and_sigmoid_reaches_the_config():
    from studies.glue import recipe_sweep

    base = ["--tasks", "CoLA", "--mask-lrs", "0.3", "--seeds", "0"]
    (kind, plain), = recipe_sweep.plan_runs(recipe_sweep.build_parser().parse_args(base))
    assert "ste" not in plain  # the default adds no key: runs recorded before the option keep their names
    both = recipe_sweep.plan_runs(recipe_sweep.build_parser().parse_args(base + ["--stes", "identity", "sigmoid"]))
    assert [c.get("ste") for _, c in both] == [None, "sigmoid"]
    assert common.run_name(kind, both[0][1]) == common.run_name(kind, plain)
    assert common.run_name(kind, both[1][1]) != common.run_name(kind, plain)
    from training.trainer import TrainConfig

    assert TrainConfig(task="CoLA", data_dir=".", output="x.smask", ste="sigmoid").ste == "sigmoid"


# ------------------------------------------------------------------ baselines chosen on held-out data


def test_run_steps_calls_on_epoch_end_after_each_complete_pass_only(tiny_backbone_dir, tmp_path):
    from training.finetune import FinetuneModel, load_encoder
    from training.glue import get_task, read_split
    from training.loop import run_steps

    data = write_glue(tmp_path / "glue", n=12)
    task = get_task("SST-2")
    train_set = read_split(task, data, "train")
    encoder, tok = load_encoder(str(tiny_backbone_dir), bits=32)
    model = FinetuneModel(encoder, 32, 2)
    seen = []

    def on_epoch_end(epoch, steps):
        seen.append((epoch, steps, model.training))
        model.eval()  # run_steps must put the model back in training mode

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # 12 rows, batch 4: 3 steps per epoch; 8 steps = two complete passes and a partial third
    losses = run_steps(model, task, train_set, tok, opt, 8, batch_size=4, max_len=16, seed=0, warmup_ratio=0.1,
                       desc="t", progress=False, on_epoch_end=on_epoch_end)
    assert len(losses) == 8 and seen == [(1, 3, True), (2, 6, True)]
    assert model.training


def test_finetune_holds_out_the_split_and_evaluates_every_epoch(tiny_backbone_dir, tmp_path):
    from training.finetune import FinetuneConfig, finetune
    from training.glue import get_task, read_split, split_heldout

    data = write_glue(tmp_path / "glue", n=40)
    kw = dict(task="MRPC", data_dir=data, backbone=str(tiny_backbone_dir), batch_size=8, max_seq_length=16,
              lr=1e-3, device="cpu", epochs=2)
    res = finetune(FinetuneConfig(heldout_fraction=0.1, eval_each_epoch=True, **kw), progress=False)
    fit, held, _ = split_heldout(read_split(get_task("MRPC"), data, "train"), 0.1, 1234)
    assert res.train_examples == len(fit) == 36 and res.heldout_split["examples"] == len(held) == 4
    assert [e["epoch"] for e in res.epochs] == [1, 2] and [e["step"] for e in res.epochs] == [5, 10]
    assert all(set(e["heldout"]) == {"accuracy", "f1"} and set(e["dev"]) == {"accuracy", "f1"} for e in res.epochs)
    assert res.dev_metrics == res.epochs[-1]["dev"] and res.heldout_metrics == res.epochs[-1]["heldout"]
    # the default trains on every row, as every baseline recorded before held-out splits did
    plain = finetune(FinetuneConfig(max_steps=2, **kw), progress=False)
    assert plain.train_examples == 40 and plain.heldout_metrics == {} and plain.epochs == []


def test_baseline_sweep_chooses_lr_and_epoch_on_heldout_and_confirms_with_more_seeds(tmp_path, monkeypatch):
    from studies.glue import baseline_sweep

    seen = []

    def fake_finetune(config, data_dir, progress, command, device="auto"):
        seen.append((config["lr"], config["seed"]))
        assert config["heldout_fraction"] == 0.1 and config["eval_each_epoch"] and config["epochs"] == 3.0
        # held-out prefers lr 1e-4 at epoch 2; dev prefers lr 5e-5 at epoch 3 (dev must not decide)
        held = {5e-5: [0.30, 0.32, 0.33], 1e-4: [0.31, 0.40, 0.35]}[config["lr"]]
        dev = {5e-5: [0.20, 0.25, 0.90], 1e-4: [0.21, 0.44, 0.30]}[config["lr"]]
        eps = [{"epoch": i + 1, "step": 10 * (i + 1), "heldout": {"mcc": h + 0.01 * config["seed"]},
                "dev": {"mcc": d}} for i, (h, d) in enumerate(zip(held, dev))]
        return {"steps": 30, "train_seconds": 1.0, "first_loss": 0.7, "final_loss": 0.5, "sparsity": 0.0,
                "dev": eps[-1]["dev"], "heldout": eps[-1]["heldout"], "epochs": eps, "device": "cpu"}

    monkeypatch.setattr(common, "train_finetune", fake_finetune)
    monkeypatch.setattr(common, "majority_baseline", lambda task, data_dir, dev_limit=None: None)
    out = tmp_path / "out"
    argv = ["--tasks", "CoLA", "--lrs", "5e-5", "1e-4", "--max-epochs", "3", "--confirm-seeds", "1", "2",
            "--out-dir", str(out), "-q", "--data-dir", str(tmp_path)]
    assert baseline_sweep.main(argv) == 0
    assert seen == [(5e-5, 0), (1e-4, 0), (1e-4, 1), (1e-4, 2)]  # only the chosen lr gets the extra seeds
    doc = json.loads((out / "baseline_sweep-CoLA.json").read_text())
    chosen = doc["chosen"]["CoLA"]
    assert (chosen["lr"], chosen["epoch"], chosen["seeds"]) == (1e-4, 2, [0, 1, 2])
    assert chosen["dev"] == [0.44, 0.44, 0.44]
    md = (out / "baseline_sweep-CoLA.md").read_text()
    line = next(x for x in md.splitlines() if "**chosen**" in x)
    assert "| 0.0001 | 2 | 0 1 2 |" in line and "44.0" in line
    assert "90.0" not in md  # the better dev figure of a row not chosen is never shown
    seen.clear()
    assert baseline_sweep.main(argv) == 0 and seen == []  # resumable: every run is read back


def _finished_sign_run(tiny_backbone_dir, tmp_path, seed: int, bernoulli_samples: int):
    """A tiny MRPC held-out sign run, finished: (data dir, study args, its config, its get_or_run result)."""
    data = write_glue(tmp_path / "glue", n=40)
    args = _study_args(out_dir=str(tmp_path / "out"), data_dir=data, backbone=str(tiny_backbone_dir))
    over = dict(max_steps=4, batch_size=8, max_seq_length=16, bernoulli_samples=bernoulli_samples, mask_lr=0.5,
                head_lr=1e-2)
    sign_cfg = common.supermask_config("MRPC", seed, args, heldout=True, mask_rule="sign", **over)
    return data, args, sign_cfg, common.get_or_run("supermask", sign_cfg, args, "test")


def _no_training(*a, **k):
    raise AssertionError("a mask-rule run with a finished sign run must not train")


def test_a_mask_rule_run_is_derived_from_the_finished_sign_run_without_training(tiny_backbone_dir, tmp_path,
                                                                                monkeypatch):
    from mask_store.format import decode_bundle
    from training.trainer import TrainConfig, scores_path, train

    data, args, sign_cfg, sign = _finished_sign_run(tiny_backbone_dir, tmp_path, seed=0, bernoulli_samples=1)
    assert sign["cached"] is False and "derived_from" not in sign["result"]
    monkeypatch.setattr(common, "train_supermask", _no_training)
    exp_cfg = {**sign_cfg, "mask_rule": "expected"}
    exp = common.get_or_run("supermask", exp_cfg, args, "test")
    runs = tmp_path / "out" / "runs"
    assert exp["result"]["derived_from"] == sign["name"] and exp["name"] != sign["name"]
    assert exp["result"]["bernoulli"] == sign["result"]["bernoulli"] and exp["result"]["steps"] == 4
    assert scores_path(runs / exp["result"]["bundle"]).is_file()
    h = decode_bundle((runs / exp["result"]["bundle"]).read_bytes()).header
    assert "expected sampled sparsity" in h.mask_rule and h.training["mask_rule_applied"]["rule"] == "expected"
    assert h.training["config"]["mask_rule"] == "expected"
    assert h.metrics["heldout"] == exp["result"]["heldout"]
    # the same bundle a training run with that rule writes: same masks (up to the float16 rounding of saved
    # scores at the threshold), and its head refitted on them
    monkeypatch.undo()
    trained = tmp_path / "trained.smask"
    train(TrainConfig(output=str(trained), data_dir=data, device="cpu", **{**common.LEGACY_SUPERMASK, **exp_cfg}),
          progress=False)
    a, b = decode_bundle(trained.read_bytes()), decode_bundle((runs / exp["result"]["bundle"]).read_bytes())
    agree = np.mean([np.mean(a.mask_array(m.name) == b.mask_array(m.name)) for m in a.header.masks])
    assert agree > 0.999 and abs(a.header.sparsity - b.header.sparsity) < 1e-3
    assert b.header.sparsity > decode_bundle((runs / sign["result"]["bundle"]).read_bytes()).header.sparsity
    # read back while its source stands; derived again once the source is trained again (--force)
    monkeypatch.setattr(common, "train_supermask", _no_training)
    assert common.get_or_run("supermask", exp_cfg, args, "test")["cached"] is True
    src_json = runs / f"{sign['name']}.json"
    later = {**json.loads(src_json.read_text()), "finished_at": "2999-01-01T00:00:00+00:00"}
    src_json.write_text(json.dumps(later))
    again = common.get_or_run("supermask", exp_cfg, args, "test")
    assert again["cached"] is False and again["result"]["source_finished_at"] == later["finished_at"]
    assert common.get_or_run("supermask", exp_cfg, args, "test")["cached"] is True
    # fp32 and shuffled-weights runs are not derived: the refit would run the int8, unshuffled backbone
    assert common.rule_source({**exp_cfg, "bits": 32}, runs) is None
    assert common.rule_source({**exp_cfg, "shuffle_weights": True}, runs) is None


def test_a_sampled_mask_run_is_derived_with_the_source_runs_seed(tiny_backbone_dir, tmp_path, monkeypatch):
    """The "sampled" rule draws with the run's seed, so the derived bundle and a trained one agree."""
    from mask_store.format import decode_bundle
    from training.trainer import TrainConfig, train

    data, args, sign_cfg, sign = _finished_sign_run(tiny_backbone_dir, tmp_path, seed=2, bernoulli_samples=0)
    monkeypatch.setattr(common, "train_supermask", _no_training)
    smp_cfg = {**sign_cfg, "mask_rule": "sampled"}
    smp = common.get_or_run("supermask", smp_cfg, args, "test")
    runs = tmp_path / "out" / "runs"
    assert smp["result"]["derived_from"] == sign["name"]
    derived = decode_bundle((runs / smp["result"]["bundle"]).read_bytes())
    assert "one draw" in derived.header.mask_rule and "seed 2" in derived.header.mask_rule
    monkeypatch.undo()
    trained = tmp_path / "trained.smask"
    train(TrainConfig(output=str(trained), data_dir=data, device="cpu", **{**common.LEGACY_SUPERMASK, **smp_cfg}),
          progress=False)
    a = decode_bundle(trained.read_bytes())
    agree = np.mean([np.mean(a.mask_array(m.name) == derived.mask_array(m.name)) for m in a.header.masks])
    assert agree > 0.999  # up to the float16 rounding of the saved scores
    assert a.header.mask_rule.rsplit("sparsity", 1)[0] == derived.header.mask_rule.rsplit("sparsity", 1)[0]
    # a draw is not the threshold rule: it prunes weights whose ν is above zero
    assert a.header.sparsity > decode_bundle((runs / sign["result"]["bundle"]).read_bytes()).header.sparsity


def test_an_interrupted_sweep_run_writes_no_record(tmp_path, monkeypatch):
    import training.trainer as trainer

    class Stopped:
        interrupted, steps = True, 3

    monkeypatch.setattr(trainer, "train", lambda cfg, progress=True, command="": Stopped())
    args = _study_args(out_dir=str(tmp_path / "out"), data_dir=str(tmp_path), backbone=None)
    cfg = common.supermask_config("MRPC", 0, args, heldout=True)
    with pytest.raises(KeyboardInterrupt, match="after 3 steps"):
        common.get_or_run("supermask", cfg, args, "test")
    assert not (tmp_path / "out" / "runs" / f"{common.run_name('supermask', cfg)}.json").exists()


def _study_args(**kw):
    import argparse

    base = dict(train_limit=None, dev_limit=None, bernoulli_samples=1, max_steps=None, epochs=None, force=False,
                quiet=True, no_scores=False, device="cpu")
    return argparse.Namespace(**{**base, **kw})


def test_acceptance_prefers_heldout_choices_and_judges_the_targets(tmp_path, monkeypatch, tiny_backbone):
    from studies.glue import acceptance

    res, masks = tmp_path / "res", tmp_path / "masks"
    res.mkdir()
    masks.mkdir()
    monkeypatch.setattr(common, "majority_baseline", lambda task, data_dir, dev_limit=None: {"accuracy": 0.527})
    table = {"rows": [
        {"task": "RTE", "supermask": [0.50, 0.52], "bernoulli": [{"mean": 0.51}, {"mean": 0.50}], "seeds": [0, 1],
         "finetune": [0.59]},
        {"task": "CoLA", "supermask": [0.10], "bernoulli": [None], "seeds": [0], "finetune": [0.25]}]}
    (res / "table_a.json").write_text(json.dumps(table))
    (res / "recipe_sweep-CoLA.json").write_text(json.dumps({"rows": [
        {"chosen": False, "mask_lr": 0.03, "length": "3 ep", "max_len": 128, "mask_rule": "sign", "seeds": [0],
         "heldout": [0.1]},
        {"chosen": True, "mask_lr": 0.1, "length": "3 ep", "max_len": 128, "mask_rule": "expected", "seeds": [0, 1],
         "heldout": [0.3, 0.3], "dev": [0.31, 0.33], "bernoulli": [0.3, None]}]}))
    (res / "baseline_sweep-CoLA-RTE.json").write_text(json.dumps({"chosen": {
        "CoLA": {"lr": 1e-4, "epoch": 4, "seeds": [0, 1, 2], "dev": [0.34, 0.36, 0.35]}}}))
    # a smoke sweep's figures are not RTE's: skipped
    (res / "baseline_sweep-RTE.json").write_text(json.dumps({
        "chosen": {"RTE": {"lr": 1e-4, "epoch": 1, "seeds": [0], "dev": [0.9]}},
        "runs": [{"kind": "finetune", "config": {"task": "RTE", "train_limit": 64}}]}))
    (masks / "RTE.smask").write_bytes(make_bundle(tiny_backbone, task="RTE", labels=("entailment", "not_entailment")))
    rows, md = acceptance.build(acceptance.build_parser().parse_args(
        ["--results-dir", str(res), "--masks-dir", str(masks), "--data-dir", str(tmp_path)]))
    by = {r["task"]: r for r in rows}
    cola, rte = by["CoLA"], by["RTE"]
    assert "recipe_sweep-CoLA.json" in cola["supermask"]["source"] and cola["supermask"]["dev"] == [0.31, 0.33]
    assert "baseline_sweep" in cola["finetune"]["source"]
    assert cola["gap_points"] == pytest.approx(-3.0) and cola["met"] is True  # within CoLA's 4.0 points
    assert "MCC ≥ 30: **met**" in cola["other"]
    assert "table_a.json" in rte["supermask"]["source"] and "table_a.json" in rte["finetune"]["source"]
    assert rte["gap_points"] == pytest.approx(-8.0) and rte["met"] is False
    assert "above majority class 52.7: **not met**" in rte["other"]
    assert by["MRPC"]["supermask"] is None and by["MRPC"]["met"] is None  # nothing recorded: no verdict
    assert "| CoLA | MCC | 32.0 ± 1.0" in md
