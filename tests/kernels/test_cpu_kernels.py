"""CPU masked kernels and torch-side bit packing vs the references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mask_store.format import pack_mask
from backbone import dequantize
from service.kernels import cpu
from service.kernels import sparse_complement as sc
from service.kernels.packing import pack_bits, unpack_bits
from service.kernels.reference import masked_linear_packed_reference, masked_linear_reference

SHAPES = [(384, 384), (1536, 384), (384, 1536), (768, 768), (7, 13)]  # [out, in]
SPARSITIES = [0.0, 0.01, 0.13, 0.5]


def _problem(out, in_, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w_q = torch.randint(-127, 128, (out, in_), dtype=torch.int8, generator=g)
    scale = torch.rand(out, generator=g) * 0.02 + 1e-3
    bias = torch.randn(out, generator=g)
    mask = torch.rand(out, in_, generator=g) >= sparsity
    x = torch.randn(2, 9, in_, generator=g)  # [batch, seq, in]
    return x, w_q, scale, bias, mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_complement_and_dense_match_reference(shape, sparsity):
    x, w_q, scale, bias, mask = _problem(*shape, sparsity)
    want = masked_linear_reference(x, w_q, scale, mask, bias)
    w = dequantize(w_q, scale)
    pruned = sc.pruned_csr_from_mask(w, mask, skip_zeros=True)
    assert (pruned is None) == bool(mask.all())
    if pruned is not None:
        assert pruned._nnz() == int((~mask & (w != 0)).sum())  # pruned zeros need no entry
        assert sc.csr_nbytes(pruned) < w.numel() * 4 * max(sparsity * 3, 0.05) + 8 * (shape[0] + 1)
    torch.testing.assert_close(sc.complement_linear(x, w, bias, pruned), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cpu.masked_linear_dense(x, w, bias, mask), want, rtol=1e-4, atol=1e-4)
    if not mask.all():  # the mask changes the product, so a kernel ignoring it would fail above
        assert not torch.allclose(torch.nn.functional.linear(x, w, bias), want, atol=1e-3)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 8), (7, 13), (384, 1536)])
def test_torch_packing_matches_bundle_bit_order(shape):
    rng = np.random.default_rng(0)
    mask = rng.random(shape) > 0.3
    packed = pack_bits(torch.from_numpy(mask))
    assert packed.dtype == torch.uint8
    assert bytes(packed.numpy()) == pack_mask(mask)  # same bytes as the bundle writer
    assert torch.equal(unpack_bits(packed, shape), torch.from_numpy(mask))
    x = torch.randn(4, shape[1])
    w_q = torch.randint(-127, 128, shape, dtype=torch.int8)
    scale = torch.rand(shape[0]) + 0.1
    torch.testing.assert_close(masked_linear_packed_reference(x, w_q, scale, packed, None),
                               masked_linear_reference(x, w_q, scale, torch.from_numpy(mask), None))


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match="do not fit"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), (5, 5))


@pytest.mark.parametrize("rows", [1, sc.PRUNED_PRODUCT_ROWS, sc.PRUNED_PRODUCT_ROWS + 1, 3 * sc.PRUNED_PRODUCT_ROWS + 7])
def test_complement_over_many_rows_is_chunked_without_changing_the_result(rows):
    """Row counts around the chunk size of the sparse correction (a mixed batch of long sequences)."""
    x, w_q, scale, bias, mask = _problem(384, 384, 0.13)
    x = torch.randn(rows, 384, generator=torch.Generator().manual_seed(3))
    w = dequantize(w_q, scale)
    want = masked_linear_reference(x, w_q, scale, mask, bias)
    got = sc.complement_linear(x, w, bias, sc.pruned_csr_from_mask(w, mask, skip_zeros=True))
    assert got.shape == (rows, 384)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
