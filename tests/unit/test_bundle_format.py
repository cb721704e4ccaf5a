"""Bundle formats v1-v3: mask bit packing, encode/decode round trips, and every rejection path (the v3
mask coding itself: tests/unit/test_mask_coding.py).

No torch here: the format must be readable with numpy, bitarray, pydantic and safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mask_store.errors import BundleInvalid, BundleTooLarge
from mask_store.format import (
    HEAD_BIAS,
    HEAD_WEIGHT,
    HEADER_DIGEST_BYTES,
    MAGIC,
    frame,
    decode_bundle,
    decode_header,
    encode_bundle,
    pack_mask,
    read_header_file,
    unpack_mask,
)

REPO = Path(__file__).resolve().parents[2]
HIDDEN = 8  # hidden size of the fake backbone: head weight is [num_outputs, HIDDEN]
FINGERPRINT = "f" * 64
MASK_SHAPES = {
    "encoder.layer.0.attention.self.query.weight": (8, 4),  # 32 bits = 4 whole bytes, no padding
    "encoder.layer.0.intermediate.dense.weight": (16, 8),  # 128 bits
    "encoder.layer.0.output.dense.weight": (3, 5),  # 15 bits: 1 padding bit in the last byte
    "encoder.layer.0.attention.output.dense.weight": (40, 97),  # 3 % sparse: v3 codes it ("zstd-gaps")
}
SPARSE_MASK = "encoder.layer.0.attention.output.dense.weight"


# ---------------------------------------------------------------------------------------------
# helpers: build a fake bundle, and take one apart / put it back together by hand (independent
# of the code under test: the layout is magic (8 bytes) + uint32 LE header length + JSON + payload)
# ---------------------------------------------------------------------------------------------


def _fake_parts(seed: int = 0, sparsity: float = 0.3, num_outputs: int = 2):
    rng = np.random.default_rng(seed)
    masks = {name: rng.random(shape) >= (0.03 if name == SPARSE_MASK else sparsity) for name, shape in MASK_SHAPES.items()}
    head = {
        HEAD_WEIGHT: rng.normal(size=(num_outputs, HIDDEN)).astype(np.float32),
        HEAD_BIAS: rng.normal(size=(num_outputs,)).astype(np.float32),
    }
    return masks, head


def _encode(task="sst2", labels=("negative", "positive"), problem_type="single_label_classification",
            seed=0, masks=None, head=None, **kw) -> bytes:
    m, h = _fake_parts(seed, num_outputs=len(labels) if labels else 1)
    return encode_bundle(
        task=task,
        problem_type=problem_type,
        labels=list(labels),
        max_seq_length=128,
        backbone_fingerprint=FINGERPRINT,
        masks=m if masks is None else masks,
        head=h if head is None else head,
        **kw,
    )


def _split(data: bytes) -> tuple[dict, bytes]:
    assert data[:8] in (MAGIC, b"SUPMASK2")
    (hlen,) = struct.unpack_from("<I", data, 8)
    return json.loads(data[12 : 12 + hlen].decode("utf-8")), data[12 + hlen + HEADER_DIGEST_BYTES :]


def _join(header: dict | bytes, payload: bytes) -> bytes:
    """Re-frame an edited header with its recomputed SHA-256 (so that the check under test is reached), under
    the magic of the header's ``format_version`` (v2 or v3; v3 for anything else)."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    version = header.get("format_version") if isinstance(header, dict) else None
    return frame(hb, payload, version=version if version in (2, 3) else 3)


@pytest.fixture(params=[3, 2], ids=["v3", "v2"])
def bundle_bytes(request) -> bytes:
    """A valid bundle as the writer makes it (v3), and the same as v2: every check below holds for both."""
    return _encode(format_version=request.param)


@pytest.fixture
def v2_bytes() -> bytes:
    """A v2 bundle: packed mask sections, for the checks of that layout (padding bits, nbytes)."""
    return _encode(format_version=2)


# ---------------------------------------------------------------------------------------------
# pack_mask / unpack_mask
# ---------------------------------------------------------------------------------------------

