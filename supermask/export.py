"""Export a task as a SetFit model folder: a sentence-transformers body (the backbone with the task's mask
applied to its weights, then mean pooling) and the task head as SetFit's classification head, loadable
offline with ``setfit``, ``sentence-transformers`` or plain ``transformers`` (and, with ``onnx``, ONNX
Runtime) with no code from this project.

The served model is mean pooling + a linear head, which ``BertForSequenceClassification`` (a CLS pooler and
a ``classifier`` of its own) cannot represent: ``AutoModelForSequenceClassification`` / ``pipeline()`` would
load such a folder with a *randomly initialised* classifier and answer wrongly without a word. So the
folder's top-level ``config.json`` is not a transformers config: its ``model_type`` is a sentence saying how
to load the folder, which ``AutoConfig`` (and so every ``AutoModel*`` class and ``pipeline()``) quotes in the
``ValueError`` it raises. The encoder's own config lives in ``0_Transformer/``.

Each masked matrix is written as the served model computes it, ``deq(W_q) ⊙ μ`` (the int8 backbone
de-quantized per output channel, times the task's binary mask; :mod:`backbone`, Radiya-Dixit & Wang 2020
Eq. 3), in float32; every other tensor (embeddings, biases, LayerNorm, pooler) as the backbone checkpoint
holds it. Layout of the folder::

    config.json                         refuses transformers' Auto classes, naming the loaders below
    modules.json                        the sentence-transformers body: 0_Transformer, then 1_Pooling
    0_Transformer/                      the masked BertModel (float32 config.json, model.safetensors), the
                                        tokenizer (model_max_length = the task's max_seq_length),
                                        sentence_bert_config.json
    1_Pooling/config.json               mean pooling over non-padding tokens
    model_head.pkl                      SetFit's head (joblib): scikit-learn LogisticRegression holding the
                                        task head (two labels: the difference of the two rows, so that
                                        sigmoid = the served softmax), LinearRegression for a regression task
    config_setfit.json                  labels (SetFitModel.predict answers label names), no normalisation
    head.safetensors                    the task head as served: classifier.weight [num_outputs, hidden],
                                        classifier.bias [num_outputs], float32
    supermask_task.json                 task, problem type, labels, pairs, max_seq_length, source bundle, fingerprint
    README.md                           the loading recipes
    onnx/model.onnx                     (with ``onnx``) input_ids, attention_mask, token_type_ids int64
                                        [batch, seq] -> logits float32 [batch, num_outputs]

``SetFitModel.from_pretrained(d)``: ``predict_proba`` gives the served probabilities (softmax of the logits),
``predict`` the served label (a regression task: ``predict`` gives the served value).
``SentenceTransformer(d).encode`` gives the mean-pooled embeddings ``[batch, hidden]`` of the masked encoder;
``embeddings @ W.T + b`` with ``head.safetensors`` gives the logits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from mask_store.errors import BackboneMismatch, BundleInvalid, TaskNotFound
from mask_store.format import HEAD_BIAS, HEAD_WEIGHT, Bundle, decode_bundle
from mask_store.local import LocalMaskStore

log = logging.getLogger(__name__)


def load_source(source: str | os.PathLike, store_dir: str | os.PathLike) -> tuple[Bundle, str]:
    """The bundle ``source`` names: a bundle file, else a task in the store at ``store_dir``.

    Returns:
        ``(bundle, sha256 of its bytes)``.
    Raises:
        TaskNotFound, InvalidTaskName: not a file and not a stored task; FileNotFoundError: not a file and
        no store at ``store_dir``. BundleInvalid: it does not validate.
    """
    path = Path(source)
    if path.is_file():
        data = path.read_bytes()
    elif not Path(store_dir).is_dir():
        raise FileNotFoundError(f"{source} is not a bundle file, and the store {store_dir} does not exist")
    else:
        try:
            data = LocalMaskStore(store_dir).path(str(source)).read_bytes()  # path(): InvalidTaskName
        except FileNotFoundError:
            raise TaskNotFound(str(source)) from None
    return decode_bundle(data), hashlib.sha256(data).hexdigest()


def masked_model(bundle: Bundle, backbone_path: str | os.PathLike | None = None):
    """The backbone checkpoint with ``bundle``'s masks applied: ``(model, tokenizer, backbone)``.

    ``model`` is a ``transformers`` encoder (float32, pooler kept) whose masked matrices hold
    ``deq(W_q) ⊙ μ``; ``backbone`` the quantized :class:`backbone.Backbone` the fingerprint was checked on.

    Raises:
        BackboneMismatch: the bundle was trained for another backbone. BundleInvalid: it masks a matrix
            the backbone does not have. BackboneLoadError: the backbone cannot be loaded.
    """
    import torch

    from backbone import dequantize, load_backbone, load_encoder_folder

    bb = load_backbone(backbone_path)
    h = bundle.header
    if h.backbone_fingerprint != bb.fingerprint:
        raise BackboneMismatch(h.backbone_fingerprint, bb.fingerprint)
    model, tokenizer, _ = load_encoder_folder(backbone_path)  # a second copy: with the checkpoint's pooler
    model.eval()
    expected = {f"{n}.weight": n for n in bb.masked}
    unknown = sorted({m.name for m in h.masks} - set(expected))
    if unknown:
        raise BundleInvalid(f"bundle masks matrices this backbone does not have: {unknown[:3]}")
    with torch.no_grad():
        for n in bb.masked:  # every masked matrix as served: deq(W_q), times the mask where the bundle has one
            w = dequantize(bb.qweight[n], bb.scale[n])
            if f"{n}.weight" in bundle.masks:
                w = w * torch.from_numpy(bundle.mask_array(f"{n}.weight"))
            model.get_submodule(n).weight.copy_(w)
    return model, tokenizer, bb


BODY_DIR = "0_Transformer"
"""Subfolder of the encoder (config, weights, tokenizer): the top-level config.json is the refusal."""
HEAD_FILE = "head.safetensors"
SETFIT_HEAD_FILE = "model_head.pkl"  # setfit.modeling.MODEL_HEAD_NAME
SETFIT_CONFIG_FILE = "config_setfit.json"  # setfit.modeling.CONFIG_NAME


def refusal(task: str) -> str:
    """The top-level ``config.json``'s ``model_type``: what transformers quotes when asked to load the folder."""
    return (f"supermask-setfit-export (task {task}: mean pooling + a linear head, not a transformers sequence "
            "classifier; AutoModelForSequenceClassification and pipeline() would answer with a random "
            "classifier). Load this folder with setfit.SetFitModel.from_pretrained(FOLDER) (predict / "
            "predict_proba), its body with sentence_transformers.SentenceTransformer(FOLDER), or the encoder "
            f"with AutoModel.from_pretrained(FOLDER, subfolder='{BODY_DIR}'); recipes in FOLDER/README.md")


