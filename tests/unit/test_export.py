"""supermask export: the exported SetFit folder answers as the engine and the server do, with every loader
the README names (SetFit, sentence-transformers, plain transformers with mean pooling, ONNX Runtime), and
transformers' sequence-classification loaders, which would answer with a random classifier, refuse it;
failures leave nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from mask_store.errors import BackboneMismatch, TaskNotFound
from mask_store.local import LocalMaskStore
from service.engine import Engine
from service.metrics import Metrics
from supermask import cli
from supermask.export import export_task
from tests.conftest import EXAMPLES_DIR, make_bundle

TEXTS = ["a lovely film", "a dreadful , overlong film that goes nowhere", "fine"]
PAIRS = [("a man is dancing", "a man dances"), ("the sky is blue today", "a bowl of soup")]


def engine_logits(backbone_dir, bundle: bytes, task: str, rows, tmp_path) -> np.ndarray:
    """The reference: the serving engine's head outputs (fp32) on a freshly loaded backbone."""
    from backbone import load_backbone

    store = LocalMaskStore(tmp_path / "engine-store")
    store.put(task, bundle)
    engine = Engine(load_backbone(backbone_dir), store, Metrics(), cache_bytes=64 << 20, device="cpu", precision="fp32")
    return engine.logits(task, [(r, None) if isinstance(r, str) else tuple(r) for r in rows]).numpy()


def head_of(folder) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(f"{folder}/head.safetensors")