SHAPES = [(1, 1), (3, 5), (8, 8), (7, 13), (384, 384), (1536, 384)]
SPARSITIES = [0.0, 0.01, 0.13, 0.5, 1.0]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_pack_unpack_round_trip(shape, sparsity):
    rng = np.random.default_rng([shape[0], shape[1], int(sparsity * 100)])
    mask = rng.random(shape) >= sparsity  # True keeps the weight
    n = mask.size

    packed = pack_mask(mask)

    assert isinstance(packed, bytes)
    assert len(packed) == math.ceil(n / 8)
    # the documented bit order: row-major, MSB first == numpy.packbits(bitorder="big")
    assert packed == np.packbits(mask.reshape(-1), bitorder="big").tobytes()
    # padding bits in the last byte are zero
    pad = len(packed) * 8 - n
    if pad:
        assert packed[-1] & ((1 << pad) - 1) == 0
    out = unpack_mask(packed, shape)
    assert out.dtype == bool
    assert out.shape == shape
    np.testing.assert_array_equal(out, mask)


def test_pack_mask_bit_positions_explicit():
    # element i -> byte i // 8, bit 7 - i % 8; 1 keeps.
    mask = np.zeros((3, 5), dtype=bool)
    mask[0, 0] = True  # i = 0  -> byte 0, 0x80
    mask[1, 2] = True  # i = 7  -> byte 0, 0x01
    mask[1, 3] = True  # i = 8  -> byte 1, 0x80
    mask[2, 4] = True  # i = 14 -> byte 1, 0x02
    assert pack_mask(mask) == bytes([0x81, 0x82])


def test_pack_mask_accepts_01_integers():
    mask = np.array([[1, 0, 1], [0, 0, 1]], dtype=np.int64)
    assert pack_mask(mask) == pack_mask(mask.astype(bool)) == bytes([0b10100100])


@pytest.mark.parametrize("nbytes", [0, 1, 3])
def test_unpack_mask_wrong_length_rejected(nbytes):
    # a 3x5 mask needs exactly 2 bytes
    with pytest.raises(BundleInvalid, match="expected 2"):
        unpack_mask(b"\xff" * nbytes, (3, 5))


# ---------------------------------------------------------------------------------------------
# encode / decode round trip
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [3, 2])
def test_round_trip_classification(version):
    masks, head = _fake_parts(seed=3, sparsity=0.25)
    data = encode_bundle(
        task="MRPC-v2.1_x",
        problem_type="single_label_classification",
        labels=["not_equivalent", "equivalent"],
        max_seq_length=96,
        backbone_fingerprint=FINGERPRINT,
        backbone_name="tiny-bert",
        masks=masks,
        head=head,
        text_pairs=True,
        training={"lr": 0.1, "epochs": 3},
        metrics={"f1": 0.8},
        created_at="2024-01-01T00:00:00Z",
        library_version="0.1.0",
        format_version=version,
    )
    b = decode_bundle(data)
    h = b.header

    assert b.size_bytes == len(data)
    assert data[:8] == (MAGIC if version == 3 else b"SUPMASK2")
    assert h.format == "supermask-bundle" and h.format_version == version
    assert h.task == "MRPC-v2.1_x"
    assert h.problem_type == "single_label_classification"
    assert h.labels == ["not_equivalent", "equivalent"]
    assert h.num_outputs == 2
    assert h.text_pairs is True
    assert h.max_seq_length == 96
    assert h.backbone_fingerprint == FINGERPRINT
    assert h.backbone_name == "tiny-bert"
    assert h.training == {"lr": 0.1, "epochs": 3}
    assert h.metrics == {"f1": 0.8}
    assert h.created_at == "2024-01-01T00:00:00Z"
    assert h.library_version == "0.1.0"
    assert h.head.tensors == {HEAD_WEIGHT: [2, HIDDEN], HEAD_BIAS: [2]}

    # masks: same names in order, same shapes, exact bits; per-mask and overall sparsity true
    assert [m.name for m in h.masks] == list(masks)
    total = zeros = 0
    for entry in h.masks:
        src = masks[entry.name]
        assert entry.shape == list(src.shape)
        # v3 stores a matrix this small packed where its Zstandard frame would be larger (never larger than packed)
        assert entry.nbytes == math.ceil(src.size / 8) if entry.coding == "packed" else entry.nbytes < src.size / 8
        assert entry.coding == "packed" or version == 3
        assert entry.pruned == (int((~src).sum()) if version == 3 else None)
        assert b.masks[entry.name] == np.packbits(src.reshape(-1)).tobytes()
        np.testing.assert_array_equal(b.mask_array(entry.name), src)
        true_sparsity = float(np.mean(~src))
        assert entry.sparsity == pytest.approx(true_sparsity, abs=1e-12)
        assert 0.0 < entry.sparsity < 1.0  # the fixture has both kept and pruned weights
        total += src.size
        zeros += int((~src).sum())
    assert h.masked_weights == total
    assert h.sparsity == pytest.approx(zeros / total, abs=1e-12)

    # head: float32, bit-exact
    assert set(b.head) == {HEAD_WEIGHT, HEAD_BIAS}
    for k in head:
        assert b.head[k].dtype == np.float32
        np.testing.assert_array_equal(b.head[k], head[k])

    # decode_header agrees and points to the payload right after the header
    h2, start = decode_header(data)
    assert h2 == h
    assert start == 12 + struct.unpack_from("<I", data, 8)[0] + HEADER_DIGEST_BYTES


