"""Entropy coding of one supermask matrix for bundle format v3 (coding ``"zstd-gaps"``).

A supermask at 1-5 % sparsity carries far less than one bit per weight: the empirical entropy of a
matrix with ``n`` weights of which a fraction ``p`` is pruned is ``n * H(p)`` bits, ``H(p) = -p log2 p -
(1 - p) log2(1 - p)`` (H(0.0275) = 0.18 bit). This module codes the positions of the *minority* bits
(the pruned weights when at most half are pruned, else the kept ones) as the gaps between them, and
leaves the entropy coding to Zstandard (RFC 8878, the ``zstandard`` package): its Huffman-coded
literals bring a geometric gap distribution to within a few percent of ``n * H(p)``.

Layout of a coded section (the byte layout of the whole file is in :mod:`mask_store.format`)::

    n = out * in weights, row-major; P = the header's ``pruned`` count (zeros)
    minority bit m = 0 when P <= n - P, else 1;  k = min(P, n - P) positions i_0 < ... < i_{k-1} hold m
    gap g_j = i_j - i_{j-1} - 1   (i_{-1} = -1), each written as floor(g_j / 255) bytes 0xFF
              and then one byte g_j mod 255 (< 0xFF): k terminal bytes in all, none after the last
    section = one Zstandard frame of those bytes, content size in the frame header, with the frame's
              content checksum (XXH64, 4 bytes), no dictionary; an empty section (0 bytes) when k = 0
              (every weight kept, or every weight pruned)

Decoding is vectorised numpy (a cumulative sum over the gap bytes, a scatter into a bool array, then
``numpy.packbits``) and returns the same packed bits as :func:`mask_store.format.pack_mask` (``numpy.packbits``
``bitorder="big"``, padding bits 0). Measured by ``benchmarks/mask_coding.py`` (2-core AMD EPYC): the shipped
MiniLM bundles and random 1-5 % MiniLM masks code to 1.02-1.03x their empirical entropy (worst matrix 1.07x),
and a whole task's 36 masks decode in 2.2-3.5 ms (median, one thread). ANS through ``constriction`` came to
1.001x but decoded in 14 ms; ``numpy.packbits`` + zstd to 1.17-1.20x.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import zstandard
from cachetools import LRUCache

from mask_store.errors import BundleInvalid

CODING_PACKED = "packed"
"""One bit per weight, the v1/v2 layout (v3 keeps it for a matrix where it is the smaller form)."""
CODING_GAPS = "zstd-gaps"
"""Gaps between minority positions, escaped to bytes, one Zstandard frame (see the module docstring)."""
CODINGS = (CODING_PACKED, CODING_GAPS)
ESCAPE = 0xFF
BOOL_SCRATCH_MAX_WEIGHTS = 1 << 24
"""Matrices up to this many weights are decoded through a bool ``[n]`` scratch array and ``numpy.packbits``
(fastest: 1 byte of scratch per weight); larger ones are scattered into the packed bytes directly."""
ZSTD_LEVEL = 19
"""The writer's compression level (the decoder reads any level). Measured when v3 was chosen, on the SST-2
masks and random MiniLM-shaped masks at 1, 3, 5 and 50 % sparsity: at 1-5 % levels 3, 9, 19 and 22 code to
within 0.2 % of each other; at 50 % levels 3 and 9 are 26-31 % larger than 19 and 22 (which tie). 19 writes a
3 %-sparse MiniLM task in about 0.05 s."""


def minority_count(n: int, pruned: int) -> tuple[int, int]:
    """``(bit value coded, number of its positions)`` for a matrix of ``n`` weights with ``pruned`` zeros:
    ``(0, pruned)`` when ``pruned <= n - pruned``, else ``(1, n - pruned)``."""
    return (0, pruned) if 2 * pruned <= n else (1, n - pruned)


def max_stream_bytes(n: int, pruned: int) -> int:
    """Upper bound on the uncoded gap stream of a valid section: ``k`` terminal bytes plus at most
    ``(n - k) // 255`` escapes (the gaps sum to at most ``n - k``)."""
    _, k = minority_count(n, pruned)
    return k + (n - k) // (ESCAPE)