def _readme(h, has_onnx: bool) -> str:
    pairs = h.text_pairs
    rows = '[("A man is dancing.", "A man dances.")]' if pairs else '["a charming and often affecting journey"]'
    lines = [
        f"# {h.task}: a supermask task exported as a SetFit model", "",
        f"Problem type `{h.problem_type}`" + (f", labels {h.labels}" if h.labels else "")
        + f"; inputs are {'sentence pairs' if pairs else 'single texts'}, at most {h.max_seq_length} tokens. "
        f"The encoder (`{BODY_DIR}/`) holds the int8 backbone de-quantized and multiplied by the task's binary "
        "mask; mean pooling over non-padding tokens, then the task head, gives the served logits. "
        "`transformers`' `AutoModelForSequenceClassification` and `pipeline()` cannot represent that model (they "
        "would add a random classifier), so the folder's `config.json` makes them fail with a message naming "
        "the loaders below.", "",
        "## SetFit", "", "```python",
        "from setfit import SetFitModel",
        "model = SetFitModel.from_pretrained(FOLDER)",
    ]
    if h.problem_type == "regression":
        lines += [f"model.predict({rows})   # the served value"]
    else:
        lines += [f"model.predict({rows})         # the served label",
                  f"model.predict_proba({rows})   # the served scores, in the order of model.labels"]
    lines += [
        "```", "",
        "## sentence-transformers (the body: mean-pooled embeddings)", "", "```python",
        "import safetensors.torch",
        "from sentence_transformers import SentenceTransformer",
        "model = SentenceTransformer(FOLDER, device='cpu')",
        f"emb = model.encode({rows}, convert_to_tensor=True)   # [batch, hidden]",
        f"head = safetensors.torch.load_file(f'{{FOLDER}}/{HEAD_FILE}')",
        "logits = emb @ head['classifier.weight'].T + head['classifier.bias']",
        "```", "", "## transformers (no trust_remote_code)", "", "```python",
        "import torch, safetensors.torch",
        "from transformers import AutoModel, AutoTokenizer",
        f"tok = AutoTokenizer.from_pretrained(FOLDER, subfolder='{BODY_DIR}')",
        f"enc = AutoModel.from_pretrained(FOLDER, subfolder='{BODY_DIR}').eval()",
        f"head = safetensors.torch.load_file(f'{{FOLDER}}/{HEAD_FILE}')",
        (f"x = tok([a for a, b in {rows}], [b for a, b in {rows}], padding=True, truncation=True, "
         "return_tensors='pt')") if pairs else f"x = tok({rows}, padding=True, truncation=True, return_tensors='pt')",
        "with torch.no_grad():",
        "    h = enc(**x).last_hidden_state",
        "m = x['attention_mask'].unsqueeze(-1).float()",
        "logits = ((h * m).sum(1) / m.sum(1).clamp(min=1)) @ head['classifier.weight'].T + head['classifier.bias']",
        "```", ""]
    if h.problem_type != "regression":
        lines += ["`logits.softmax(-1)` gives the probabilities of the labels, in the order of "
                  "`supermask_task.json`'s `labels`.", ""]
    if has_onnx:
        lines += ["## ONNX Runtime", "", "`onnx/model.onnx`: inputs `input_ids`, `attention_mask`, `token_type_ids` "
                  f"(int64 `[batch, seq]`, from the tokenizer in `{BODY_DIR}/` with `return_tensors='np'`), output "
                  "`logits` (float32 `[batch, num_outputs]`).", ""]
    return "\n".join(lines)


