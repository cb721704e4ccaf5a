"""Task bundle format v3 (v1 and v2 still read): one file per task holding its supermask and task head.

Layout of a bundle file (all integers little-endian)::

    offset 0     8 bytes   magic  b"SUPMASK3" (v2: b"SUPMASK2", v1: b"SUPMASK1"; the version is in the magic)
    offset 8     4 bytes   uint32 H, length of the JSON header in bytes
    offset 12    H bytes   JSON header, UTF-8 (schema: :class:`BundleHeader`)
    offset 12+H  32 bytes  v2 and v3: SHA-256 of bytes 0 .. 12+H (magic, length and header)
    then                   payload: one section per mask (v1/v2: packed bits; v3: coded), then the head
                           (safetensors)

Every offset in the header is relative to the start of the payload, and the
file ends exactly where the last section ends (trailing bytes are rejected).
The header records a SHA-256 of every payload section and the sections must
tile the payload, so the header checksum covers the whole file: a flipped
bit anywhere is rejected (v1 has no header checksum: a flip inside a label
name went unnoticed; v1 bundles are still read and flagged as such).

Bounds (so that a header that validates can always be listed, served and
re-serialised): JSON nested at most :data:`MAX_JSON_DEPTH` deep, no NaN or
Infinity, mask sides at most :data:`MAX_MATRIX_SIDE`, ``max_seq_length`` in
[:data:`MIN_SEQ_LENGTH`, :data:`MAX_SEQ_LENGTH`], head weights finite and at
most :data:`MAX_HEAD_ABS` in magnitude.

Masks (Radiya-Dixit & Wang 2020, Eq. 3: ``θ = θ̃ ⊙ μ``) are bit-packed with
:mod:`bitarray`, one bit per weight: the weight matrix of shape ``[out, in]``
is flattened in row-major (C) order, element ``i`` goes to byte ``i // 8``,
bit ``7 - i % 8`` (most significant bit first, ``bitarray(endian="big")``,
the same as ``numpy.packbits(bitorder="big")``). Bit value 1 keeps the
weight, 0 prunes it. Padding bits in the last byte are 0. This packed form is
what :class:`Bundle` holds, whatever the file's version.

Format v3 stores each mask section in the coding its header entry names
(``coding``; v1 and v2 have only ``"packed"``) and records the matrix's
number of pruned weights (``pruned``, needed to decode):

* ``"zstd-gaps"`` (what the writer uses): the gaps between the positions of
  the minority bit, escaped to bytes and compressed as one Zstandard frame
  (RFC 8878) with its content checksum; the section's exact layout is in
  :mod:`mask_store.coding`. The shipped SST-2 task (MiniLM, 2.75 % sparse)
  takes 0.24 MB of masks instead of 1.33 MB, 1.02x their empirical entropy
  ``sum n H(p)`` bits (``benchmarks/results/mask_coding.md``);
* ``"packed"``: the bits as above, written where that is strictly smaller
  (near 50 % sparsity, or a matrix of a few hundred weights).

``nbytes`` and ``sha256`` are those of the stored section, so the section
digests and the header digest cover every byte of a v3 file as of a v2 one.

The task head is a safetensors blob (``classifier.weight`` ``[num_labels, hidden]``
and ``classifier.bias`` ``[num_labels]``, float32). Reading or validating a
bundle needs only numpy, bitarray, pydantic and safetensors' numpy API; no torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from bitarray import bitarray
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from mask_store.coding import (
    CODING_GAPS,
    CODING_PACKED,
    bits_from_positions,
    decode_gaps,
    decode_positions_cached,
    encode_gaps,
    minority_count,
)
from mask_store.errors import BundleInvalid, BundleTooLarge, BundleUnsupported

MAGIC = b"SUPMASK3"
MAGIC_V2 = b"SUPMASK2"
MAGIC_V1 = b"SUPMASK1"
MAGICS = {MAGIC_V1: 1, MAGIC_V2: 2, MAGIC: 3}
"""Magic → format version."""
FORMAT_NAME = "supermask-bundle"
FORMAT_VERSION = 3
SUPPORTED_VERSIONS = (1, 2, 3)
CODED_VERSION = 3
"""The first format version whose masks carry ``coding`` and ``pruned``."""
HEADER_DIGEST_BYTES = 32
MAX_JSON_DEPTH = 32
MAX_MATRIX_SIDE = 1 << 20
MAX_SECTION_BYTES = 1 << 40
MAX_PACKED_MASK_BYTES = 1 << 30
"""v3: the most bytes a header's masks may unpack to (8.6 G weights; a coded section can be far smaller than
what it decodes to, so the file's size alone no longer bounds the memory a decode takes)."""
MIN_SEQ_LENGTH = 8  # the special tokens ([CLS] a [SEP] b [SEP]) and at least a few tokens of each text
MAX_SEQ_LENGTH = 8192
MAX_HEAD_ABS = 1e4
BIT_ORDER = "row-major, msb-first (bitarray endian='big'); 1 = keep, 0 = prune"
MASK_RULE = "mu = 1[sigmoid(nu) > 0.5]"
BUNDLE_SUFFIX = ".smask"
HEAD_WEIGHT = "classifier.weight"
HEAD_BIAS = "classifier.bias"
TASK_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # whole name (re.fullmatch)
MAX_HEADER_BYTES = 4 * 1024 * 1024
_PREFIX = struct.Struct("<8sI")