def test_round_trip_regression():
    rng = np.random.default_rng(7)
    masks = {"a.weight": rng.random((8, 4)) >= 0.5, "b.weight": rng.random((16, 8)) >= 0.1}
    head = {HEAD_WEIGHT: rng.normal(size=(1, HIDDEN)), HEAD_BIAS: rng.normal(size=(1,))}  # float64 in
    data = encode_bundle(task="stsb", problem_type="regression", labels=[], max_seq_length=64,
                         backbone_fingerprint=FINGERPRINT, masks=masks, head=head, text_pairs=True)
    b = decode_bundle(data)
    assert b.header.problem_type == "regression"
    assert b.header.labels == []
    assert b.header.num_outputs == 1
    assert b.header.head.tensors == {HEAD_WEIGHT: [1, HIDDEN], HEAD_BIAS: [1]}
    assert b.head[HEAD_WEIGHT].dtype == np.float32  # converted on encode
    np.testing.assert_array_equal(b.head[HEAD_WEIGHT], head[HEAD_WEIGHT].astype(np.float32))
    for name, src in masks.items():
        np.testing.assert_array_equal(b.mask_array(name), src)


@pytest.mark.parametrize("sparsity,expected", [(0.0, 0.0), (1.0, 1.0)])
@pytest.mark.parametrize("version", [3, 2])
def test_all_kept_and_all_pruned_masks(sparsity, expected, version):
    masks = {name: np.full(shape, sparsity == 0.0) for name, shape in MASK_SHAPES.items()}
    b = decode_bundle(_encode(masks=masks, format_version=version))
    assert b.header.sparsity == expected
    assert all(m.sparsity == expected for m in b.header.masks)
    assert all(b.masks[n] == np.packbits(m.reshape(-1)).tobytes() for n, m in masks.items())
    if version == 3:  # nothing to code: empty sections
        assert all(m.nbytes == 0 and m.coding == "zstd-gaps" for m in b.header.masks)


def test_encode_is_deterministic(bundle_bytes):
    version = int(bundle_bytes[7:8])
    assert _encode(format_version=version) == bundle_bytes
    assert _encode(seed=1, format_version=version) != bundle_bytes


# ---------------------------------------------------------------------------------------------
# rejections
# ---------------------------------------------------------------------------------------------


def test_wrong_magic(bundle_bytes):
    bad = b"NOTMASK1" + bundle_bytes[8:]
    with pytest.raises(BundleInvalid, match="magic"):
        decode_bundle(bad)
    with pytest.raises(BundleInvalid, match="magic"):
        decode_header(bad)


def _cut_points(data: bytes) -> dict[str, int]:
    (hlen,) = struct.unpack_from("<I", data, 8)
    start = 12 + hlen
    return {
        "empty": 0,
        "inside-magic": 5,
        "inside-length": 10,
        "header-start": 12,
        "inside-header": 12 + hlen // 2,
        "header-minus-1": start - 1,
        "payload-start": start,
        "inside-first-mask": start + 3,
        "inside-head": len(data) - 20,
        "last-byte-missing": len(data) - 1,
    }


@pytest.mark.parametrize("where", ["empty", "inside-magic", "inside-length", "header-start", "inside-header",
                                   "header-minus-1", "payload-start", "inside-first-mask", "inside-head",
                                   "last-byte-missing"])
def test_truncated(bundle_bytes, where):
    cut = _cut_points(bundle_bytes)[where]
    assert 0 <= cut < len(bundle_bytes)
    with pytest.raises(BundleInvalid, match=r"(?i)truncated|too short"):
        decode_bundle(bundle_bytes[:cut])


