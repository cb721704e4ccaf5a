"""Export a task as a plain Hugging Face folder: the backbone with the task's mask applied to its weights,
plus the task head, loadable offline by ``transformers`` or ``sentence-transformers`` (and, with ``onnx``,
ONNX Runtime) with no code from this project.

Each masked matrix is written as the served model computes it, ``deq(W_q) ⊙ μ`` (the int8 backbone
de-quantized per output channel, times the task's binary mask; :mod:`backbone`, Radiya-Dixit & Wang 2020
Eq. 3), in float32; every other tensor (embeddings, biases, LayerNorm, pooler) as the backbone checkpoint
holds it. Layout of the folder (a sentence-transformers model)::

    config.json, model.safetensors      the masked BertModel (float32); config.json has id2label / label2id
    tokenizer files                     the backbone's tokenizer, model_max_length = the task's max_seq_length
    modules.json, sentence_bert_config.json
    1_Pooling/config.json               mean pooling over non-padding tokens
    2_Dense/config.json, model.safetensors   the task head: linear.weight [num_outputs, hidden], linear.bias,
                                        identity activation, so SentenceTransformer.encode returns the logits
    supermask_task.json                 task, problem type, labels, pairs, max_seq_length, source bundle, fingerprint
    README.md                           the loading recipes
    onnx/model.onnx                     (with ``onnx``) input_ids, attention_mask, token_type_ids int64
                                        [batch, seq] -> logits float32 [batch, num_outputs]

Plain ``transformers`` (no ``trust_remote_code``): ``AutoModel`` + mean pooling + the head::

    tok, enc = AutoTokenizer.from_pretrained(d), AutoModel.from_pretrained(d)
    head = safetensors.torch.load_file(f"{d}/2_Dense/model.safetensors")
    x = tok(texts, padding=True, truncation=True, return_tensors="pt")
    h = enc(**x).last_hidden_state; m = x["attention_mask"].unsqueeze(-1).float()
    logits = ((h * m).sum(1) / m.sum(1).clamp(min=1)) @ head["linear.weight"].T + head["linear.bias"]
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
from mask_store.format import Bundle, decode_bundle
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


def _readme(h, has_onnx: bool) -> str:
    pairs = h.text_pairs
    example = '[["A man is dancing.", "A man dances."]]' if pairs else '["a charming and often affecting journey"]'
    lines = [
        f"# {h.task}: a supermask task exported as a plain model", "",
        f"Problem type `{h.problem_type}`" + (f", labels {h.labels}" if h.labels else "")
        + f"; inputs are {'sentence pairs' if pairs else 'single texts'}, at most {h.max_seq_length} tokens. "
        "The encoder's masked matrices hold the int8 backbone de-quantized and multiplied by the task's binary "
        "mask; the head is `2_Dense`. Mean pooling over non-padding tokens, then the head, gives the logits.", "",
        "## sentence-transformers", "", "```python",
        "from sentence_transformers import SentenceTransformer",
        "model = SentenceTransformer(FOLDER, device='cpu')",
        f"logits = model.encode({example}, convert_to_tensor=True)",
        "```", "", "## transformers (no trust_remote_code)", "", "```python",
        "import torch, safetensors.torch",
        "from transformers import AutoModel, AutoTokenizer",
        "tok, enc = AutoTokenizer.from_pretrained(FOLDER), AutoModel.from_pretrained(FOLDER).eval()",
        "head = safetensors.torch.load_file(f'{FOLDER}/2_Dense/model.safetensors')",
        (f"x = tok([a for a, b in {example}], [b for a, b in {example}], padding=True, truncation=True, "
         "return_tensors='pt')") if pairs else f"x = tok({example}, padding=True, truncation=True, return_tensors='pt')",
        "with torch.no_grad():",
        "    h = enc(**x).last_hidden_state",
        "m = x['attention_mask'].unsqueeze(-1).float()",
        "logits = ((h * m).sum(1) / m.sum(1).clamp(min=1)) @ head['linear.weight'].T + head['linear.bias']",
        "```", ""]
    if h.problem_type != "regression":
        lines += ["`logits.softmax(-1)` gives the probabilities of `config.id2label`'s labels.", ""]
    if has_onnx:
        lines += ["## ONNX Runtime", "", "`onnx/model.onnx`: inputs `input_ids`, `attention_mask`, `token_type_ids` "
                  "(int64 `[batch, seq]`, from the tokenizer above with `return_tensors='np'`), output `logits` "
                  "(float32 `[batch, num_outputs]`).", ""]
    return "\n".join(lines)


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
    """Write the Hugging Face folder of a task (layout in the module docstring).

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
        if h.labels:
            model.config.id2label = dict(enumerate(h.labels))
            model.config.label2id = {lab: i for i, lab in enumerate(h.labels)}
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.model_max_length = h.max_seq_length
        tokenizer.save_pretrained(tmp)
        hidden = int(model.config.hidden_size)
        head_w = torch.from_numpy(bundle.head["classifier.weight"].copy())
        head_b = torch.from_numpy(bundle.head["classifier.bias"].copy())
        (tmp / "1_Pooling").mkdir()
        (tmp / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True},
            indent=2))
        (tmp / "2_Dense").mkdir()
        (tmp / "2_Dense" / "config.json").write_text(json.dumps({
            "in_features": hidden, "out_features": h.num_outputs, "bias": True,
            "activation_function": "torch.nn.modules.linear.Identity"}, indent=2))
        save_file({"linear.weight": head_w.contiguous(), "linear.bias": head_b.contiguous()},
                  str(tmp / "2_Dense" / "model.safetensors"))
        (tmp / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}], indent=2))
        (tmp / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": h.max_seq_length,
                                                                   "do_lower_case": False}, indent=2))
        if onnx:
            _export_onnx(model, head_w, head_b, tokenizer, tmp)
        info = {"task": h.task, "problem_type": h.problem_type, "labels": h.labels, "text_pairs": h.text_pairs,
                "max_seq_length": h.max_seq_length, "num_outputs": h.num_outputs, "pooling": "mean",
                "head": "2_Dense/model.safetensors", "onnx": "onnx/model.onnx" if onnx else None,
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
