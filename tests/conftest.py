"""Shared fixtures: a tiny random BERT saved as a local Hugging Face folder, bundles made for it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Servers built from Settings() in tests compute in the reference precision unless a test asks for another
# (the server's own default, "auto", picks int8 or bf16 by the CPU; tests/unit/test_precision.py covers those).
os.environ.setdefault("SUPERMASK_CPU_PRECISION", "fp32")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# Without a GPU, the Triton kernels run under Triton's interpreter on the CPU, so their logic is still
# tested; this must be set before triton is first imported.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = REPO.parent / "shared" / "data" / "glue"
EXAMPLES_DIR = REPO / "examples" / "masks"


def tokenizer_dir() -> Path:
    """Where the tests read the uncased BERT tokenizer: ``$SUPERMASK_TEST_TOKENIZER_DIR`` if set (a machine
    without the backbone package, e.g. an offline GPU machine: scripts/gpu_check.sh), else the folder of the
    default backbone package. Skips the calling test when neither is there."""
    from backbone import BackboneLoadError, default_backbone_path

    override = os.environ.get("SUPERMASK_TEST_TOKENIZER_DIR")
    if override:
        if not Path(override).is_dir():
            pytest.skip(f"SUPERMASK_TEST_TOKENIZER_DIR={override} is not a folder")
        return Path(override)
    try:
        return default_backbone_path()
    except BackboneLoadError as exc:
        pytest.skip(f"no tokenizer for the tiny backbone: {exc}; or set SUPERMASK_TEST_TOKENIZER_DIR")


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 random BertModel with the real uncased BERT tokenizer, saved to a folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir()), local_files_only=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    model = BertModel(cfg)
    folder = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_backbone(tiny_backbone_dir):
    """A fresh quantized tiny backbone (each test gets its own modules)."""
    from backbone import load_backbone

    return load_backbone(tiny_backbone_dir)


def free_port() -> int:
    """A free loopback port (the OS's choice) for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_store(backbone, root, sparsities: dict[str, float]):
    """A :class:`mask_store.local.LocalMaskStore` at ``root`` holding one random-mask bundle per ``task: sparsity``
    (seeds 1, 2, ... in order)."""
    from mask_store.local import LocalMaskStore

    store = LocalMaskStore(root)
    for i, (task, sparsity) in enumerate(sparsities.items()):
        store.put(task, make_bundle(backbone, task=task, sparsity=sparsity, seed=i + 1))
    return store


def make_bundle(backbone, task: str = "toy", sparsity: float = 0.05, labels=("neg", "pos"), seed: int = 0,
                text_pairs: bool = False, fingerprint: str | None = None, max_seq_length: int = 32) -> bytes:
    """Encode a bundle with random masks of the given sparsity and a random head for ``backbone``."""
    from mask_store.format import HEAD_BIAS, HEAD_WEIGHT, encode_bundle

    rng = np.random.default_rng(seed)
    masks = {f"{n}.weight": rng.random(tuple(backbone.qweight[n].shape)) >= sparsity for n in backbone.masked}
    n_out = len(labels) if labels else 1
    head = {HEAD_WEIGHT: rng.normal(size=(n_out, backbone.hidden_size)).astype(np.float32),
            HEAD_BIAS: rng.normal(size=(n_out,)).astype(np.float32)}
    return encode_bundle(task=task, problem_type="single_label_classification" if labels else "regression",
                         labels=list(labels), max_seq_length=max_seq_length, backbone_fingerprint=fingerprint or backbone.fingerprint,
                         masks=masks, head=head, text_pairs=text_pairs, training={"test": True})


def write_glue(root: Path, n: int = 12) -> str:
    """A tiny GLUE folder under ``root`` (created) with SST-2 and MRPC in the original TSV layout, ``n`` rows in
    each of train.tsv and dev.tsv; returns ``str(root)``."""
    sst = root / "SST-2"
    sst.mkdir(parents=True)
    mrpc = root / "MRPC"
    mrpc.mkdir()
    words = ["good", "bad", "fine", "awful", "great", "dull"]
    for split in ("train", "dev"):
        rows = ["sentence\tlabel"] + [f"a {words[i % 6]} film number {i}\t{i % 2}" for i in range(n)]
        (sst / f"{split}.tsv").write_text("\n".join(rows) + "\n")
        rows = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"] + [
            f"{int(i % 3 != 0)}\t{i}\t{i + 100}\tthe cat {i} sat\ta cat {i} sat down" for i in range(n)]
        (mrpc / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return str(root)