def recipe_logits(folder, rows) -> np.ndarray:
    """The README's plain-transformers recipe: AutoModel (subfolder 0_Transformer), mean pooling, the head."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, subfolder="0_Transformer")
    enc = AutoModel.from_pretrained(folder, subfolder="0_Transformer").eval()
    head = head_of(folder)
    if isinstance(rows[0], str):
        x = tok(list(rows), padding=True, truncation=True, return_tensors="pt")
    else:
        x = tok([a for a, _ in rows], [b for _, b in rows], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = enc(**x).last_hidden_state
    m = x["attention_mask"].unsqueeze(-1).float()
    return (((h * m).sum(1) / m.sum(1).clamp(min=1)) @ head["classifier.weight"].T + head["classifier.bias"]).numpy()


def body_logits(folder, rows) -> np.ndarray:
    """The README's sentence-transformers recipe: the body's mean-pooled embeddings, then the head."""
    from sentence_transformers import SentenceTransformer

    emb = SentenceTransformer(str(folder), device="cpu").encode(list(rows), convert_to_tensor=True).cpu()
    head = head_of(folder)
    return (emb @ head["classifier.weight"].T + head["classifier.bias"]).numpy()


def assert_transformers_refuses(folder) -> None:
    """AutoModelForSequenceClassification and pipeline() fail, with a message naming the loaders."""
    from transformers import AutoModelForSequenceClassification, pipeline

    for load in (lambda: AutoModelForSequenceClassification.from_pretrained(folder),
                 lambda: pipeline("text-classification", model=str(folder))):
        with pytest.raises(ValueError) as exc:
            load()
        assert "setfit.SetFitModel.from_pretrained(FOLDER)" in str(exc.value)
        assert "subfolder='0_Transformer'" in str(exc.value)


@pytest.mark.parametrize("labels", [("neg", "neutral", "pos"), ("neg", "pos")])
def test_export_answers_as_the_engine(labels, tiny_backbone, tiny_backbone_dir, tmp_path):
    SetFitModel = pytest.importorskip("setfit", reason="setfit (dev extra) loads the export").SetFitModel

    bundle = make_bundle(tiny_backbone, "toy", labels=labels, sparsity=0.3, seed=4)
    src = tmp_path / "toy.smask"
    src.write_bytes(bundle)
    rows = TEXTS + [" ".join(["word"] * 60)]  # the last is cut to the task's 32 tokens by all
    info = export_task(src, tmp_path / "out", backbone_path=tiny_backbone_dir)
    want = engine_logits(tiny_backbone_dir, bundle, "toy", rows, tmp_path)
    out = tmp_path / "out"
    np.testing.assert_allclose(recipe_logits(out, rows), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(body_logits(out, rows), want, rtol=1e-4, atol=1e-5)
    setfit = SetFitModel.from_pretrained(str(out), device="cpu")
    probs = np.asarray(setfit.predict_proba(rows))
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(want), -1).numpy(), rtol=1e-4, atol=1e-6)
    assert list(setfit.predict(rows)) == [labels[k] for k in want.argmax(-1)]
    assert_transformers_refuses(out)
    assert info["task"] == "toy" and info["labels"] == list(labels) and info["max_seq_length"] == 32
    assert json.loads((out / "supermask_task.json").read_text())["source_bundle_sha256"]
    # the masks changed the weights: the unmasked backbone gives other logits
    plain = make_bundle(tiny_backbone, "toy", labels=labels, sparsity=0.0, seed=4)
    assert not np.allclose(engine_logits(tiny_backbone_dir, plain, "toy", rows, tmp_path / "plain"), want, atol=1e-3)


def test_export_of_a_stored_pair_regression_task(tiny_backbone, tiny_backbone_dir, tmp_path):
    bundle = make_bundle(tiny_backbone, "sim", labels=(), text_pairs=True, sparsity=0.2, seed=6)
    LocalMaskStore(tmp_path / "store").put("sim", bundle)
    info = export_task("sim", tmp_path / "out", store_dir=tmp_path / "store", backbone_path=tiny_backbone_dir)
    assert info["problem_type"] == "regression" and info["text_pairs"] and info["num_outputs"] == 1
    want = engine_logits(tiny_backbone_dir, bundle, "sim", PAIRS, tmp_path)
    np.testing.assert_allclose(recipe_logits(tmp_path / "out", PAIRS), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(body_logits(tmp_path / "out", PAIRS), want, rtol=1e-4, atol=1e-5)
    setfit = pytest.importorskip("setfit", reason="setfit (dev extra) loads the export").SetFitModel
    got = np.asarray(setfit.from_pretrained(str(tmp_path / "out"), device="cpu").predict(PAIRS), dtype=np.float32)
    np.testing.assert_allclose(got, want[:, 0], rtol=1e-4, atol=1e-5)  # the served value
    assert_transformers_refuses(tmp_path / "out")


def test_export_onnx(tiny_backbone, tiny_backbone_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime (dev / bench extra) runs the exported graph")
    pytest.importorskip("onnx", reason="onnx (dev / bench extra) writes the graph")
    from transformers import AutoTokenizer

    bundle = make_bundle(tiny_backbone, "toy", sparsity=0.25, seed=2)
    (tmp_path / "toy.smask").write_bytes(bundle)
    info = export_task(tmp_path / "toy.smask", tmp_path / "out", backbone_path=tiny_backbone_dir, onnx=True)
    assert info["onnx"] == "onnx/model.onnx"
    tok = AutoTokenizer.from_pretrained(tmp_path / "out", subfolder="0_Transformer")
    x = tok(TEXTS, padding=True, truncation=True, return_tensors="np")
    session = ort.InferenceSession(str(tmp_path / "out" / "onnx" / "model.onnx"))
    got = session.run(["logits"], {k: x[k].astype(np.int64) for k in ("input_ids", "attention_mask",
                                                                        "token_type_ids")})[0]
    np.testing.assert_allclose(got, engine_logits(tiny_backbone_dir, bundle, "toy", TEXTS, tmp_path), rtol=1e-4,
                               atol=1e-5)


def test_failed_exports_leave_nothing(tiny_backbone, tiny_backbone_dir, tmp_path):
    wrong = tmp_path / "wrong.smask"
    wrong.write_bytes(make_bundle(tiny_backbone, "toy", fingerprint="0" * 64))
    with pytest.raises(BackboneMismatch):
        export_task(wrong, tmp_path / "out" / "a", backbone_path=tiny_backbone_dir)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(TaskNotFound):
        export_task("nope", tmp_path / "b", store_dir=tmp_path, backbone_path=tiny_backbone_dir)
    with pytest.raises(FileNotFoundError):
        export_task("nope", tmp_path / "b", store_dir=tmp_path / "no-store", backbone_path=tiny_backbone_dir)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    ok = tmp_path / "toy.smask"
    ok.write_bytes(make_bundle(tiny_backbone, "toy"))
    with pytest.raises(FileExistsError):
        export_task(ok, tmp_path / "full", backbone_path=tiny_backbone_dir)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    export_task(ok, tmp_path / "full", backbone_path=tiny_backbone_dir, force=True)
    assert not (tmp_path / "full" / "keep.txt").exists() and (tmp_path / "full" / "head.safetensors").is_file()


def test_cli_export(tiny_backbone, tiny_backbone_dir, tmp_path, capsys):
    (tmp_path / "toy.smask").write_bytes(make_bundle(tiny_backbone, "toy"))
    args = ["export", str(tmp_path / "toy.smask"), "-o", str(tmp_path / "out"), "--backbone", str(tiny_backbone_dir)]
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["folder"] == str(tmp_path / "out")
    assert cli.main(args) == 2 and "--force" in capsys.readouterr().err


def test_export_of_a_shipped_task_matches_the_server(tmp_path):
    """The real backbone and the shipped SST-2 bundle: every loader of the export answers with the served
    probabilities and labels; transformers' classification loaders refuse it."""
    from fastapi.testclient import TestClient

    SetFitModel = pytest.importorskip("setfit", reason="setfit (dev extra) loads the export").SetFitModel

    from backbone import BackboneLoadError, default_backbone_path
    from service.api.main import create_app
    from service.settings import Settings

    try:
        default_backbone_path()
    except BackboneLoadError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "sst2"
    export_task(EXAMPLES_DIR / "SST-2.smask", out)
    texts = ["a charming and often affecting journey", "dull and lifeless", "it is " + "very " * 200 + "bad"]
    settings = Settings(device="cpu", cpu_precision="fp32", store_dir=tmp_path / "store", examples_dir=EXAMPLES_DIR)
    with TestClient(create_app(settings)) as client:
        served = client.post("/v1/tasks/SST-2/predict", json={"inputs": texts}).json()["predictions"]
    assert [p.get("truncated", False) for p in served] == [False, False, True]
    want = np.array([[p["scores"]["negative"], p["scores"]["positive"]] for p in served])
    setfit = SetFitModel.from_pretrained(str(out), device="cpu")
    assert setfit.labels == ["negative", "positive"]
    np.testing.assert_allclose(np.asarray(setfit.predict_proba(texts)), want, rtol=1e-4, atol=1e-5)
    assert list(setfit.predict(texts)) == [p["label"] for p in served]
    for logits in (body_logits(out, texts), recipe_logits(out, texts)):
        np.testing.assert_allclose(torch.softmax(torch.from_numpy(logits), -1).numpy(), want, rtol=1e-4, atol=1e-5)
    assert_transformers_refuses(out)