def test_decode_header_accepts_just_the_header_but_not_less(bundle_bytes):
    (hlen,) = struct.unpack_from("<I", bundle_bytes, 8)
    end = 12 + hlen + HEADER_DIGEST_BYTES
    header, start = decode_header(bundle_bytes[:end])
    assert header.task == "sst2" and start == end
    with pytest.raises(BundleInvalid, match="truncated"):
        decode_header(bundle_bytes[: end - 1])
    with pytest.raises(BundleInvalid, match="truncated"):
        decode_header(bundle_bytes[: 12 + hlen - 1])


def test_flipped_byte_in_each_mask_section(bundle_bytes):
    header, payload = _split(bundle_bytes)
    start = len(bundle_bytes) - len(payload)
    for m in header["masks"]:
        bad = bytearray(bundle_bytes)
        bad[start + m["offset"]] ^= 0x40  # a data bit, not a padding bit
        with pytest.raises(BundleInvalid, match=r"checksum mismatch in mask") as exc:
            decode_bundle(bytes(bad))
        assert m["name"] in str(exc.value)


def test_flipped_byte_in_head_section(bundle_bytes):
    header, payload = _split(bundle_bytes)
    start = len(bundle_bytes) - len(payload)
    bad = bytearray(bundle_bytes)
    bad[start + header["head"]["offset"] + header["head"]["nbytes"] - 3] ^= 0x01
    with pytest.raises(BundleInvalid, match=r"checksum mismatch in the task head"):
        decode_bundle(bytes(bad))


@pytest.mark.parametrize("garbage", [b"\x00", b"trailing garbage"])
def test_trailing_garbage(bundle_bytes, garbage):
    with pytest.raises(BundleInvalid, match=f"{len(garbage)} unexpected trailing bytes"):
        decode_bundle(bundle_bytes + garbage)


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe\x00", b""])
def test_header_not_json(bundle_bytes, raw):
    _, payload = _split(bundle_bytes)
    with pytest.raises(BundleInvalid, match="not valid UTF-8 JSON"):
        decode_bundle(_join(raw, payload))


def test_header_json_not_an_object(bundle_bytes):
    _, payload = _split(bundle_bytes)
    with pytest.raises(BundleInvalid, match="invalid header"):
        decode_bundle(_join(b"[1, 2, 3]", payload))


def test_format_version_4_rejected_with_version_in_message(bundle_bytes):
    header, payload = _split(bundle_bytes)
    assert decode_bundle(_join(header, payload)).header.format_version in (2, 3)  # the re-encoding itself is valid
    header["format_version"] = 4
    bad = _join(header, payload)
    with pytest.raises(BundleInvalid, match=r"format_version 4 is not supported"):
        decode_bundle(bad)
    with pytest.raises(BundleInvalid, match=r"format_version 4"):
        decode_header(bad)


def test_v1_bundle_still_read(v2_bytes):
    """A bundle written before format v2 (magic SUPMASK1, no header digest) decodes to the same contents."""
    header, payload = _split(v2_bytes)
    header["format_version"] = 1
    v1 = frame(json.dumps(header).encode(), payload, version=1)
    assert v1[:8] == b"SUPMASK1"
    old, new = decode_bundle(v1), decode_bundle(v2_bytes)
    assert old.header.format_version == 1 and old.masks == new.masks
    np.testing.assert_array_equal(old.head[HEAD_WEIGHT], new.head[HEAD_WEIGHT])
    # the version in the magic and in the header must agree, both ways
    with pytest.raises(BundleInvalid, match="magic"):
        decode_bundle(frame(json.dumps(header).encode(), payload, version=2))
    header["format_version"] = 2
    with pytest.raises(BundleInvalid, match="magic"):
        decode_bundle(frame(json.dumps(header).encode(), payload, version=1))
    with pytest.raises(BundleInvalid, match="magic"):
        decode_bundle(frame(json.dumps(header).encode(), payload, version=3))


def test_v2_and_v3_read_to_the_same_contents(v2_bytes):
    v3 = _encode()
    assert v3[:8] == MAGIC == b"SUPMASK3"
    old, new = decode_bundle(v2_bytes), decode_bundle(v3)
    assert old.masks == new.masks and old.stored_masks == {}
    coded = {m.name for m in new.header.masks if m.coding == "zstd-gaps"}
    assert coded and set(new.stored_masks) == coded  # the coded sections, for a cache that holds them
    for k in old.head:
        np.testing.assert_array_equal(old.head[k], new.head[k])
    assert old.header.model_dump(exclude={"format_version", "masks", "head"}) == \
        new.header.model_dump(exclude={"format_version", "masks", "head"})


