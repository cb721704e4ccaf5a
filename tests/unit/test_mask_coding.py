"""Bundle format v3's entropy-coded masks (mask_store/coding.py): nothing lost, and every malformed coded
section refused with BundleInvalid.

Round trips are bit-exact against ``numpy.packbits(bitorder="big")``, the packed form every reader of a
bundle consumes; sizes are checked against the empirical entropy ``n * H(p)`` of each matrix.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import zstandard

from mask_store.coding import decode_gaps, encode_gaps, entropy_bits
from mask_store.errors import BundleInvalid
from mask_store.format import (
    HEAD_BIAS,
    HEAD_WEIGHT,
    HEADER_DIGEST_BYTES,
    MAGIC,
    decode_bundle,
    decode_mask_section,
    encode_bundle,
    frame,
    upgrade_bundle,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "examples" / "masks").glob("*.smask"))
ODD_SHAPES = [(1, 1), (3, 5), (7, 13), (1, 1021), (97, 3), (384, 384), (1536, 384)]
SPARSITIES = [0.0, 0.001, 0.03, 0.5, 1.0]  # the 0, 0.1, 3, 50 and 100 %
SPARSE = "l.sparse.weight"


def _packed(mask: np.ndarray) -> bytes:
    return np.packbits(np.asarray(mask, dtype=bool).reshape(-1), bitorder="big").tobytes()


def _encode(masks: dict[str, np.ndarray], **kw) -> bytes:
    head = {HEAD_WEIGHT: np.ones((2, 4), np.float32), HEAD_BIAS: np.zeros(2, np.float32)}
    return encode_bundle(task="t", problem_type="single_label_classification", labels=["a", "b"], max_seq_length=16,
                         backbone_fingerprint="f" * 64, masks=masks, head=head, **kw)


def _split(data: bytes) -> tuple[dict, bytes]:
    (hlen,) = struct.unpack_from("<I", data, 8)
    return json.loads(data[12:12 + hlen]), data[12 + hlen + HEADER_DIGEST_BYTES:]


def _with_section(data: bytes, name: str, section: bytes, **fields) -> bytes:
    """``data`` with mask ``name``'s section replaced by ``section`` (its nbytes and SHA-256 made to agree, the
    sections after it moved), ``fields`` set on its entry, re-framed with a valid header digest: only the coded
    contents are wrong, so the decoder's own checks are the ones reached."""
    header, payload = _split(data)
    parts = [(m["offset"], m["nbytes"], m) for m in header["masks"]]
    parts.append((header["head"]["offset"], header["head"]["nbytes"], header["head"]))
    out = bytearray()
    for offset, nbytes, entry in sorted(parts, key=lambda x: x[0]):
        blob = payload[offset:offset + nbytes]
        if entry.get("name") == name:
            blob = section
            entry.update(nbytes=len(section), sha256=hashlib.sha256(section).hexdigest(), **fields)
        entry["offset"] = len(out)
        out += blob
    return frame(json.dumps(header).encode(), bytes(out))


def _stream_section(stream: bytes | list[int], checksum: bool = True) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_checksum=checksum).compress(bytes(stream))


@pytest.fixture
def sparse_bundle() -> tuple[bytes, np.ndarray]:
    mask = np.random.default_rng(5).random((40, 97)) >= 0.03
    return _encode({SPARSE: mask, "l.dense.weight": np.random.default_rng(6).random((5, 9)) >= 0.5}), mask


# ---------------------------------------------------------------------------------------------
# nothing lost
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_random_masks_round_trip_bit_exactly(shape, sparsity):
    rng = np.random.default_rng([shape[0], shape[1], int(sparsity * 1000)])
    mask = rng.random(shape) >= sparsity
    section, pruned = encode_gaps(mask)
    assert pruned == int((~mask).sum())
    assert decode_gaps(section, mask.size, pruned) == _packed(mask)
    b = decode_bundle(_encode({"m.weight": mask}))
    entry = b.header.masks[0]
    assert b.header.format_version == 3 and entry.pruned == pruned
    assert b.masks["m.weight"] == _packed(mask)
    np.testing.assert_array_equal(b.mask_array("m.weight"), mask)
    assert entry.nbytes <= math.ceil(mask.size / 8)  # never larger than v2's packed section
    if pruned in (0, mask.size):
        assert entry.nbytes == 0 and entry.coding == "zstd-gaps"


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_large_matrix_path_decodes_the_same_bits(monkeypatch, sparsity):
    """Matrices over BOOL_SCRATCH_MAX_WEIGHTS are scattered into the packed bytes instead of through a bool
    scratch array: the same bits (forced here on small odd shapes)."""
    import mask_store.coding as coding

    monkeypatch.setattr(coding, "BOOL_SCRATCH_MAX_WEIGHTS", 0)
    for shape in ODD_SHAPES:
        mask = np.random.default_rng([shape[0], shape[1]]).random(shape) >= sparsity
        section, pruned = encode_gaps(mask)
        assert decode_gaps(section, mask.size, pruned) == _packed(mask), shape