ProblemType = Literal["single_label_classification", "regression"]
Side = Annotated[int, Field(ge=1, le=MAX_MATRIX_SIDE, strict=True)]
"""One side of a matrix: a JSON integer (not a float such as 1e200) in [1, MAX_MATRIX_SIDE]."""


class MaskEntry(BaseModel):
    """One masked weight matrix."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Parameter name in the backbone, e.g. 'encoder.layer.0.attention.self.query.weight'.")
    shape: list[Side] = Field(description="[out_features, in_features]")
    offset: int = Field(ge=0, le=MAX_SECTION_BYTES, description="Byte offset of the section from the start of the payload.")
    nbytes: int = Field(ge=0, le=MAX_SECTION_BYTES,
                        description="Section length in bytes: ceil(out*in / 8) when packed, the coded length otherwise.")
    sparsity: float = Field(ge=0.0, le=1.0, description="Fraction of zeros (pruned weights).")
    sha256: str = Field(description="SHA-256 of the section's bytes as stored, hex.")
    coding: Literal["packed", "zstd-gaps"] = Field(
        CODING_PACKED, description="v3: how the section stores the mask (mask_store.coding); v1/v2: packed only.")
    pruned: int | None = Field(None, ge=0, le=MAX_MATRIX_SIDE * MAX_MATRIX_SIDE,
                               description="v3: number of pruned weights (zeros), exact; absent in v1/v2.")


class HeadEntry(BaseModel):
    """The dense task head, stored as a safetensors blob."""

    model_config = ConfigDict(extra="forbid")
    offset: int = Field(ge=0, le=MAX_SECTION_BYTES)
    nbytes: int = Field(ge=0, le=MAX_SECTION_BYTES)
    sha256: str
    pooling: Literal["mean"] = "mean"
    tensors: dict[str, list[Side]] = Field(description="Tensor name -> shape.")


class BundleHeader(BaseModel):
    """JSON header of a bundle (formats v1, v2 and v3 share it, v3 adding ``coding`` and ``pruned`` to each
    mask; ``format_version`` must match the magic)."""

    model_config = ConfigDict(extra="forbid")
    format: str
    format_version: int
    task: str
    problem_type: ProblemType
    labels: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        max_length=4096, description="Label names in logit order; empty for regression.")
    text_pairs: bool = Field(False, description="True when every input is a sentence pair (MRPC, RTE, STS-B, WNLI).")
    max_seq_length: int = Field(ge=MIN_SEQ_LENGTH, le=MAX_SEQ_LENGTH)
    backbone_fingerprint: str
    backbone_name: str = ""
    bit_order: str = BIT_ORDER
    mask_rule: str = MASK_RULE
    masks: list[MaskEntry]
    head: HeadEntry
    sparsity: float = Field(ge=0.0, le=1.0, description="Fraction of zeros over all masked weights.")
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: str = ""
    library_version: str = ""

    @model_validator(mode="after")
    def _check(self) -> "BundleHeader":
        if self.format != FORMAT_NAME:
            raise ValueError(f"format is {self.format!r}, expected {FORMAT_NAME!r}")
        if self.format_version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"format_version {self.format_version} is not supported (this reader knows {list(SUPPORTED_VERSIONS)})"
            )
        if not re.fullmatch(TASK_NAME_PATTERN, self.task):
            raise ValueError(f"task name {self.task!r} does not match {TASK_NAME_PATTERN}")
        if self.problem_type == "regression" and self.labels:
            raise ValueError("a regression task has no labels")
        if self.problem_type == "single_label_classification" and len(self.labels) < 2:
            raise ValueError(f"a classification task needs at least 2 labels, got {self.labels}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels}")
        names = [m.name for m in self.masks]
        if len(set(names)) != len(names):
            raise ValueError("mask names are not unique")
        for m in self.masks:
            if len(m.shape) != 2 or min(m.shape) <= 0:
                raise ValueError(f"mask {m.name!r} has shape {m.shape}, expected [out, in] with positive sizes")
            n = m.shape[0] * m.shape[1]
            if self.format_version < CODED_VERSION:
                if m.pruned is not None or "coding" in m.model_fields_set:
                    raise ValueError(f"mask {m.name!r}: 'coding' and 'pruned' are format v{CODED_VERSION} fields, "
                                     f"this is v{self.format_version}")
            else:
                if m.pruned is None:
                    raise ValueError(f"mask {m.name!r}: format v{self.format_version} needs its 'pruned' count")
                if m.pruned > n:
                    raise ValueError(f"mask {m.name!r}: pruned {m.pruned} is more than its {n} weights")
                if abs(m.pruned / n - m.sparsity) > 1e-9:
                    raise ValueError(f"mask {m.name!r} records sparsity {m.sparsity}, its pruned count gives "
                                     f"{m.pruned / n}")
            if m.coding == CODING_PACKED and m.nbytes != math.ceil(n / 8):
                raise ValueError(f"mask {m.name!r}: nbytes {m.nbytes} does not fit shape {m.shape}")
            if m.coding == CODING_GAPS and (m.nbytes == 0) != (minority_count(n, m.pruned)[1] == 0):
                raise ValueError(f"mask {m.name!r}: a {m.coding} section of {m.nbytes} bytes for {m.pruned} pruned "
                                 f"of {n} weights (empty exactly when all are kept or all pruned)")
        if self.format_version >= CODED_VERSION and self.packed_mask_bytes > MAX_PACKED_MASK_BYTES:
            raise ValueError(f"the masks would unpack to {self.packed_mask_bytes} bytes, more than "
                             f"{MAX_PACKED_MASK_BYTES}")
        return self

    @property
    def num_outputs(self) -> int:
        """Width of the head's output: number of labels, or 1 for regression."""
        return 1 if self.problem_type == "regression" else len(self.labels)

    @property
    def masked_weights(self) -> int:
        return sum(m.shape[0] * m.shape[1] for m in self.masks)

    @property
    def packed_mask_bytes(self) -> int:
        """Bytes of the masks bit-packed (what :class:`Bundle` holds): ``sum ceil(out * in / 8)``."""
        return sum((m.shape[0] * m.shape[1] + 7) // 8 for m in self.masks)


@dataclass(frozen=True)
class Bundle:
    """A validated bundle: header, packed masks and head tensors.

    ``masks`` maps each parameter name to its packed bytes (see module
    docstring for the bit order), whatever the file's version and coding
    (a read-only :class:`PackedMasks`: a coded mask is unpacked when read);
    ``head`` maps tensor names to float32 arrays. ``size_bytes`` is the size
    of the encoded file. ``stored_masks`` maps each name to its section's
    bytes as stored when its coding is not ``"packed"`` (v3; decode one with
    :func:`decode_mask_section`), so that a cache can hold the coded form.
    """

    header: BundleHeader
    masks: Mapping[str, bytes]
    head: dict[str, np.ndarray]
    size_bytes: int
    stored_masks: dict[str, bytes] = field(default_factory=dict)

    def mask_array(self, name: str) -> np.ndarray:
        """Unpack one mask to a bool array of the recorded shape ``[out, in]``.

        Raises:
            KeyError: the bundle has no mask named ``name``.
        """
        entry = next((m for m in self.header.masks if m.name == name), None)
        if entry is None:
            raise KeyError(f"bundle has no mask {name!r}")
        return unpack_mask(self.masks[name], tuple(entry.shape))


class PackedMasks(Mapping):
    """Parameter name → packed mask bytes (:attr:`Bundle.masks`), in the header's order; a coded (v3
    ``"zstd-gaps"``) section, already validated, is unpacked on first access (from its cached positions,
    :func:`mask_store.coding.decode_positions_cached`) and kept: a serving tier that holds the coded form and reads
    its positions (:func:`pruned_positions`) never pays for the ``out · in``-bit form it does not use. Not a dict:
    read-only; membership and iteration unpack nothing.

    Args:
        order: every mask name, in the header's order.
        packed: names whose packed bytes are at hand (packed sections).
        coded: name → ``(section, n, pruned)`` of each coded section.
    """

    def __init__(self, order: list[str], packed: dict[str, bytes], coded: dict[str, tuple[bytes, int, int]]):
        self._order = list(order)
        self._packed = dict(packed)
        self._coded = dict(coded)

    def __getitem__(self, name: str) -> bytes:
        got = self._packed.get(name)
        if got is not None:
            return got
        section, n, pruned = self._coded[name]  # KeyError: no such mask
        return self._packed.setdefault(name, bits_from_positions(*decode_positions_cached(section, n, pruned), n))

    def __contains__(self, name: object) -> bool:
        return name in self._packed or name in self._coded

    def __iter__(self):
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


def pack_mask(mask: np.ndarray) -> bytes:
    """Pack a boolean mask (any shape, row-major) into bytes, 1 bit per element.

    Args:
        mask: array of bool (or 0/1 integers); True/1 keeps the weight.
    Returns:
        ``ceil(mask.size / 8)`` bytes, MSB first, padding bits zero.
    """
    flat = np.ascontiguousarray(mask, dtype=np.uint8).reshape(-1)
    bits = bitarray(endian="big")
    bits.pack(flat.tobytes())
    return bits.tobytes()


def unpack_mask(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_mask`: bytes -> bool array of ``shape``.

    Raises:
        BundleInvalid: ``data`` has the wrong length for ``shape``.
    """
    n = int(np.prod(shape))
    if len(data) != math.ceil(n / 8):
        raise BundleInvalid(f"packed mask has {len(data)} bytes, expected {math.ceil(n / 8)} for shape {list(shape)}")
    bits = bitarray(endian="big")
    bits.frombytes(data)
    del bits[n:]
    return np.frombuffer(bits.unpack(), dtype=np.uint8).astype(bool).reshape(shape)


def encode_mask_section(mask: np.ndarray, format_version: int = FORMAT_VERSION) -> tuple[str, bytes, int]:
    """Store one mask as a bundle section of ``format_version``.

    Args:
        mask: bool (or 0/1) array ``[out, in]``; True keeps the weight.
        format_version: 1 or 2 (always ``"packed"``) or 3 (``"zstd-gaps"``, or ``"packed"`` where that is
            strictly smaller: near 50 % sparsity, or a matrix of a few hundred weights).
    Returns:
        ``(coding, section bytes, pruned)``, ``pruned`` the number of zeros.
    """
    packed = pack_mask(mask)
    pruned = int(np.size(mask) - np.count_nonzero(mask))
    if format_version < CODED_VERSION:
        return CODING_PACKED, packed, pruned
    coded, _ = encode_gaps(mask)
    return (CODING_PACKED, packed, pruned) if len(packed) < len(coded) else (CODING_GAPS, coded, pruned)


def decode_mask_section(coding: str, section: bytes, shape: tuple[int, int] | list[int], pruned: int | None) -> bytes:
    """The packed bits (:func:`pack_mask`'s form) of one stored mask section.

    Args:
        coding: the entry's ``coding``, ``"packed"`` or ``"zstd-gaps"``.
        section: the section's bytes as stored.
        shape: ``[out, in]``.
        pruned: the entry's ``pruned`` count (v3; ``None`` for a v1/v2 packed section).
    Returns:
        ``ceil(out * in / 8)`` bytes, padding bits 0.
    Raises:
        BundleInvalid: the section does not decode (see :func:`mask_store.coding.decode_gaps`), its
            padding bits are set, or its number of zeros is not ``pruned``.
    """
    return _decode_section(coding, section, int(shape[0]) * int(shape[1]), pruned)[0]


def pruned_positions(coding: str, section: bytes, shape: tuple[int, int] | list[int], pruned: int | None) -> np.ndarray:
    """The row-major positions of one stored mask's zeros (its pruned weights), int64 ``[zeros]`` ascending.

    Arguments as :func:`decode_mask_section`. For a ``"zstd-gaps"`` section that codes the zeros (at most half
    pruned: every supermask of the papers) the positions come straight from the gaps, in O(zeros) time and
    memory; one that codes the kept weights gives the complement of its decoded positions (O(n), decoded once);
    a packed section is unpacked and scanned.

    Raises:
        BundleInvalid: as :func:`decode_mask_section`.
    """
    n = int(shape[0]) * int(shape[1])
    if coding == CODING_GAPS and pruned is not None:
        bit, idx = decode_positions_cached(section, n, pruned)
        if bit == 0:
            return idx
        kept = np.zeros(n, dtype=bool)
        kept[idx] = True
        return np.flatnonzero(~kept)
    packed, _ = _decode_section(coding, section, n, pruned)
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8), count=n, bitorder="big")
    return np.flatnonzero(bits == 0)


def _decode_section(coding: str, section: bytes, n: int, pruned: int | None) -> tuple[bytes, int]:
    """:func:`decode_mask_section` for ``n`` weights; returns ``(packed bits, number of zeros)``."""
    if coding == CODING_GAPS:
        if pruned is None:
            raise BundleInvalid(f"a {coding} section needs its pruned count")
        return decode_gaps(section, n, pruned), pruned  # exactly ``pruned`` zeros and padding 0, or it raises
    if coding != CODING_PACKED:
        raise BundleInvalid(f"unknown mask coding {coding!r}")
    if len(section) != math.ceil(n / 8):
        raise BundleInvalid(f"packed mask has {len(section)} bytes, expected {math.ceil(n / 8)} for {n} weights")
    zeros, tail_ones = _zeros_of_packed(section, n)
    if tail_ones:
        raise BundleInvalid("non-zero padding bits")
    if pruned is not None and zeros != pruned:
        raise BundleInvalid(f"its bits hold {zeros} zeros, the header records pruned {pruned}")
    return bytes(section), zeros


def _zeros_of_packed(data: bytes, n: int) -> tuple[int, int]:
    """``(zeros among the first n bits, ones among the padding bits)`` of packed bits."""
    bits = bitarray(endian="big")
    bits.frombytes(data)
    return bits.count(0, 0, n), bits.count(1, n)


def _sparsity_of_packed(data: bytes, n: int) -> tuple[float, int]:
    zeros, tail_ones = _zeros_of_packed(data, n)
    return zeros / n, tail_ones


def encode_bundle(
    *,
    task: str,
    problem_type: ProblemType,
    labels: list[str],
    max_seq_length: int,
    backbone_fingerprint: str,
    masks: dict[str, np.ndarray],
    head: dict[str, np.ndarray],
    backbone_name: str = "",
    text_pairs: bool = False,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    created_at: str = "",
    library_version: str = "",
    mask_rule: str = MASK_RULE,
    format_version: int = FORMAT_VERSION,
) -> bytes:
    """Encode a bundle file.

    Args:
        masks: parameter name -> bool array ``[out, in]`` (True keeps the weight).
        mask_rule: how the stored bits were derived from the mask scores (recorded, not applied).
        head: ``classifier.weight`` ``[num_outputs, hidden]`` and ``classifier.bias``
            ``[num_outputs]``, converted to float32.
        format_version: 3 (default: entropy-coded masks, :func:`encode_mask_section`), or 2 (packed bits; for
            readers older than v3 and for comparisons).
    Returns:
        The bundle's bytes; :func:`decode_bundle` of them returns an equal bundle.
    Raises:
        BundleInvalid: the header would not validate (bad task name, labels, shapes).
        ValueError: ``format_version`` is not 2 or 3.
    """
    if format_version not in (2, FORMAT_VERSION):
        raise ValueError(f"bundles are written as format v2 or v{FORMAT_VERSION}, not v{format_version}")
    payload = bytearray()
    entries = []
    total = zeros = 0
    coded = format_version >= CODED_VERSION
    for name, mask in masks.items():
        mask = np.asarray(mask, dtype=bool)
        coding, section, n_zero = encode_mask_section(mask, format_version)
        entries.append(
            MaskEntry(
                name=name,
                shape=list(mask.shape),
                offset=len(payload),
                nbytes=len(section),
                sparsity=n_zero / mask.size,
                sha256=hashlib.sha256(section).hexdigest(),
                **({"coding": coding, "pruned": n_zero} if coded else {}),
            )
        )
        payload += section
        total += mask.size
        zeros += n_zero
    head32 = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in head.items()}
    head_blob = st_save(head32)
    head_entry = HeadEntry(
        offset=len(payload),
        nbytes=len(head_blob),
        sha256=hashlib.sha256(head_blob).hexdigest(),
        tensors={k: list(v.shape) for k, v in head32.items()},
    )
    payload += head_blob
    try:
        header = BundleHeader(
            format=FORMAT_NAME,
            format_version=format_version,
            task=task,
            problem_type=problem_type,
            labels=list(labels),
            text_pairs=text_pairs,
            max_seq_length=max_seq_length,
            backbone_fingerprint=backbone_fingerprint,
            backbone_name=backbone_name,
            masks=entries,
            head=head_entry,
            sparsity=zeros / total if total else 0.0,
            training=training or {},
            metrics=metrics or {},
            created_at=created_at,
            library_version=library_version,
            mask_rule=mask_rule,
        )
    except ValidationError as exc:
        raise BundleInvalid(_pydantic_reason(exc)) from None
    _check_head_shapes(header)
    v3_only = None if coded else {"masks": {"__all__": {"coding", "pruned"}}}
    return frame(header.model_dump_json(exclude=v3_only).encode("utf-8"), bytes(payload), version=format_version)


def frame(header_json: bytes, payload: bytes, version: int = FORMAT_VERSION) -> bytes:
    """Assemble a bundle file from its JSON header bytes and payload: magic, header length, header,
    (v2, v3) the header's SHA-256, payload. Nothing is validated (tools and tests that edit a header
    re-frame it with this).

    Args:
        header_json: UTF-8 JSON bytes of the header.
        payload: the mask sections and the head blob, as the header's offsets describe them.
        version: 3 (default) or 2 (with the header digest), or 1 (the legacy layout, no digest).
    Raises:
        ValueError: an unknown ``version``.
    """
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"unknown bundle format version {version}")
    magic = next(m for m, v in MAGICS.items() if v == version)
    prefix = _PREFIX.pack(magic, len(header_json)) + header_json
    digest = hashlib.sha256(prefix).digest() if version >= 2 else b""
    return prefix + digest + payload


def upgrade_bundle(data: bytes) -> bytes:
    """A v1 or v2 bundle re-encoded as v3: every mask section coded (:func:`encode_mask_section`), each
    mask entry's ``offset``, ``nbytes``, ``sha256`` given for the new section and ``coding``, ``pruned``
    added, the head moved after them unchanged, every other header field kept as written, the header's
    SHA-256 added; a v3 bundle is returned unchanged.

    Returns:
        The v3 bytes, checked to decode to the same packed masks, head and header fields.
    Raises:
        BundleInvalid / BundleTooLarge: ``data`` is not a valid bundle (it is fully checked first).
    """
    bundle = decode_bundle(data)
    if bundle.header.format_version == FORMAT_VERSION:
        return data
    (hlen,) = struct.unpack_from("<I", data, len(MAGIC_V1))
    raw = json.loads(data[_PREFIX.size:_PREFIX.size + hlen])
    raw["format_version"] = FORMAT_VERSION
    payload = bytearray()
    for m, entry in zip(raw["masks"], bundle.header.masks):  # the sections laid out anew, in header order
        coding, section, pruned = encode_mask_section(bundle.mask_array(entry.name), FORMAT_VERSION)
        m.update(offset=len(payload), nbytes=len(section), sha256=hashlib.sha256(section).hexdigest(),
                 coding=coding, pruned=pruned)
        payload += section
    head = bundle.header.head
    _, start = decode_header(data)
    raw["head"]["offset"] = len(payload)
    payload += data[start + head.offset:start + head.offset + head.nbytes]
    upgraded = frame(json.dumps(raw, separators=(",", ":")).encode("utf-8"), bytes(payload))
    new = decode_bundle(upgraded)
    if new.masks != bundle.masks or any(not np.array_equal(new.head[k], v) for k, v in bundle.head.items()):
        raise BundleInvalid("the upgraded bundle does not decode to the same masks and head")  # a coder bug
    return upgraded


def _json_depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), computed without recursion; stops past ``limit``."""
    depth, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            if d > limit:
                return d
            depth = max(depth, d)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return depth


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _pydantic_reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "header"
        parts.append(f"{loc}: {err['msg']}")
    return "invalid header: " + "; ".join(parts)


def _check_head_shapes(header: BundleHeader) -> None:
    t = header.head.tensors
    if set(t) != {HEAD_WEIGHT, HEAD_BIAS}:
        raise BundleInvalid(f"head must hold exactly {HEAD_WEIGHT!r} and {HEAD_BIAS!r}, found {sorted(t)}")
    w, b = t[HEAD_WEIGHT], t[HEAD_BIAS]
    if len(w) != 2 or w[0] != header.num_outputs or b != [header.num_outputs]:
        raise BundleInvalid(
            f"head shapes {HEAD_WEIGHT}={w}, {HEAD_BIAS}={b} do not fit {header.num_outputs} outputs "
            f"({header.problem_type}, labels {header.labels})"
        )


def decode_header(data: bytes) -> tuple[BundleHeader, int]:
    """Parse and validate the header only.

    Args:
        data: the bundle's bytes, or at least its first ``12 + H`` bytes (v2, v3: ``12 + H + 32``).
    Returns:
        ``(header, payload_start)`` where ``payload_start`` is the byte offset of the payload.
    Raises:
        BundleInvalid: wrong magic, truncated header, a v2/v3 header whose SHA-256 does not match, bad
            JSON (NaN / Infinity, nesting deeper than :data:`MAX_JSON_DEPTH` included), a header that
            fails the schema (unknown format version, a version that is not the magic's, sizes out of
            range) or that would not serialise again.
    """
    if len(data) < _PREFIX.size:
        raise BundleInvalid(f"file is {len(data)} bytes, too short to be a bundle (at least {_PREFIX.size})")
    magic, hlen = _PREFIX.unpack_from(data, 0)
    version = MAGICS.get(magic)
    if version is None and magic[:7] == MAGIC[:7] and magic[7:].isdigit() and int(magic[7:]) > FORMAT_VERSION:
        raise BundleUnsupported(f"bundle format version {magic[7:].decode()} is newer than this reader's "
                                f"{list(SUPPORTED_VERSIONS)} (magic {magic!r})")
    if version is None:
        raise BundleInvalid(f"not a supermask bundle: magic is {magic!r}, expected {MAGIC!r} "
                            f"(or {MAGIC_V2!r}, {MAGIC_V1!r})")
    if hlen > MAX_HEADER_BYTES:
        raise BundleInvalid(f"header length {hlen} exceeds {MAX_HEADER_BYTES} bytes")
    end = _PREFIX.size + hlen
    if len(data) < end:
        raise BundleInvalid(f"truncated: header needs {hlen} bytes, only {len(data) - _PREFIX.size} present")
    if version >= 2:
        digest = bytes(data[end : end + HEADER_DIGEST_BYTES])
        if len(digest) < HEADER_DIGEST_BYTES:
            raise BundleInvalid("truncated: the header's SHA-256 is missing")
        if hashlib.sha256(data[:end]).digest() != digest:
            raise BundleInvalid("header checksum mismatch: the bundle's header is corrupted")
    try:
        raw = json.loads(bytes(data[_PREFIX.size : end]).decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, NaN; also ints over 4300 digits, deep nesting
        raise BundleInvalid(f"header is not valid UTF-8 JSON: {str(exc)[:200] or type(exc).__name__}") from None
    if _json_depth(raw, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise BundleInvalid(f"header JSON is nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        header = BundleHeader.model_validate(raw)
    except ValidationError as exc:
        raise BundleInvalid(_pydantic_reason(exc)) from None
    except (RecursionError, OverflowError, ValueError) as exc:  # a validator's arithmetic on extreme values
        raise BundleInvalid(f"invalid header: {type(exc).__name__}: {str(exc)[:200]}") from None
    if header.format_version != version:
        raise BundleInvalid(f"header says format_version {header.format_version}, the magic {magic!r} says {version}")
    try:  # what the API lists must serialise: a header that validates but cannot be dumped is refused here
        header.model_dump_json()
    except Exception as exc:  # pydantic's PydanticSerializationError and recursion limits
        raise BundleInvalid(f"header cannot be serialised: {str(exc)[:200]}") from None
    _check_head_shapes(header)
    return header, end + (HEADER_DIGEST_BYTES if version >= 2 else 0)


def decode_bundle(data: bytes, max_bytes: int | None = None) -> Bundle:
    """Fully validate a bundle and return its contents.

    Checks, in order: size limit, magic, header schema and version, that every
    section lies inside the file with no overlap and the file ends where the
    last section ends, each section's SHA-256, that each coded (v3) section
    decodes to exactly its recorded pruned count, padding bits, each mask's
    recorded sparsity, and the head tensors' shapes and dtypes.

    Raises:
        BundleTooLarge: ``len(data) > max_bytes``, or (v3) the masks would unpack to more than ``max_bytes``
            (what their v2 form would have had to fit in; checked before anything is decoded).
        BundleInvalid: any other check fails; the message names it.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise BundleTooLarge(len(data), max_bytes)
    header, start = decode_header(data)
    if max_bytes is not None and header.packed_mask_bytes > max_bytes:
        raise BundleTooLarge(header.packed_mask_bytes, max_bytes, what="the bundle's masks unpacked")
    # released on exit, also when a check raises: ``data`` may be a memory map its caller closes
    with memoryview(data)[start:] as payload:
        masks, stored, head = _check_payload(header, payload)
    return Bundle(header=header, masks=masks, head=head, size_bytes=len(data), stored_masks=stored)


def _check_payload(header: BundleHeader, payload: memoryview
                   ) -> tuple[PackedMasks, dict[str, bytes], dict[str, np.ndarray]]:
    """The payload checks of :func:`decode_bundle`; returns the packed masks (coded ones unpacked on first use),
    the coded sections (v3, not packed) and the head, all copies."""
    sections = [(m.offset, m.nbytes, f"mask {m.name!r}") for m in header.masks]
    sections.append((header.head.offset, header.head.nbytes, "head"))
    sections.sort()
    cursor = 0
    for offset, nbytes, what in sections:
        if offset != cursor:
            raise BundleInvalid(f"{what} starts at payload offset {offset}, expected {cursor} (gap or overlap)")
        cursor = offset + nbytes
    if len(payload) < cursor:
        raise BundleInvalid(f"truncated: payload is {len(payload)} bytes, header describes {cursor}")
    if len(payload) > cursor:
        raise BundleInvalid(f"{len(payload) - cursor} unexpected trailing bytes after the last section")
    masks: dict[str, bytes] = {}
    coded: dict[str, tuple[bytes, int, int]] = {}
    stored: dict[str, bytes] = {}
    for m in header.masks:
        blob = bytes(payload[m.offset : m.offset + m.nbytes])
        if hashlib.sha256(blob).hexdigest() != m.sha256:
            raise BundleInvalid(f"checksum mismatch in mask {m.name!r}: the bundle is corrupted")
        n = m.shape[0] * m.shape[1]
        try:
            if m.coding == CODING_GAPS and m.pruned is not None:
                # decoding the positions checks all the section's invariants (see decode_positions); its bits are
                # unpacked on first use (PackedMasks), the positions kept for the serving tier's next read
                decode_positions_cached(blob, n, m.pruned)
                coded[m.name], zeros = (blob, n, m.pruned), m.pruned
            else:
                masks[m.name], zeros = _decode_section(m.coding, blob, n, m.pruned)
        except BundleInvalid as exc:
            raise BundleInvalid(f"mask {m.name!r}: {exc}") from None
        if abs(zeros / n - m.sparsity) > 1e-9:  # v3: the header's validator already held it to pruned / n
            raise BundleInvalid(f"mask {m.name!r} records sparsity {m.sparsity}, its bits give {zeros / n}")
        if m.coding != CODING_PACKED:
            stored[m.name] = blob
    head_blob = bytes(payload[header.head.offset : header.head.offset + header.head.nbytes])
    if hashlib.sha256(head_blob).hexdigest() != header.head.sha256:
        raise BundleInvalid("checksum mismatch in the task head: the bundle is corrupted")
    try:
        head = st_load(head_blob)
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise BundleInvalid(f"task head is not a valid safetensors blob: {exc}") from None
    for name, shape in header.head.tensors.items():
        arr = head.get(name)
        if arr is None or list(arr.shape) != shape or arr.dtype != np.float32:
            got = None if arr is None else f"{arr.dtype}{list(arr.shape)}"
            raise BundleInvalid(f"head tensor {name!r}: header says float32{shape}, blob holds {got}")
        if not np.all(np.isfinite(arr)):
            raise BundleInvalid(f"head tensor {name!r} holds non-finite values")
        if arr.size and float(np.abs(arr).max()) > MAX_HEAD_ABS:
            raise BundleInvalid(f"head tensor {name!r} holds values of magnitude {float(np.abs(arr).max()):.3g}, "
                                f"more than {MAX_HEAD_ABS:g}: its logits could overflow (not a trained head)")
    return PackedMasks([m.name for m in header.masks], masks, coded), stored, head


def read_header_file(path: str) -> BundleHeader:
    """Read and validate only the header of a bundle file (no payload checks, no torch).

    Raises:
        BundleInvalid: as :func:`decode_header`. OSError: the file cannot be read.
    """
    with open(path, "rb") as fh:
        prefix = fh.read(_PREFIX.size)
        if len(prefix) == _PREFIX.size:
            _, hlen = _PREFIX.unpack(prefix)
            prefix += fh.read(min(hlen, MAX_HEADER_BYTES + 1) + HEADER_DIGEST_BYTES)
    return decode_header(prefix)[0]