def test_every_header_bit_flip_rejected(bundle_bytes):
    """v2's and v3's header SHA-256: a flip of any bit of the magic, length, header JSON or digest is rejected
    (under v1 a flip inside a label name, 'negative' -> 'oegative', was accepted)."""
    (hlen,) = struct.unpack_from("<I", bundle_bytes, 8)
    end = 12 + hlen + HEADER_DIGEST_BYTES
    for i in range(end):
        for bit in range(8):
            bad = bytearray(bundle_bytes)
            bad[i] ^= 1 << bit
            with pytest.raises(BundleInvalid):
                decode_bundle(bytes(bad))


def test_wrong_format_name(bundle_bytes):
    header, payload = _split(bundle_bytes)
    header["format"] = "something-else"
    with pytest.raises(BundleInvalid, match="something-else"):
        decode_bundle(_join(header, payload))


def test_unknown_header_field_rejected(bundle_bytes):
    header, payload = _split(bundle_bytes)
    header["surprise"] = 1
    with pytest.raises(BundleInvalid, match="surprise"):
        decode_bundle(_join(header, payload))


def test_huge_header_length_rejected_without_reading_it(bundle_bytes):
    bad = MAGIC + struct.pack("<I", 0xFFFFFFFF) + bundle_bytes[12:]
    with pytest.raises(BundleInvalid, match="exceeds"):
        decode_bundle(bad)


def test_max_bytes(bundle_bytes):
    n = len(bundle_bytes)
    assert decode_bundle(bundle_bytes, max_bytes=n).size_bytes == n  # exactly at the limit is fine
    with pytest.raises(BundleTooLarge) as exc:
        decode_bundle(bundle_bytes, max_bytes=n - 1)
    assert exc.value.size_bytes == n and exc.value.limit_bytes == n - 1
    assert str(n) in str(exc.value) and str(n - 1) in str(exc.value)
    # the size limit is checked before anything else, even on garbage
    with pytest.raises(BundleTooLarge):
        decode_bundle(b"x" * 100, max_bytes=10)


def test_encode_head_shapes_inconsistent_with_labels():
    _, head2 = _fake_parts(num_outputs=2)
    with pytest.raises(BundleInvalid, match="do not fit 3 outputs"):
        _encode(labels=("a", "b", "c"), head=head2)
    with pytest.raises(BundleInvalid, match="do not fit 1 outputs"):
        _encode(labels=(), problem_type="regression", head=head2)
    bad_bias = {HEAD_WEIGHT: head2[HEAD_WEIGHT], HEAD_BIAS: np.zeros(3, np.float32)}
    with pytest.raises(BundleInvalid, match="do not fit 2 outputs"):
        _encode(head=bad_bias)
    with pytest.raises(BundleInvalid, match="must hold exactly"):
        _encode(head={HEAD_WEIGHT: head2[HEAD_WEIGHT]})


def test_decode_head_shapes_inconsistent_with_labels(bundle_bytes):
    header, payload = _split(bundle_bytes)
    header["labels"] = ["a", "b", "c"]  # head is still [2, H]
    with pytest.raises(BundleInvalid, match="do not fit 3 outputs"):
        decode_bundle(_join(header, payload))


def test_head_tensor_shape_in_header_disagrees_with_blob(bundle_bytes):
    header, payload = _split(bundle_bytes)
    header["head"]["tensors"][HEAD_WEIGHT] = [2, HIDDEN + 1]
    with pytest.raises(BundleInvalid, match="blob holds float32"):
        decode_bundle(_join(header, payload))


def test_classification_with_one_label():
    _, head1 = _fake_parts(num_outputs=1)
    with pytest.raises(BundleInvalid, match="at least 2 labels"):
        _encode(labels=("only",), head=head1)


def test_regression_with_labels(bundle_bytes):
    header, payload = _split(bundle_bytes)
    header["problem_type"] = "regression"
    with pytest.raises(BundleInvalid, match="regression task has no labels"):
        decode_bundle(_join(header, payload))


@pytest.mark.parametrize("task", ["../x", "", "a/b", ".hidden", "x" * 65])
def test_encode_invalid_task_name(task):
    with pytest.raises(BundleInvalid, match="task"):
        _encode(task=task)


def test_recorded_sparsity_must_match_bits(bundle_bytes):
    header, payload = _split(bundle_bytes)
    header["masks"][0]["sparsity"] = min(1.0, header["masks"][0]["sparsity"] + 0.01)
    with pytest.raises(BundleInvalid, match="records sparsity"):
        decode_bundle(_join(header, payload))