def encode_gaps(mask: np.ndarray) -> tuple[bytes, int]:
    """Code a boolean mask as a ``"zstd-gaps"`` section.

    Args:
        mask: bool (or 0/1) array of any shape, flattened row-major; True/1 keeps the weight.
    Returns:
        ``(section bytes, pruned)``: the coded section (empty when every weight is kept or every one is
        pruned) and the number of zeros, which the header records (the decoder needs it).
    """
    flat = np.ascontiguousarray(mask, dtype=bool).reshape(-1)
    n = flat.size
    pruned = int(n - np.count_nonzero(flat))
    bit, k = minority_count(n, pruned)
    if k == 0:
        return b"", pruned
    idx = np.flatnonzero(flat if bit else ~flat)  # int64 [k], ascending
    gaps = np.diff(idx, prepend=-1) - 1  # int64 [k], >= 0
    escapes = gaps // ESCAPE
    stream = np.full(k + int(escapes.sum()), ESCAPE, dtype=np.uint8)
    stream[np.cumsum(escapes + 1) - 1] = (gaps % ESCAPE).astype(np.uint8)
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True,
                                    write_dict_id=False)
    return cctx.compress(stream.tobytes()), pruned


def decode_gaps(section: bytes, n: int, pruned: int) -> bytes:
    """Decode a ``"zstd-gaps"`` section to packed mask bits.

    Args:
        section: the coded bytes (see the module docstring).
        n: number of weights, ``out * in``.
        pruned: number of zeros the header records, in ``[0, n]``.
    Returns:
        ``ceil(n / 8)`` bytes, row-major, most significant bit first, padding bits 0: equal to
        ``numpy.packbits(mask, bitorder="big")`` of the coded mask.
    Raises:
        BundleInvalid: as :func:`decode_positions`.
    """
    return bits_from_positions(*decode_positions(section, n, pruned), n)


def bits_from_positions(bit: int, idx: np.ndarray, n: int) -> bytes:
    """Packed mask bits (as :func:`decode_gaps` returns them) from :func:`decode_positions`' ``(bit, idx)``: every
    one of the ``n`` weights the majority value ``1 - bit`` but those at ``idx`` (int64, ascending)."""
    nbytes = (n + 7) // 8
    if idx.size == 0:
        return _fill(bit ^ 1, n, nbytes).tobytes()
    if n <= BOOL_SCRATCH_MAX_WEIGHTS:
        bits = np.full(n, not bit, dtype=bool)  # bool [n]: the majority value everywhere
        bits[idx] = bool(bit)
        return np.packbits(bits, bitorder="big").tobytes()  # SIMD in numpy: faster than the scatter below
    out = _fill(bit ^ 1, n, nbytes)  # uint8 [nbytes]; scratch O(k), not O(n)
    byte = idx >> 3
    starts = np.flatnonzero(np.diff(byte, prepend=-1))  # the first position in each byte touched
    out[byte[starts]] ^= np.bitwise_or.reduceat((0x80 >> (idx & 7)).astype(np.uint8), starts)
    return out.tobytes()


def decode_positions(section: bytes, n: int, pruned: int) -> tuple[int, np.ndarray]:
    """Decode a ``"zstd-gaps"`` section to the positions of its minority bit, without the ``n``-bit mask.

    Args:
        section, n, pruned: as :func:`decode_gaps`.
    Returns:
        ``(bit, idx)``: the minority bit value (0: ``idx`` are the pruned weights; 1: the kept ones, more than
        half were pruned) and int64 ``[k]`` strictly ascending row-major positions, ``k = min(pruned, n - pruned)``
        (empty when every weight is kept or every one is pruned). A serving tier that needs only the pruned
        positions of a sparse mask (:mod:`service.sparse_forms`) reads them here in O(k).
    Raises:
        BundleInvalid: the section is not one valid Zstandard frame with its content size and content
            checksum (a corrupted frame fails the checksum even where the header's SHA-256 was recomputed),
            decodes to more bytes than :func:`max_stream_bytes` allows, holds another number of positions
            than ``pruned`` implies, ends in an escape, or places a position at or past ``n``.
    """
    if not 0 <= pruned <= n:
        raise BundleInvalid(f"pruned count {pruned} is outside [0, {n}]")
    bit, k = minority_count(n, pruned)
    if k == 0:
        if section:
            raise BundleInvalid(f"coded section has {len(section)} bytes, expected none for {pruned} pruned of {n}")
        return bit, np.zeros(0, dtype=np.int64)
    stream = _decompress(section, max_stream_bytes(n, pruned))
    is_escape = stream == ESCAPE  # bool [L]
    terminals = len(stream) - int(np.count_nonzero(is_escape))
    if terminals != k:
        raise BundleInvalid(f"coded section holds {terminals} positions, the header's pruned count implies {k}")
    if is_escape[-1]:
        raise BundleInvalid("coded section ends in an escape byte")
    advance = stream.astype(np.int64) + 1  # a terminal byte r: r weights of the majority, then one of the minority
    advance[is_escape] = ESCAPE  # an escape: 255 weights of the majority
    idx = np.cumsum(advance)[~is_escape] - 1  # int64 [k], strictly ascending
    if idx[-1] >= n:
        raise BundleInvalid(f"coded section places a weight at index {int(idx[-1])}, past the matrix's {n}")
    return bit, idx


