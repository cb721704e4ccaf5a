"""The lean encoder computes what transformers' BertModel computes; unrecognised layouts are refused with the reason."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from backbone import load_backbone
from service.encoder import LeanEncoder


def _linear_from_modules(model, enc: LeanEncoder):
    def linear(group, x, low=False):
        mods = [model.get_submodule(n) for n in enc.groups[group]]
        return torch.cat([F.linear(x, m.weight, m.bias) for m in mods], dim=-1)
    return linear


@pytest.mark.parametrize("with_padding", [False, True])
def test_lean_encoder_equals_the_hf_forward(tiny_backbone_dir, with_padding):
    bb = load_backbone(tiny_backbone_dir)
    tok = bb.tokenizer
    texts = ["a charming and often affecting journey", "dull"] if with_padding else ["one two three", "four five six"]
    enc_in = tok(texts, padding=True, return_tensors="pt")
    assert bool((enc_in["attention_mask"] == 0).any()) == with_padding
    enc = LeanEncoder(bb.model)
    assert sum(len(m) for m in enc.groups.values()) == len(bb.masked)  # every masked module in one group
    with torch.inference_mode():
        want = bb.model(**enc_in).last_hidden_state
        got = enc(enc_in["input_ids"], enc_in["attention_mask"], enc_in.get("token_type_ids"),
                  _linear_from_modules(bb.model, enc))
    keep = enc_in["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-5)  # padded positions are unused


def test_unrecognised_layouts_are_refused_with_the_reason(tiny_backbone_dir):
    bb = load_backbone(tiny_backbone_dir)
    assert LeanEncoder.unsupported(bb.model) is None
    bb.model.config.position_embedding_type = "relative_key"
    assert "relative_key" in LeanEncoder.unsupported(bb.model)
    with pytest.raises(ValueError, match="lean encoder: position_embedding_type"):
        LeanEncoder(bb.model)
