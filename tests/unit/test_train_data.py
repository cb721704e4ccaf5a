"""Training on a user's own data (issue 33): the readers (CSV, TSV, JSON Lines, a datasets folder), labels and
problem type from the data, one-line errors that write nothing, the schedule scaled to the data, the linear-probe
baseline and the learned-nothing warning, --max-minutes, evaluate --test-file, and an end-to-end run that trains
from a CSV, uploads through the client and serves the data's own label names. Tiny random backbone."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from mask_store.format import decode_bundle, read_header_file
from supermask import cli
from training.data import DataError, infer_task, load_task_data, read_table
from training.glue import problem_metrics

WORDS = {"pos": ["good", "great", "lovely"], "neg": ["bad", "awful", "dull"], "neutral": ["okay", "plain", "average"]}


def _rows(n: int = 18, classes=("neg", "pos")) -> list[dict]:
    return [{"text": f"a {WORDS.get(classes[i % len(classes)], ['odd'] * 3)[i % 3]} film number {i}",
             "label": classes[i % len(classes)]} for i in range(n)]


def _write_csv(path, rows: list[dict], delimiter: str = ",") -> str:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return str(path)


def _write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _cfg(tmp_path, backbone_dir, name: str = "toy", **kw):
    from training.trainer import TrainConfig

    base = dict(task=name, data_dir="", output=str(tmp_path / f"{name}.smask"), backbone=str(backbone_dir),
                max_steps=3, batch_size=4, max_seq_length=16, head_refit_steps=5, bernoulli_samples=0,
                save_scores=False)
    base.update(kw)
    return TrainConfig(**base)


def _run(tmp_path, backbone_dir, **kw):
    from training.trainer import train

    cfg = _cfg(tmp_path, backbone_dir, **kw)
    return train(cfg, progress=False), decode_bundle(open(cfg.output, "rb").read())


# ------------------------------------------------------------------ labels and problem type from the data


def test_string_labels_are_sorted_and_labels_option_fixes_the_order(tmp_path):
    f = _write_csv(tmp_path / "t.csv", _rows(9, ("pos", "neutral", "neg")))
    task = infer_task("t", read_table(f), f)
    assert task.labels == ("neg", "neutral", "pos") and task.problem_type == "single_label_classification"
    assert task.main_metric == "macro_f1" and not task.is_pair
    task = infer_task("t", read_table(f), f, labels=["pos", "neg", "neutral"])
    assert task.labels == ("pos", "neg", "neutral") and task.label_index["neg"] == 1
    with pytest.raises(DataError, match="'neutral'.*not in --labels"):
        infer_task("t", read_table(f), f, labels=["pos", "neg"])


def test_integer_labels_sort_numerically_and_are_named_by_their_digits(tmp_path):
    rows = [{"text": f"row {i}", "label": [2, 10, 1][i % 3]} for i in range(9)]
    f = _write_jsonl(tmp_path / "t.jsonl", rows)
    data = load_task_data("t", train_file=f)
    assert data.task.labels == ("1", "2", "10")  # numeric, not "1", "10", "2"
    assert [e.label for e in data.train[:3]] == [1, 2, 0]
    assert data.class_counts == {"1": 3, "2": 3, "10": 3}


def test_float_label_column_is_regression_and_problem_type_overrides(tmp_path):
    f = _write_jsonl(tmp_path / "r.jsonl", [{"text": f"row {i}", "label": i / 4} for i in range(8)])
    data = load_task_data("r", train_file=f)
    assert data.task.problem_type == "regression" and data.task.labels == () and data.train[3].label == 0.75
    g = _write_jsonl(tmp_path / "i.jsonl", [{"text": f"row {i}", "label": i % 5} for i in range(8)])
    assert load_task_data("i", train_file=g, problem_type="regression").task.problem_type == "regression"
    assert load_task_data("i", train_file=g).task.problem_type == "single_label_classification"


def test_sentence_pairs_are_found_by_their_usual_names(tmp_path):
    rows = [{"sentence1": f"a cat {i}", "sentence2": f"the cat {i}", "label": i % 2} for i in range(6)]
    data = load_task_data("p", train_file=_write_csv(tmp_path / "p.tsv", rows, "\t"))
    assert data.task.is_pair and data.task.text_pair_column == "sentence2"
    assert data.train[0].text_b == "the cat 0"


def test_class_label_feature_names_are_the_label_names(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [1, 0, 2, 1]},
                                    features=datasets.Features({"text": datasets.Value("string"),
                                                                "label": datasets.ClassLabel(names=["sad", "ok", "glad"])}))
    ds.save_to_disk(str(tmp_path / "folder"))
    data = load_task_data("c", dataset_dir=str(tmp_path / "folder"))
    assert data.task.labels == ("sad", "ok", "glad") and [e.label for e in data.train] == [1, 0, 2, 1]


def test_problem_metrics_by_problem_type():
    # 3 classes, gold 0 0 1 1 2 2, pred 0 1 1 1 2 0: F1 per class 0.5, 0.8, 2/3; accuracy 4/6
    m = problem_metrics("single_label_classification", 3, np.array([0, 1, 1, 1, 2, 0]), np.array([0, 0, 1, 1, 2, 2]))
    assert set(m) == {"accuracy", "macro_f1"}
    assert m["accuracy"] == pytest.approx(4 / 6) and m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    m = problem_metrics("single_label_classification", 2, np.array([1, 0, 1, 0]), np.array([1, 0, 0, 0]))
    assert set(m) == {"accuracy", "macro_f1", "mcc"} and m["mcc"] == pytest.approx(1 / math.sqrt(3))
    r = problem_metrics("regression", 0, np.array([1.0, 2.0, 4.0]), np.array([1.0, 2.0, 3.0]))
    assert set(r) == {"pearson", "spearman", "mse"} and r["spearman"] == pytest.approx(1.0)
    assert r["mse"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------ bad inputs: one line, nothing written


def _bad_inputs(tmp_path):
    good = _write_csv(tmp_path / "good.csv", _rows(8))
    (tmp_path / "empty.csv").write_text("")
    only_header = tmp_path / "header.csv"
    only_header.write_text("text,label\n")
    new_label = _write_csv(tmp_path / "val.csv", _rows(4, ("neg", "pos", "maybe", "pos")))
    numbers = _write_csv(tmp_path / "numbers.csv", [{"text": i, "label": "pos" if i % 2 else "neg"} for i in range(6)])
    blank = _write_csv(tmp_path / "blank.csv", [{"text": "" if i == 3 else f"row {i}", "label": i % 2} for i in range(6)])
    return {
        "missing column": (["--train-file", good, "--label-column", "sentiment"], "no label column 'sentiment'"),
        "no label column": (["--train-file", _write_csv(tmp_path / "nolabel.csv", [{"text": "a", "y": 1}])],
                            "no label column"),
        "empty file": (["--train-file", str(tmp_path / "empty.csv")], "the file is empty"),
        "header only": (["--train-file", str(only_header)], "holds no rows"),
        "label only in validation": (["--train-file", good, "--validation-file", new_label],
                                     "label 'maybe' seen only in validation"),
        "text not text": (["--train-file", numbers], "column 'text' holds int64, not text"),
        "empty text": (["--train-file", blank], "row 4: column 'text' is empty"),
        "unknown suffix": (["--train-file", str(tmp_path / "x.xlsx")], "file not found"),
    }


def test_every_bad_input_gets_a_one_line_error_and_writes_nothing(tmp_path, tiny_backbone_dir, capsys):
    out = tmp_path / "out"
    for case, (args, message) in _bad_inputs(tmp_path).items():
        rc = cli.main(["train", "toy", *args, "--backbone", str(tiny_backbone_dir), "-o", str(out / "toy.smask")])
        err = capsys.readouterr().err.strip()
        assert rc == 2, case
        assert err.startswith("supermask train: error: ") and "\n" not in err, (case, err)
        assert message in err, (case, err)
        assert not list(out.glob("*")) if out.exists() else True, case


def test_unknown_file_type_is_refused(tmp_path):
    f = tmp_path / "t.xlsx"
    f.write_text("x")
    with pytest.raises(DataError, match="unknown file type '.xlsx'"):
        read_table(f)


# ------------------------------------------------------------------ training


def test_csv_jsonl_and_datasets_folder_give_the_same_bundle(tmp_path, tiny_backbone_dir):
    import datasets

    rows = _rows(16)
    csv_file = _write_csv(tmp_path / "d.csv", rows)
    jsonl_file = _write_jsonl(tmp_path / "d.jsonl", rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "folder"))
    bundles = []
    for i, src in enumerate(({"train_file": csv_file}, {"train_file": jsonl_file},
                             {"dataset": str(tmp_path / "folder")})):
        _, b = _run(tmp_path / str(i), tiny_backbone_dir, **src)
        bundles.append(b)
    first = bundles[0]
    assert first.header.labels == ["neg", "pos"]
    for other in bundles[1:]:
        assert other.header.labels == first.header.labels
        for m in first.header.masks:
            assert np.array_equal(other.mask_array(m.name), first.mask_array(m.name))
        for k in first.head:
            assert np.array_equal(np.array(other.head[k]), np.array(first.head[k]))
        assert other.header.metrics["deterministic"] == first.header.metrics["deterministic"]


def test_three_classes_with_a_test_file_record_metrics_by_problem_type(tmp_path, tiny_backbone_dir):
    rows = _rows(24, ("neg", "neutral", "pos"))
    res, b = _run(tmp_path, tiny_backbone_dir, train_file=_write_csv(tmp_path / "t.csv", rows),
                  test_file=_write_csv(tmp_path / "test.csv", rows[:9]))
    h = b.header
    assert h.labels == ["neg", "neutral", "pos"] and h.num_outputs == 3
    assert h.metrics["split"] == "test" and h.metrics["dev_examples"] == 9 and res.report_split == "test"
    assert set(h.metrics["deterministic"]) == {"accuracy", "macro_f1"}  # no MCC beyond two classes
    assert h.metrics["problem_type"] == "single_label_classification" and h.metrics["main_metric"] == "macro_f1"
    data = h.training["data"]
    assert data["class_balance"]["counts"] == {"neg": 8, "neutral": 8, "pos": 8}
    assert data["sources"]["train"].endswith("t.csv")
    # the linear-probe baseline is reported beside the result, on the same splits
    assert set(h.metrics["linear_probe"]) >= {"heldout", "test"}
    assert set(h.metrics["linear_probe"]["test"]) == {"accuracy", "macro_f1"}


def test_regression_pairs_train_and_record_regression_metrics(tmp_path, tiny_backbone_dir):
    rows = [{"sentence1": f"a cat {i}", "sentence2": f"the cat {i % 4}", "score": (i % 6) / 1.5} for i in range(20)]
    _, b = _run(tmp_path, tiny_backbone_dir, train_file=_write_jsonl(tmp_path / "s.jsonl", rows))
    h = b.header
    assert h.problem_type == "regression" and h.text_pairs and h.labels == []
    assert h.metrics["split"] == "heldout"  # no test file: reported on the held-out split
    assert set(h.metrics["deterministic"]) == {"pearson", "spearman", "mse"}


def test_small_data_schedule_is_scaled_and_glue_presets_are_not():
    from training.trainer import MIN_MASK_STEPS, plan_schedule

    # the case: 200 rows x 3 epochs at batch 32 is 18 steps; ±5 at ν lr 0.1 cannot cross zero in that
    paper = plan_schedule(180, 32, 3.0, None, 0.1, scale=False)
    assert paper["steps"] == 18 and paper["score_init"] == 5.0 and paper["reach"] < 5.0
    scaled = plan_schedule(180, 32, 3.0, None, 0.1, scale=True)
    assert scaled["steps"] == MIN_MASK_STEPS and scaled["reach"] >= 4 * scaled["score_init"]
    assert scaled["score_init"] < 5.0
    big = plan_schedule(60_000, 32, 3.0, None, 0.1, scale=True)  # a large set keeps the paper's recipe
    assert big["score_init"] == 5.0 and big["steps"] == 5625
    assert plan_schedule(180, 32, 3.0, 7, 0.1, scale=True)["steps"] == 7  # max_steps is obeyed


def test_a_mask_that_learned_nothing_is_reported_beside_the_linear_probe(tmp_path, tiny_backbone_dir):
    res, b = _run(tmp_path, tiny_backbone_dir, train_file=_write_csv(tmp_path / "t.csv", _rows(16)),
                  scale_schedule=False, max_steps=2)
    assert res.sparsity == 0.0
    assert res.warnings and "learned (almost) nothing" in res.warnings[0]
    assert b.header.training["warnings"] == res.warnings
    assert "heldout" in b.header.metrics["linear_probe"]


def test_max_minutes_stops_and_writes_an_evaluated_bundle(tmp_path, tiny_backbone_dir):
    res, b = _run(tmp_path, tiny_backbone_dir, train_file=_write_csv(tmp_path / "t.csv", _rows(40)),
                  max_steps=None, epochs=50.0, max_minutes=1e-4)  # 6 ms: a step or two
    assert res.timed_out and not res.interrupted and res.steps < 500  # 50 epochs of 10 steps planned
    assert "max-minutes" in b.header.training["stopped"]
    assert b.header.metrics["deterministic"]  # evaluated like a finished run


def test_early_stopping_keeps_the_best_held_out_epoch(tmp_path, tiny_backbone_dir):
    res, b = _run(tmp_path, tiny_backbone_dir, train_file=_write_csv(tmp_path / "t.csv", _rows(16)),
                  max_steps=None, epochs=20.0, scale_schedule=False, patience=1)
    rec = b.header.training["early_stopping"]
    assert rec["metric"] == "macro_f1" and rec["history"]
    eligible = [h for h in rec["history"] if h["step"] >= rec["from_step"]]
    assert rec["best"]["score"] == max(h["macro_f1"] for h in eligible)
    if rec["stopped_early"]:
        assert res.steps < 20 * 4 and res.early_stopped


def test_glue_preset_header_has_no_own_data_settings(tmp_path, tiny_backbone_dir):
    from tests.conftest import write_glue
    from training.trainer import TrainConfig, train

    data = write_glue(tmp_path / "glue")
    res = train(TrainConfig(task="SST-2", data_dir=data, output=str(tmp_path / "s.smask"),
                            backbone=str(tiny_backbone_dir), max_steps=2, batch_size=4, max_seq_length=16,
                            head_refit_steps=5, bernoulli_samples=0, save_scores=False), progress=False)
    h = read_header_file(res.bundle_path)
    assert "train_file" not in h.training["config"] and "data" not in h.training
    assert "linear_probe" not in h.metrics and h.metrics["split"] == "dev" and res.report_split == "dev"
    assert set(h.metrics["deterministic"]) == {"accuracy"}  # the GLUE metric of SST-2, as before


# ------------------------------------------------------------------ evaluate --test-file, and end to end


def test_evaluate_test_file_through_the_serving_path_reproduces_the_recorded_figure(tmp_path, tiny_backbone_dir):
    from supermask.evaluate import evaluate_bundle

    rows = _rows(24, ("neg", "neutral", "pos"))
    test = _write_csv(tmp_path / "test.csv", rows[:12])
    res, b = _run(tmp_path, tiny_backbone_dir, train_file=_write_csv(tmp_path / "t.csv", rows), test_file=test)
    out = evaluate_bundle(res.bundle_path, data_dir="", backbone=str(tiny_backbone_dir), test_file=test, samples=0)
    assert out["split"] == "test" and out["dev_examples"] == 12
    assert out["deterministic"] == pytest.approx(b.header.metrics["deterministic"])
    with pytest.raises(DataError, match="label 'maybe' seen only in test"):
        evaluate_bundle(res.bundle_path, data_dir="", backbone=str(tiny_backbone_dir),
                        test_file=_write_csv(tmp_path / "odd.csv", _rows(4, ("neg", "maybe"))), samples=0)
    with pytest.raises(ValueError, match="--test-file"):
        evaluate_bundle(res.bundle_path, data_dir="", backbone=str(tiny_backbone_dir), samples=0)


def test_train_from_csv_upload_and_serve_the_data_label_names(tmp_path, tiny_backbone_dir, monkeypatch, capsys):
    from backbone import load_backbone
    from service.api.main import create_app
    from service.settings import Settings
    from supermask.client import Client
    from tests.live_server import live_server

    token = "t0ken"
    monkeypatch.setenv("SUPERMASK_ADMIN_TOKEN", token)
    train_file = _write_csv(tmp_path / "reviews.csv", _rows(24, ("negative", "neutral", "positive")))
    settings = Settings(device="cpu", store_dir=tmp_path / "store", examples_dir=None, admin_token=token)
    with live_server(create_app(settings, backbone=load_backbone(tiny_backbone_dir))) as url:
        rc = cli.main(["train", "--train-file", train_file, "--backbone", str(tiny_backbone_dir), "--max-steps", "3",
                       "--batch-size", "4", "--max-seq-length", "16", "--head-refit-steps", "5", "--no-scores",
                       "-o", str(tmp_path / "reviews.smask"), "--upload", url])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        assert "uploaded task 'reviews'" in captured.err.strip().splitlines()[-1]
        with Client(url) as c:
            got = c.predict("reviews", ["a lovely film", "a dull film"], top_k=3)
    assert {p.label for p in got.predictions} <= {"negative", "neutral", "positive"}
    assert sorted(s.label for s in got.predictions[0].top) == ["negative", "neutral", "positive"]


def test_train_final_line_says_where_the_bundle_is_and_how_to_serve_it(tmp_path, tiny_backbone_dir, capsys):
    f = _write_csv(tmp_path / "t.csv", _rows(12))
    rc = cli.main(["train", "mine", "--train-file", f, "--backbone", str(tiny_backbone_dir), "--max-steps", "2",
                   "--batch-size", "4", "--max-seq-length", "16", "--head-refit-steps", "5", "--no-scores",
                   "--no-linear-probe", "--no-early-stopping", "-o", str(tmp_path / "masks" / "mine.smask")])
    captured = capsys.readouterr()
    assert rc == 0
    last = captured.err.strip().splitlines()[-1]
    assert str(tmp_path / "masks" / "mine.smask") in last and "supermask serve --store-dir" in last
    summary = json.loads(captured.out)
    assert summary["reported_on"] == "heldout" and summary["linear_probe"] == {}


def test_a_backbone_without_a_bert_encoder_layout_is_refused_in_one_line(tmp_path, capsys):
    """DistilBERT keeps its layers under ``transformer``, not ``encoder``: a clear refusal, nothing written."""
    from transformers import DistilBertConfig, DistilBertModel

    from tests.conftest import tokenizer_dir
    from transformers import AutoTokenizer

    folder = tmp_path / "tiny-distilbert"
    DistilBertModel(DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                     max_position_embeddings=64)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True).save_pretrained(folder)
    f = _write_csv(tmp_path / "t.csv", _rows(8))
    rc = cli.main(["train", "--train-file", f, "--backbone", str(folder), "--max-steps", "1",
                   "-o", str(tmp_path / "out" / "t.smask")])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' own loading bar
    assert rc == 2 and last.startswith("supermask train: error: ") and "expected a BERT-family encoder" in last
    assert not (tmp_path / "out" / "t.smask").exists()


def test_a_failed_upload_keeps_the_bundle_and_says_how_to_retry(tmp_path, tiny_backbone_dir, capsys):
    from tests.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    f = _write_csv(tmp_path / "t.csv", _rows(12))
    rc = cli.main(["train", "mine", "--train-file", f, "--backbone", str(tiny_backbone_dir), "--max-steps", "1",
                   "--batch-size", "4", "--max-seq-length", "16", "--head-refit-steps", "5", "--no-scores",
                   "--no-linear-probe", "--no-early-stopping", "-o", str(tmp_path / "mine.smask"), "--upload", url])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and (tmp_path / "mine.smask").is_file()
    assert last.startswith("supermask train: error: wrote ") and f"supermask upload {tmp_path / 'mine.smask'}" in last


def test_any_local_bert_encoder_trains_and_a_server_on_another_backbone_refuses_its_bundle(tmp_path, tiny_backbone,
                                                                                          tiny_backbone_dir):
    """A BERT-layout encoder of another size (as e5 / bge-style BERT encoders are) trains from a CSV; its bundle
    names that backbone, and the store of a server on the default tiny backbone refuses it."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mask_store.errors import BackboneMismatch
    from mask_store.local import LocalMaskStore

    other = tmp_path / "other-bert"
    torch.manual_seed(1)
    BertModel(BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                         intermediate_size=96, max_position_embeddings=64)).save_pretrained(other)
    AutoTokenizer.from_pretrained(str(tiny_backbone_dir), local_files_only=True).save_pretrained(other)
    res, b = _run(tmp_path, other, train_file=_write_csv(tmp_path / "t.csv", _rows(12)), linear_probe=False,
                  early_stopping=False)
    assert len(b.header.masks) == 3 * 6 and b.header.backbone_fingerprint != tiny_backbone.fingerprint
    store = LocalMaskStore(tmp_path / "store")
    with pytest.raises(BackboneMismatch):
        store.put("toy", open(res.bundle_path, "rb").read(), tiny_backbone.fingerprint)
    assert store.tasks() == []