def test_nonzero_padding_bits_rejected(v2_bytes):
    header, payload = _split(v2_bytes)
    entry = next(m for m in header["masks"] if m["shape"] == [3, 5])  # 15 bits -> 1 padding bit
    payload = bytearray(payload)
    last = entry["offset"] + entry["nbytes"] - 1
    payload[last] |= 0x01
    entry["sha256"] = hashlib.sha256(bytes(payload[entry["offset"] : last + 1])).hexdigest()
    with pytest.raises(BundleInvalid, match="padding bits"):
        decode_bundle(_join(header, bytes(payload)))


def test_mask_nbytes_must_fit_shape(v2_bytes):
    header, payload = _split(v2_bytes)
    header["masks"][0]["shape"] = [8, 5]
    with pytest.raises(BundleInvalid, match="does not fit shape"):
        decode_bundle(_join(header, payload))


def test_overlapping_sections_rejected(bundle_bytes):
    header, payload = _split(bundle_bytes)
    header["masks"][1]["offset"] = header["masks"][0]["offset"]
    with pytest.raises(BundleInvalid, match="gap or overlap"):
        decode_bundle(_join(header, payload))


def test_duplicate_mask_names_rejected(bundle_bytes):
    header, payload = _split(bundle_bytes)
    header["masks"][1]["name"] = header["masks"][0]["name"]
    with pytest.raises(BundleInvalid, match="not unique"):
        decode_bundle(_join(header, payload))


def test_non_finite_head_rejected():
    _, head = _fake_parts()
    head[HEAD_BIAS][0] = np.nan
    data = _encode(head=head)
    with pytest.raises(BundleInvalid, match="non-finite"):
        decode_bundle(data)


# ---------------------------------------------------------------------------------------------
# header-only reading, without torch
# ---------------------------------------------------------------------------------------------


def test_read_header_file(tmp_path, bundle_bytes):
    p = tmp_path / "sst2.smask"
    p.write_bytes(bundle_bytes)
    assert read_header_file(str(p)) == decode_bundle(bundle_bytes).header
    # only the header has to be intact
    p.write_bytes(bundle_bytes[:-5])
    assert read_header_file(str(p)).task == "sst2"
    p.write_bytes(bundle_bytes[:6])
    with pytest.raises(BundleInvalid, match="too short"):
        read_header_file(str(p))
    p.write_bytes(b"GARBAGE!" + bundle_bytes[8:])
    with pytest.raises(BundleInvalid, match="magic"):
        read_header_file(str(p))


def test_reading_bundles_does_not_import_torch(tmp_path, bundle_bytes):
    p = tmp_path / "sst2.smask"
    p.write_bytes(bundle_bytes)
    code = (
        "import sys\n"
        "import mask_store\n"
        "from mask_store.format import read_header_file, decode_header, decode_bundle\n"
        f"path = {str(p)!r}\n"
        "h = read_header_file(path)\n"
        "assert h.task == 'sst2', h.task\n"
        "data = open(path, 'rb').read()\n"
        "assert decode_header(data)[0] == h\n"
        "assert decode_bundle(data).header == h\n"
        "assert 'torch' not in sys.modules, 'mask_store imported torch'\n"
        "print('OK', h.task)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "OK sst2"


@pytest.mark.parametrize("old_version", [1, 2])
def test_upgrade_reencodes_v1_and_v2_as_v3_with_the_same_contents(v2_bytes, old_version):
    from mask_store.format import upgrade_bundle

    header, payload = _split(v2_bytes)
    header["format_version"] = old_version
    old_bytes = frame(json.dumps(header).encode(), payload, version=old_version)
    v3 = upgrade_bundle(old_bytes)
    assert v3[:8] == MAGIC and upgrade_bundle(v3) == v3
    old, new = decode_bundle(old_bytes), decode_bundle(v3)
    assert new.header.format_version == 3 and new.masks == old.masks
    for k in old.head:
        np.testing.assert_array_equal(old.head[k], new.head[k])
    assert v3[len(v3) - len(_split(v3)[1]):] == _split(_encode())[1]  # the sections the writer makes of them
    same = {"format_version": True, "masks": {"__all__": {"offset", "nbytes", "sha256", "coding", "pruned"}},
            "head": {"offset"}}
    assert new.header.model_dump(exclude=same) == old.header.model_dump(exclude=same)
    with pytest.raises(BundleInvalid):
        upgrade_bundle(old_bytes[:-3])