def setfit_head(head_w, head_b, problem_type: str):
    """SetFit's head (``model_head.pkl``) holding the task head ``W [n, hidden]``, ``b [n]`` (float32 numpy).

    Classification: a fitted-state scikit-learn ``LogisticRegression`` (SetFit's default head), ``classes_``
    ``0 .. n-1`` (``config_setfit.json``'s labels name them). Its ``predict_proba`` is the softmax of
    ``X @ coef_.T + intercept_`` for n > 2, and for n = 2 ``[1 - σ(d), σ(d)]`` with one row
    ``d = X @ (W[1] - W[0]) + (b[1] - b[0])``, which is ``softmax(X @ W.T + b)`` exactly (scikit-learn's
    binary convention). Regression (n = 1): a ``LinearRegression`` with ``coef_ = W[0]``, ``intercept_ = b[0]``,
    whose ``predict`` is the served value.
    """
    import numpy as np
    from sklearn.linear_model import LinearRegression, LogisticRegression

    w, b = np.asarray(head_w, dtype=np.float64), np.asarray(head_b, dtype=np.float64)
    n, hidden = w.shape
    if problem_type == "regression":
        head = LinearRegression()
        head.coef_, head.intercept_ = w[0].copy(), float(b[0])
    else:
        head = LogisticRegression()
        if n == 2:
            head.coef_, head.intercept_ = (w[1] - w[0])[None, :], np.array([b[1] - b[0]])
        else:
            head.coef_, head.intercept_ = w.copy(), b.copy()
        head.classes_ = np.arange(n)
        head.n_iter_ = np.zeros(1, dtype=np.int32)
    head.n_features_in_ = hidden
    return head


def _export_onnx(model, head_w, head_b, tokenizer, out: Path, opset: int = 17) -> Path:
    """``out/onnx/model.onnx``: encoder + mean pooling + head (TorchScript exporter, dynamic batch and length)."""
    import warnings

    import torch

    from backbone import mean_pool

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = model
            self.head = torch.nn.Linear(head_w.shape[1], head_w.shape[0])
            self.head.weight.data, self.head.bias.data = head_w, head_b

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            return self.head(mean_pool(hidden, attention_mask))

    enc = tokenizer(["an example sentence", "another"], padding=True, return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids", torch.zeros_like(enc["input_ids"])))
    path = out / "onnx" / "model.onnx"
    path.parent.mkdir()
    kwargs = dict(input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["logits"],
                  dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                "token_type_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch"}},
                  opset_version=opset)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings, the TorchScript exporter's deprecation notice
        try:
            torch.onnx.export(Classifier().eval(), args, str(path), dynamo=False, **kwargs)
        except TypeError:  # torch < 2.5: no `dynamo` argument
            torch.onnx.export(Classifier().eval(), args, str(path), **kwargs)
    return path


