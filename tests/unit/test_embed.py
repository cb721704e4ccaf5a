"""Engine.embed on every tier: the plain backbone's mean-pooled embeddings (sentence-transformers' mean pooling of
the model's own forward), and through a task's mask exactly the vectors its head reads (head(embed) == logits)."""

from __future__ import annotations

import pytest
import torch

from backbone import load_backbone, mean_pool
from mask_store.local import LocalMaskStore
from service.engine import Engine
from service.errors import InputInvalid
from service.metrics import Metrics
from tests.conftest import make_bundle

ROWS = [("a lovely film", None), ("a dreadful , overlong film that goes on", None), ("fine", None)]

TIERS = [
    pytest.param({"precision": "fp32"}, 1e-4, id="fp32"),
    pytest.param({"precision": "bf16"}, 5e-2, id="bf16"),
    pytest.param({"precision": "int8", "runtime": "torch"}, 5e-2, id="int8-torch"),
    pytest.param({"precision": "int8", "runtime": "onnxruntime"}, 5e-2, id="int8-onnxruntime"),
    pytest.param({"emulate_device_path": "gpu_complement"}, 1e-4, id="device-tier-emulated"),
]


@pytest.fixture
def store(tiny_backbone, tmp_path) -> LocalMaskStore:
    s = LocalMaskStore(tmp_path / "store")
    s.put("toy", make_bundle(tiny_backbone, "toy", sparsity=0.3, seed=4))
    return s


def _reference(bb, rows) -> torch.Tensor:
    enc = bb.tokenizer([a for a, _ in rows], padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        return mean_pool(bb.model(**enc).last_hidden_state, enc["attention_mask"])


@pytest.mark.parametrize("kwargs,tol", TIERS)
def test_embed_on_every_tier(tiny_backbone_dir, store, kwargs, tol):
    bb = load_backbone(tiny_backbone_dir)
    want = _reference(bb, ROWS)  # the unwrapped backbone's own forward, before the engine wraps its modules
    engine = Engine(bb, store, Metrics(), cache_bytes=1 << 30, device="cpu", max_batch_size=2, **kwargs)
    plain = engine.embed(None, ROWS)  # 3 rows in passes of at most 2
    assert plain.dtype == torch.float32 and plain.shape == (3, bb.hidden_size)
    torch.testing.assert_close(plain, want, atol=tol, rtol=tol)
    assert engine.embed(None, ROWS[:1]).shape == (1, bb.hidden_size)
    masked = engine.embed("toy", ROWS)
    entry = engine.tasks.get("toy")
    torch.testing.assert_close(masked @ entry.head_weight.T + entry.head_bias, engine.logits("toy", ROWS),
                               atol=1e-4, rtol=1e-4)
    assert (masked - plain).abs().max() > 1e-3  # the mask (30 % pruned) changes the vectors


def test_embed_truncation_and_errors(tiny_backbone, store):
    engine = Engine(tiny_backbone, store, Metrics(), cache_bytes=1 << 30, device="cpu")
    long = [(" ".join(["word"] * 200), None)]
    assert engine.embed(None, long).shape == (1, tiny_backbone.hidden_size)  # cut to 128 tokens
    with pytest.raises(InputInvalid, match="tokens, more than the limit of 128"):
        engine.embed(None, long, truncate=False)
    with pytest.raises(InputInvalid, match="limit of 32"):  # the task's max_seq_length
        engine.embed("toy", long, truncate=False)
    prefixed = [("alpha beta " + long[0][0], None)]  # differs from `long` only in tokens a left cut drops
    torch.testing.assert_close(engine.embed(None, prefixed, truncation_direction="left"),
                               engine.embed(None, long, truncation_direction="left"))
    assert not torch.allclose(engine.embed(None, prefixed), engine.embed(None, long), atol=1e-4)  # a right cut
    assert engine.embed(None, []).shape == (0, tiny_backbone.hidden_size)
