"""Backbone: per-channel int8 quantization, masked matrices, fingerprint."""

from __future__ import annotations

import pytest
import torch

from backbone import dequantize, load_backbone, masked_linear_names, quantize_per_channel


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantization_error_bounded_by_half_step(bits):
    torch.manual_seed(0)
    w = torch.randn(64, 48) * torch.linspace(0.01, 3.0, 64)[:, None]  # very different row ranges
    q, scale = quantize_per_channel(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert int(q.abs().max()) <= qmax
    err = (dequantize(q, scale) - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-6)  # round-to-nearest: at most half a step per channel
    # per-channel: each row uses its own full range
    assert torch.all(q.abs().amax(dim=1) == qmax)


def test_zero_row_and_bad_bits():
    w = torch.zeros(3, 4)
    w[1] = 1.0
    q, s = quantize_per_channel(w)
    assert torch.equal(dequantize(q, s), w)
    with pytest.raises(ValueError, match="bits"):
        quantize_per_channel(w, 9)


def test_masked_matrices_are_six_per_layer(tiny_backbone):
    names = masked_linear_names(tiny_backbone.model)
    assert len(names) == 6 * 2
    assert "encoder.layer.0.attention.self.query" in names and "encoder.layer.1.output.dense" in names
    for n in names:  # the module now computes with deq(W_q)
        lin = tiny_backbone.model.get_submodule(n)
        torch.testing.assert_close(lin.weight, dequantize(tiny_backbone.qweight[n], tiny_backbone.scale[n]))


def test_fingerprint_is_stable_and_sensitive(tiny_backbone_dir, tmp_path):
    a = load_backbone(tiny_backbone_dir)
    b = load_backbone(tiny_backbone_dir)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert load_backbone(tiny_backbone_dir, bits=4).fingerprint != a.fingerprint
    # change one weight well beyond a quantization step and save as another folder
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(tiny_backbone_dir))
    with torch.no_grad():
        model.encoder.layer[0].attention.self.value.weight[0, 0] += 1.0
    other = tmp_path / "other"
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(str(tiny_backbone_dir)).save_pretrained(other)
    assert load_backbone(other).fingerprint != a.fingerprint


def test_missing_folder_is_a_clear_error(tmp_path):
    from backbone import BackboneLoadError

    with pytest.raises(BackboneLoadError, match="config.json"):
        load_backbone(tmp_path / "nowhere")


def test_weights_only_load_has_the_full_models_state_and_fingerprint(tiny_backbone_dir):
    import sys

    import torch

    full = load_backbone(tiny_backbone_dir)
    lean = load_backbone(tiny_backbone_dir, weights_only=True)
    assert lean.weights_only and not full.weights_only
    assert lean.fingerprint == full.fingerprint  # bundles trained on the full model are served unchanged
    assert lean.masked == full.masked
    a, b = full.model.state_dict(), lean.model.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert lean.model.config.to_dict() == full.model.config.to_dict()
    assert type(lean.model).__module__.startswith("torch.nn")  # no transformers model class


def test_weights_only_falls_back_to_the_full_model_for_other_layouts(tiny_backbone_dir, tmp_path):
    import json
    import shutil

    folder = tmp_path / "relative"
    shutil.copytree(tiny_backbone_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["position_embedding_type"] = "relative_key"
    (folder / "config.json").write_text(json.dumps(cfg))
    bb = load_backbone(folder, weights_only=True)
    assert not bb.weights_only and type(bb.model).__name__ == "BertModel"