def test_an_interrupted_run_resumes_from_its_run_folder_and_ends_as_an_uninterrupted_one(tmp_path, tiny_backbone_dir,
                                                                                         monkeypatch):
    import training.loop
    from training.trainer import train

    f = _write_csv(tmp_path / "t.csv", _rows(20))
    kw = dict(train_file=f, max_steps=None, epochs=4.0, scale_schedule=False, patience=10, save_scores=False)
    whole = train(_cfg(tmp_path / "a", tiny_backbone_dir, **kw), progress=False)  # 5 steps an epoch, 20 steps

    calls = {"n": 0}
    real_encode = training.loop.encode

    def ctrl_c_in_epoch_3(*a, **k):  # batches encoded: 5 per epoch, then 1 held-out evaluation; the 15th is
        calls["n"] += 1             # epoch 3's third, after the checkpoint of epoch 2
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return real_encode(*a, **k)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(training.loop, "encode", ctrl_c_in_epoch_3)
    cut = train(_cfg(tmp_path / "b", tiny_backbone_dir, run_dir=str(run_dir), **kw), progress=False)
    monkeypatch.setattr(training.loop, "encode", real_encode)
    assert cut.interrupted and cut.steps == 12 and (run_dir / "checkpoint.pt").is_file()

    with pytest.raises(ValueError, match="differing: head_lr"):
        train(_cfg(tmp_path / "c", tiny_backbone_dir, run_dir=str(run_dir), head_lr=0.5, **kw), progress=False)
    resumed = train(_cfg(tmp_path / "b", tiny_backbone_dir, run_dir=str(run_dir), **kw), progress=False)
    assert not resumed.interrupted and resumed.steps == whole.steps == 20
    assert resumed.losses == whole.losses  # the steps an uninterrupted run takes
    a = decode_bundle(open(whole.bundle_path, "rb").read())
    b = decode_bundle(open(resumed.bundle_path, "rb").read())
    for m in a.header.masks:
        assert np.array_equal(a.mask_array(m.name), b.mask_array(m.name))
    for k in a.head:
        assert np.array_equal(np.array(a.head[k]), np.array(b.head[k]))
    assert not (run_dir / "checkpoint.pt").exists()  # complete: nothing left to resume