POSITIONS_CACHE_BYTES = 16 << 20
"""Bytes of decoded positions :func:`decode_positions_cached` keeps (a MiniLM task at 5 % pruned: ~4.2 MB)."""

# value (bit, idx, len(section)): the key keeps its section alive, so its bytes count too
_positions: LRUCache = LRUCache(maxsize=POSITIONS_CACHE_BYTES, getsizeof=lambda v: v[1].nbytes + v[2] + 64)
_positions_lock = threading.Lock()


def decode_positions_cached(section: bytes, n: int, pruned: int) -> tuple[int, np.ndarray]:
    """:func:`decode_positions`, the result kept in a small LRU (:data:`POSITIONS_CACHE_BYTES`, keyed by the
    section's bytes, which count against it too): a task load validates every section by decoding it, and the
    serving tier's sparse form (or the packed bits, :func:`bits_from_positions`) reads the same positions right
    after; decoded once, not twice, while they fit. The array is read-only (shared); ``section`` may be any bytes-like
    object (a copy is the key).

    Raises:
        BundleInvalid: as :func:`decode_positions` (failures are not cached).
    """
    key = (bytes(section), n, pruned)
    with _positions_lock:
        got = _positions.get(key)
    if got is not None:
        return got[0], got[1]
    bit, idx = decode_positions(section, n, pruned)
    idx.flags.writeable = False
    value = (bit, idx, len(section))
    with _positions_lock:
        if _positions.getsizeof(value) <= POSITIONS_CACHE_BYTES:
            _positions[key] = value
    return bit, idx


def _fill(value: int, n: int, nbytes: int) -> np.ndarray:
    """uint8 ``[nbytes]`` with every one of the ``n`` bits set to ``value`` and the padding bits 0."""
    out = np.full(nbytes, 0xFF if value else 0, dtype=np.uint8)
    if value and n % 8:
        out[-1] = (0xFF << (8 - n % 8)) & 0xFF
    return out


def _decompress(section: bytes, limit: int) -> np.ndarray:
    try:
        params = zstandard.get_frame_parameters(section)
    except zstandard.ZstdError as exc:
        raise BundleInvalid(f"coded section is not a Zstandard frame: {exc}") from None
    size = params.content_size
    if size in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR) or size < 0:
        raise BundleInvalid("coded section's Zstandard frame does not record its content size")
    if not params.has_checksum:
        raise BundleInvalid("coded section's Zstandard frame has no content checksum")
    if not 0 < size <= limit:
        raise BundleInvalid(f"coded section claims {size} bytes of gaps, outside [1, {limit}]")
    try:
        raw = zstandard.ZstdDecompressor().decompress(section, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise BundleInvalid(f"coded section does not decompress: {str(exc)[:200]}") from None
    if len(raw) != size:  # zstd checks this itself; kept so that the bound above cannot be bypassed
        raise BundleInvalid(f"coded section decompressed to {len(raw)} bytes, its frame says {size}")
    return np.frombuffer(raw, dtype=np.uint8)


def entropy_bits(n: int, pruned: int) -> float:
    """Empirical entropy ``n * H(pruned / n)`` of a matrix in bits (0 for an all-kept or all-pruned one)."""
    if pruned in (0, n):
        return 0.0
    p = pruned / n
    return -n * (p * math.log2(p) + (1 - p) * math.log2(1 - p))