@pytest.mark.parametrize("positions", [[0], [254], [255], [256], [509], [510], [511], [254, 509, 765],
                                       [0, 1, 2, 3], [4095], [1000, 3999]], ids=str)
def test_gaps_at_the_escape_boundaries(positions):
    """Gaps of 254, 255 (one escape, then 0) and multiples of 255 take the escape path exactly."""
    mask = np.ones(4096, dtype=bool)
    mask[positions] = False
    section, pruned = encode_gaps(mask)
    assert decode_gaps(section, mask.size, pruned) == _packed(mask)
    gaps = np.diff(np.asarray(positions), prepend=-1) - 1
    stream = zstandard.ZstdDecompressor().decompress(section)
    assert len(stream) == len(positions) + int((gaps // 255).sum())  # one escape byte per whole 255


def test_more_than_half_pruned_codes_the_kept_positions():
    mask = np.zeros((7, 13), dtype=bool)
    mask[3, 4] = True
    section, pruned = encode_gaps(mask)
    assert pruned == 90 and zstandard.ZstdDecompressor().decompress(section) == bytes([3 * 13 + 4])
    assert decode_gaps(section, mask.size, pruned) == _packed(mask)
    assert _packed(mask)[-1] & 0b111 == 0  # 91 bits: padding bits stay 0 whichever bit is coded


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_bundles_round_trip_through_v3(path):
    """Each shipped bundle, written as v2 and upgraded (``supermask upgrade``), and written as v3 directly,
    decodes to the very same packed masks and head; the coded masks are within 1.15x of their empirical
    entropy wherever there is something to code (>= 1,000 minority positions), and a task at most 3 % sparse
    is at most 0.30 MB on disk."""
    shipped = decode_bundle(path.read_bytes())
    h = shipped.header
    kw = dict(task=h.task, problem_type=h.problem_type, labels=h.labels, max_seq_length=h.max_seq_length,
              backbone_fingerprint=h.backbone_fingerprint, backbone_name=h.backbone_name, head=shipped.head,
              text_pairs=h.text_pairs, training=h.training, metrics=h.metrics, created_at=h.created_at,
              library_version=h.library_version, mask_rule=h.mask_rule,
              masks={m.name: shipped.mask_array(m.name) for m in h.masks})
    v2 = encode_bundle(**kw, format_version=2)
    v3 = upgrade_bundle(v2)
    new, written = decode_bundle(v3), encode_bundle(**kw)
    # the upgrade writes what the writer writes (the JSON may spell a float differently: json vs pydantic)
    assert new.header == decode_bundle(written).header and _split(v3)[1] == _split(written)[1]
    assert new.header.format_version == 3 and new.masks == shipped.masks
    for k in shipped.head:
        np.testing.assert_array_equal(new.head[k], shipped.head[k])
    for m in new.header.masks:
        n = m.shape[0] * m.shape[1]
        if min(m.pruned, n - m.pruned) >= 1000:
            assert m.coding == "zstd-gaps" and m.nbytes * 8 <= 1.15 * entropy_bits(n, m.pruned), m.name
    if h.sparsity <= 0.03:
        assert len(v3) <= 300_000
    assert len(v3) < len(v2) / 3


# ---------------------------------------------------------------------------------------------
# malformed coded sections: refused, typed
# ---------------------------------------------------------------------------------------------


def test_stored_sections_and_decode_mask_section(sparse_bundle):
    data, mask = sparse_bundle
    b = decode_bundle(data)
    entry = next(m for m in b.header.masks if m.name == SPARSE)
    assert entry.coding == "zstd-gaps" and entry.nbytes < mask.size / 8 / 3
    assert decode_mask_section(entry.coding, b.stored_masks[SPARSE], entry.shape, entry.pruned) == _packed(mask)
    dense = next(m for m in b.header.masks if m.name != SPARSE)
    assert decode_mask_section("packed", b.masks[dense.name], dense.shape, dense.pruned) == b.masks[dense.name]
    with pytest.raises(BundleInvalid, match="unknown mask coding"):
        decode_mask_section("lz4", b"", entry.shape, entry.pruned)


def _malformed(case: str, good: bytes, gaps: list[int], n: int) -> bytes:
    """A coded section for ``n`` weights that is wrong in the way ``case`` names (``gaps``: the valid gaps)."""
    if case == "garbage":
        return b"\x00not a zstd frame at all"
    if case == "truncated-frame":
        return good[:-2]
    if case == "no-content-size":
        cobj = zstandard.ZstdCompressor(write_content_size=False, write_checksum=True).compressobj()
        return cobj.compress(bytes(gaps)) + cobj.flush()
    if case == "no-checksum":
        return _stream_section(gaps, checksum=False)
    if case == "checksum-mismatch":  # the frame's last 4 bytes are its content checksum
        return good[:-1] + bytes([good[-1] ^ 0x01])
    if case == "literal-flipped":  # one bit of the compressed block changed (before the 4 checksum bytes)
        return good[:-8] + bytes([good[-8] ^ 0x01]) + good[-7:]
    if case == "too-large-content":  # more escapes than n weights could need: refused before decompressing
        return _stream_section(bytes(gaps) + bytes([255]) * (n // 255 + 1))
    if case == "two-frames":
        return good + good
    if case == "trailing-byte":
        return good + b"\x00"
    if case == "one-position-short":
        return _stream_section(gaps[:-1])
    if case == "one-position-more":
        return _stream_section(gaps + [0])
    if case == "ends-in-escape":
        return _stream_section(gaps + [255])
    if case == "past-the-end":  # the same count, the last position exactly at index n
        last = n - sum(g + 1 for g in gaps[:-1])
        return _stream_section(gaps[:-1] + [255] * (last // 255) + [last % 255])
    assert case == "empty"
    return b""


MALFORMED = {
    "garbage": "not a Zstandard frame",
    "truncated-frame": "does not decompress",
    "no-content-size": "does not record its content size",
    "no-checksum": "no content checksum",
    "checksum-mismatch": "does not decompress",
    "literal-flipped": "does not decompress",
    "too-large-content": r"claims \d+ bytes of gaps, outside",
    "two-frames": "does not decompress",
    "trailing-byte": "does not decompress",
    "one-position-short": "holds 122 positions, the header's pruned count implies 123",
    "one-position-more": "holds 124 positions",
    "ends-in-escape": "ends in an escape",
    "past-the-end": "past the matrix's 3880",
    "empty": "empty exactly when",
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_coded_section_refused(sparse_bundle, case):
    """Each section below has a valid SHA-256 in a header with a valid digest: the coder's checks refuse it."""
    data, mask = sparse_bundle
    gaps = [int(g) for g in np.diff(np.flatnonzero(~mask.reshape(-1)), prepend=-1) - 1]
    assert max(gaps) < 255  # so that the valid stream is the gaps themselves
    assert _stream_section(gaps) != b"" and decode_gaps(_stream_section(gaps), mask.size, len(gaps)) == _packed(mask)
    bad = _with_section(data, SPARSE, _malformed(case, decode_bundle(data).stored_masks[SPARSE], gaps, mask.size))
    with pytest.raises(BundleInvalid, match=SPARSE.replace(".", r"\.")) as exc:
        decode_bundle(bad)
    assert exc.match(MALFORMED[case])


def test_section_must_be_empty_exactly_when_nothing_is_coded(sparse_bundle):
    data, mask = sparse_bundle
    with pytest.raises(BundleInvalid, match="empty exactly when"):
        decode_bundle(_with_section(data, SPARSE, _stream_section([0]), pruned=0, sparsity=0.0))
    full = _encode({SPARSE: np.ones_like(mask)})
    with pytest.raises(BundleInvalid, match="empty exactly when"):
        decode_bundle(_with_section(full, SPARSE, _stream_section([0])))


@pytest.mark.parametrize("edit,match", [
    ({"pruned": None}, "needs its 'pruned' count"),
    ({"pruned": 10**9}, "more than its"),
    ({"pruned": -1}, "pruned"),
    ({"coding": "lz4"}, "coding"),
    ({"sparsity": 0.5}, "records sparsity"),
])
def test_inconsistent_v3_entry_refused(sparse_bundle, edit, match):
    data, _ = sparse_bundle
    header, payload = _split(data)
    entry = next(m for m in header["masks"] if m["name"] == SPARSE)
    entry.update(edit)
    with pytest.raises(BundleInvalid, match=match):
        decode_bundle(frame(json.dumps(header).encode(), payload))


def test_pruned_count_must_match_the_coded_positions(sparse_bundle):
    data, mask = sparse_bundle
    header, payload = _split(data)
    entry = next(m for m in header["masks"] if m["name"] == SPARSE)
    entry["pruned"] += 1
    entry["sparsity"] = entry["pruned"] / mask.size
    with pytest.raises(BundleInvalid, match="positions"):
        decode_bundle(frame(json.dumps(header).encode(), payload))


def test_v3_packed_section_checked_against_its_pruned_count():
    mask = np.random.default_rng(1).random((5, 9)) >= 0.5  # near 50 %: stored packed
    data = _encode({"m.weight": mask})
    header, payload = _split(data)
    assert header["masks"][0]["coding"] == "packed"
    header["masks"][0]["pruned"] += 1
    header["masks"][0]["sparsity"] = header["masks"][0]["pruned"] / mask.size
    with pytest.raises(BundleInvalid, match="zeros, the header records pruned"):
        decode_bundle(frame(json.dumps(header).encode(), payload))


def test_v3_fields_refused_in_a_v2_header(sparse_bundle):
    data, _ = sparse_bundle
    header, payload = _split(data)
    header["format_version"] = 2
    with pytest.raises(BundleInvalid, match="format v3 fields"):
        decode_bundle(frame(json.dumps(header).encode(), payload, version=2))
    assert data[:8] == MAGIC


def test_decompression_bomb_refused_before_decoding(sparse_bundle):
    """A few bytes of header may claim a huge all-kept matrix (an empty section): refused by the header's bound,
    and by an upload limit on the unpacked size, before any memory is taken."""
    from mask_store.errors import BundleTooLarge

    data, _ = sparse_bundle
    header, payload = _split(data)
    header["masks"].append({"name": "huge.weight", "shape": [1 << 20, 1 << 20], "offset": len(payload), "nbytes": 0,
                            "sparsity": 0.0, "sha256": hashlib.sha256(b"").hexdigest(), "coding": "zstd-gaps",
                            "pruned": 0})
    with pytest.raises(BundleInvalid, match="would unpack to"):
        decode_bundle(frame(json.dumps(header).encode(), payload))
    header["masks"][-1]["shape"] = [1 << 14, 1 << 14]  # 32 MiB packed: under the format's bound
    bomb = frame(json.dumps(header).encode(), payload)
    with pytest.raises(BundleTooLarge, match="masks unpacked is"):
        decode_bundle(bomb, max_bytes=16 << 20)
    assert decode_bundle(bomb, max_bytes=64 << 20).masks["huge.weight"] == b"\xff" * (1 << 25)


def test_truncated_v3_payload_refused_at_every_cut(sparse_bundle):
    data, _ = sparse_bundle
    (hlen,) = struct.unpack_from("<I", data, 8)
    for cut in range(12 + hlen + HEADER_DIGEST_BYTES, len(data)):
        with pytest.raises(BundleInvalid, match="truncated"):
            decode_bundle(data[:cut])


def test_a_loaded_bundle_unpacks_a_coded_mask_only_when_asked(sparse_bundle, monkeypatch):
    """decode_bundle validates a coded section by decoding its positions; its packed bits are built on first read
    (a tier that holds the coded form never builds them; membership and iteration build nothing), from the cached
    positions, then kept, and equal the mask's; iteration follows the header."""
    from mask_store import coding
    from mask_store import format as fmt

    data, mask = sparse_bundle
    coding._positions.clear()  # another test may have decoded the same section
    unpacked, decoded = [], []
    real_bits, real_decode = fmt.bits_from_positions, coding.decode_positions
    monkeypatch.setattr(fmt, "bits_from_positions", lambda *a: unpacked.append(a[2]) or real_bits(*a))
    monkeypatch.setattr(coding, "decode_positions", lambda *a: decoded.append(a[1]) or real_decode(*a))
    b = decode_bundle(data)
    assert decoded == [mask.size]  # validation decoded the coded section once
    assert list(b.masks) == [m.name for m in b.header.masks] and len(b.masks) == 2
    assert SPARSE in b.masks and "nope" not in b.masks and unpacked == []
    assert b.masks[SPARSE] == _packed(mask) and b.masks[SPARSE] == _packed(mask)
    assert unpacked == [mask.size] and decoded == [mask.size]  # unpacked once, from the cached positions
    np.testing.assert_array_equal(b.mask_array(SPARSE), mask)


def test_positions_are_decoded_once_per_section_and_shared_read_only(sparse_bundle):
    from mask_store.coding import decode_positions, decode_positions_cached

    data, mask = sparse_bundle
    b = decode_bundle(data)
    entry = next(m for m in b.header.masks if m.name == SPARSE)
    section = b.stored_masks[SPARSE]
    bit, idx = decode_positions_cached(section, mask.size, entry.pruned)
    assert decode_positions_cached(section, mask.size, entry.pruned)[1] is idx  # validation decoded it already
    assert bit == 0 and not idx.flags.writeable
    np.testing.assert_array_equal(idx, np.flatnonzero(~mask.reshape(-1)))
    np.testing.assert_array_equal(idx, decode_positions(section, mask.size, entry.pruned)[1])
    with pytest.raises(BundleInvalid):  # a bad count is refused, cached or not
        decode_positions_cached(section, mask.size, entry.pruned + 1)