def test_evaluate_command_on_a_test_file_skips_bernoulli_samples_by_default(tmp_path, tiny_backbone_dir, capsys):
    rows = _rows(16)
    test = _write_csv(tmp_path / "test.csv", rows[:8])
    res, _ = _run(tmp_path, tiny_backbone_dir, train_file=_write_csv(tmp_path / "t.csv", rows), test_file=test,
                  save_scores=True, linear_probe=False)
    assert (tmp_path / "toy.smask.scores.safetensors").is_file()
    capsys.readouterr()
    assert cli.main(["evaluate", res.bundle_path, "--test-file", test, "--backbone", str(tiny_backbone_dir)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "test" and "bernoulli" not in out and set(out["deterministic"]) == {"accuracy", "macro_f1",
                                                                                                  "mcc"}
    assert out["deterministic"] == pytest.approx(out["recorded"])


def test_parquet_tsv_and_csv_read_the_same_examples_and_bool_labels_work(tmp_path):
    import datasets

    rows = _rows(10, ("neg", "neutral", "pos"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    got = [load_task_data("t", train_file=f) for f in (_write_csv(tmp_path / "d.csv", rows),
                                                        _write_csv(tmp_path / "d.tsv", rows, "\t"),
                                                        str(tmp_path / "d.parquet"))]
    for other in got[1:]:
        assert other.task.labels == got[0].task.labels and other.train == got[0].train
    flags = _write_jsonl(tmp_path / "b.jsonl", [{"text": f"row {i}", "label": i % 3 == 0} for i in range(6)])
    assert load_task_data("b", train_file=flags).task.labels == ("False", "True")
