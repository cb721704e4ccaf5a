"""/v2's output tensors made from a pass's head outputs (service.api.oip_tensors.infer_outputs), beside /v1's decoding of
the same logits, and the formatter a protocol hands the engine (service.forward.PredictOptions.formatter)."""

from __future__ import annotations

import pytest
import torch

from mask_store.format import decode_header
from service.api.oip_tensors import infer_outputs
from service.forward import Encoded, PredictOptions, decode

from tests.conftest import make_bundle


@pytest.fixture
def headers(tiny_backbone):
    return {"cls": decode_header(make_bundle(tiny_backbone, task="c", labels=("neg", "neutral", "pos")))[0],
            "reg": decode_header(make_bundle(tiny_backbone, task="r", labels=()))[0]}


def test_classification_outputs_agree_with_v1_decoding(headers):
    h = headers["cls"]
    torch.manual_seed(0)
    logits = torch.randn(5, 3) * 4
    logits[4] = torch.tensor([1.5, 1.5, -2.0])  # a tie: the first of the equal labels, as /v1 answers
    data, shapes = infer_outputs(h, logits)
    v1 = decode(h, logits, PredictOptions(with_logits=True))
    assert data["label"] == [p["label"] for p in v1]
    assert data["label"][4] == "neg"
    assert data["score"] == [p["score"] for p in v1]
    assert data["score"] == pytest.approx(torch.softmax(logits, -1).max(-1).values.tolist())
    assert data["logits"] == [x for p in v1 for x in p["logits"]]
    assert shapes == {"label": [5], "score": [5], "logits": [5, 3]}


def test_regression_outputs_are_the_values(headers):
    logits = torch.tensor([[0.25], [-3.5], [4.0]])
    data, shapes = infer_outputs(headers["reg"], logits)
    assert data["score"] == [0.25, -3.5, 4.0] == [p["value"] for p in decode(headers["reg"], logits)]
    assert data["logits"] == [0.25, -3.5, 4.0]
    assert shapes == {"label": [3], "score": [3], "logits": [3, 1]}


def test_a_formatter_answers_instead_of_the_v1_predictions(headers):
    seen = []

    def formatter(header, logits, encoded):
        seen.append((header, logits, encoded))
        return "answer"

    logits = torch.zeros(2, 3)
    enc = [Encoded([101, 102], None), Encoded([101, 7, 102], None, truncated=True)]
    opts = PredictOptions(formatter=formatter, with_logits=True, ranked=True)
    assert decode(headers["cls"], logits, opts, enc) == "answer"
    assert seen == [(headers["cls"], logits, enc)]