def export_task(source: str | os.PathLike, out_dir: str | os.PathLike, *, store_dir: str | os.PathLike = "./masks",
                backbone_path: str | os.PathLike | None = None, onnx: bool = False, force: bool = False) -> dict:
    """Write the SetFit model folder of a task (layout in the module docstring).

    Args:
        source: a bundle file, or the name of a task in the store at ``store_dir``.
        out_dir: the folder to create; it must not exist or be empty, unless ``force`` (then replaced).
        backbone_path: the backbone the bundle was trained on (None: all-MiniLM-L6-v2).
        onnx: also write ``onnx/model.onnx`` (needs the ``onnx`` package).

    Returns:
        The contents of ``supermask_task.json`` (with ``"folder"``).
    Raises:
        FileExistsError: ``out_dir`` holds files and ``force`` is off. As :func:`load_source` and
        :func:`masked_model`. ImportError: ``onnx`` without the onnx package. The folder is written
        under a temporary name beside ``out_dir`` and renamed when complete: a failed export leaves nothing.
    """
    import joblib  # scikit-learn's dependency, as scikit-learn is sentence-transformers'
    import torch
    from safetensors.torch import save_file

    from service import __version__

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out} exists and is not an empty folder (use --force to replace it)")
    if onnx:  # fail before any work
        import importlib.util

        if importlib.util.find_spec("onnx") is None:
            raise ImportError("--onnx needs the onnx package: pip install onnx onnxruntime (or the 'bench' extra)")
    bundle, sha = load_source(source, store_dir)
    h = bundle.header
    model, tokenizer, bb = masked_model(bundle, backbone_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        body = tmp / BODY_DIR
        model.save_pretrained(body, safe_serialization=True)
        tokenizer.model_max_length = h.max_seq_length
        tokenizer.save_pretrained(body)
        (body / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": h.max_seq_length,
                                                                    "do_lower_case": False}, indent=2))
        hidden = int(model.config.hidden_size)
        head_w = torch.from_numpy(bundle.head[HEAD_WEIGHT].copy())
        head_b = torch.from_numpy(bundle.head[HEAD_BIAS].copy())
        (tmp / "1_Pooling").mkdir()
        (tmp / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True},
            indent=2))
        (tmp / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": BODY_DIR, "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}],
            indent=2))
        save_file({HEAD_WEIGHT: head_w.contiguous(), HEAD_BIAS: head_b.contiguous()}, str(tmp / HEAD_FILE))
        joblib.dump(setfit_head(bundle.head[HEAD_WEIGHT], bundle.head[HEAD_BIAS], h.problem_type),
                    tmp / SETFIT_HEAD_FILE)
        (tmp / SETFIT_CONFIG_FILE).write_text(json.dumps({"labels": list(h.labels) or None,
                                                          "normalize_embeddings": False}, indent=2))
        (tmp / "config.json").write_text(json.dumps({
            "model_type": refusal(h.task),
            "supermask_export": "a SetFit model folder; see README.md and supermask_task.json"}, indent=2))
        if onnx:
            _export_onnx(model, head_w, head_b, tokenizer, tmp)
        info = {"task": h.task, "problem_type": h.problem_type, "labels": h.labels, "text_pairs": h.text_pairs,
                "max_seq_length": h.max_seq_length, "num_outputs": h.num_outputs, "pooling": "mean",
                "encoder": BODY_DIR, "head": HEAD_FILE, "setfit_head": SETFIT_HEAD_FILE,
                "onnx": "onnx/model.onnx" if onnx else None,
                "sparsity": h.sparsity, "source_bundle_sha256": sha, "backbone": bb.name,
                "backbone_fingerprint": bb.fingerprint, "exported_by": f"supermask-server {__version__}",
                "weights": "masked matrices = deq(W_q) * mask (float32); other tensors as in the backbone checkpoint"}
        (tmp / "supermask_task.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(h, onnx))
        for p in tmp.rglob("*"):  # mkdtemp made the folder private; the model is for others to read
            p.chmod(0o755 if p.is_dir() else 0o644)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported task %s to %s", h.task, out)
    return {**info, "folder": str(out)}
