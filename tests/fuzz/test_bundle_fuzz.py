"""Seeded, bounded bundle fuzzing through the upload path (the long campaign: benchmarks/fuzz_bundles.py).

Every mutant (truncations at many offsets, bit flips, byte runs, hostile header edits re-framed with a
valid checksum, NaN / huge / misshapen heads, consistent mask edits, corrupted mask sections with
agreeing checksums) must be a typed rejection or a bundle that serves finite answers of its header's
shape; nothing else, and never a hang. The bundles are format v3 (entropy-coded masks), one also as v2.
"""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks.fuzz_bundles import KINDS, campaign, make_engine, mutants, reencode
from mask_store.format import decode_bundle
from tests.conftest import make_bundle

CASES = 1_800  # about 30 s on 2 idle cores


@pytest.fixture
def bundles(tiny_backbone):
    cls = make_bundle(tiny_backbone, "cls", sparsity=0.1, seed=1)
    return {"cls": cls, "sim": make_bundle(tiny_backbone, "sim", labels=(), text_pairs=True, seed=2),
            "cls.v2": reencode(cls, 2, task="cls.v2")}


def test_fuzzed_bundles_are_v3_with_coded_masks_and_one_v2(bundles):
    for task, data in bundles.items():
        h = decode_bundle(data).header
        assert h.format_version == (2 if task.endswith(".v2") else 3)
        if h.format_version == 3:  # the mutations reach Zstandard sections, not only packed ones
            assert any(m.coding == "zstd-gaps" and m.nbytes for m in h.masks)


def test_mutants_are_seeded_and_cover_every_kind(bundles):
    for task in ("cls", "cls.v2"):
        a = list(mutants(bundles[task], seed=7, count=10 * len(KINDS)))
        b = list(mutants(bundles[task], seed=7, count=10 * len(KINDS)))
        assert a == b and Counter(k for k, _ in a) == Counter({k: 10 for k in KINDS})
        assert sum(m != bundles[task] for _, m in a) >= 9 * len(KINDS)  # mutants, not copies
        # consistent mask edits stay valid in either format, coded again in v3
        assert all(decode_bundle(m).header.format_version == decode_bundle(bundles[task]).header.format_version
                   for k, m in a if k == "payload")


def test_fuzzed_bundles_are_rejected_typed_or_serve_finite_answers(tiny_backbone, bundles, tmp_path):
    result = campaign(make_engine(tiny_backbone, str(tmp_path / "store")), bundles, CASES, seed=2026,
                      case_timeout_s=60)
    counts = result["by_outcome"]
    assert result["cases"] == CASES
    assert counts.get("unexpected", 0) == 0 and counts.get("bad_answer", 0) == 0 and counts.get("hang", 0) == 0, \
        result["findings"][:5]
    # both outcomes occur: the campaign reaches the deep checks and also serves valid edits
    assert counts["rejected"] > CASES / 2 and counts["accepted"] >= CASES / len(KINDS) * 0.9
    assert result["by_kind"].get("head:accepted", 0) == 0  # NaN, infinite, huge or misshapen heads never pass
    assert result["by_kind"].get("truncate:accepted", 0) == 0
    assert result["by_kind"].get("bitflip:accepted", 0) == 0  # the header checksum and the section digests
    assert result["by_kind"].get("section:rejected", 0) > CASES / len(KINDS) * 0.8  # the decoders' own checks
    assert (tmp_path / "store").is_dir() and not list((tmp_path / "store").iterdir())  # every case cleaned up
