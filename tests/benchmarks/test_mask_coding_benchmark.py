"""benchmarks/mask_coding.py on small bundles: its byte counts are the files' own and its ratios the entropy's."""

from __future__ import annotations

import json
import math

import numpy as np

from benchmarks import mask_coding
from mask_store.format import HEAD_BIAS, HEAD_WEIGHT, decode_bundle, encode_bundle


def _bundle(sparsity: float, seed: int) -> tuple[bytes, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    masks = {"a.weight": rng.random((96, 64)) >= sparsity, "b.weight": rng.random((64, 96)) >= sparsity}
    head = {HEAD_WEIGHT: np.ones((2, 8), np.float32), HEAD_BIAS: np.zeros(2, np.float32)}
    return encode_bundle(task=f"t{seed}", problem_type="single_label_classification", labels=["a", "b"],
                         max_seq_length=16, backbone_fingerprint="f" * 64, masks=masks, head=head,
                         format_version=2), masks


def test_mask_coding_benchmark_reports_sizes_ratios_and_decode_times(tmp_path):
    examples = tmp_path / "examples"
    examples.mkdir()
    data, masks = _bundle(0.03, 1)
    (examples / "t1.smask").write_bytes(data)
    out = tmp_path / "mask_coding"
    assert mask_coding.main(["--examples", str(examples), "--sparsities", "0.02", "--repeats", "2",
                             "--candidates", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    assert [r["task"] for r in res["tasks"]] == ["t1.smask", "random 2%"]
    row = res["tasks"][0]
    assert row["v2_bytes"] == len(data)  # the shipped file was v2: written again as v2, the same bytes
    assert row["v3_bytes"] < row["v2_bytes"] and row["v3_mask_bytes"] < row["v2_mask_bytes"] / 2
    entropy_bits = 0.0
    for m in masks.values():
        p = float((~m).mean())
        entropy_bits += m.size * -(p * math.log2(p) + (1 - p) * math.log2(1 - p))
    assert row["entropy_bytes"] == round(entropy_bits / 8, 1)
    assert row["ratio_to_entropy"] == row["v3_mask_bytes"] / (entropy_bits / 8) >= 1.0
    coded = sum(m.nbytes for m in decode_bundle(mask_coding._write(mask_coding.shipped_tasks(examples)[0][1], 3))
                .header.masks)
    assert row["v3_mask_bytes"] == coded
    assert row["decode_masks_ms_median"] > 0 and row["decode_bundle_ms_min"] > 0
    assert {c["coder"].split(" ")[0] for c in res["candidates"]} >= {"zstd-gaps", "packbits"}
    assert res["hardware"]["cpu_model"] and "Bundle format v3" in out.with_suffix(".md").read_text()
    assert res["targets"] == ["no MiniLM-sized task measured: the targets are for 10.6 M masked weights"]
