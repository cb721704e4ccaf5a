"""CPU hot tier (service/kernels/cpu_hot.py): each precision's product vs the references, fp32 bit-exact, exact
byte counts, the auto-precision rules, and clean refusals."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from service.kernels import cpu_hot
from service.kernels import cpu_features as features_mod
from service.kernels.cpu_features import auto_precision, cpu_features
from service.kernels.cpu_hot import (ALL_PRECISIONS, FP32_PACKED, PRECISIONS, HotWeight, hot_linear, materialize,
                                     unavailable_reason)
from service.kernels.packing import pack_bits
from service.kernels.reference import (hot_linear_reference, masked_linear_reference, quantize_rows_reference,
                                       quantize_tensor_reference)
from tests.kernels.problems import masked_problem

SHAPES = [(384, 384), (1536, 384), (384, 1536), (1152, 384), (7, 13), (1, 1)]  # [out, in]
SPARSITIES = [0.0, 0.01, 0.13, 0.5]
ROWS = [1, 12, 300]

# Error budgets, as max |y - want| / max |want| over the output (``_rel``).
#: against the exact product (masked_linear_reference): the precision's own rounding. bf16: x and W rounded to 8
#: mantissa bits and the output to bf16 (worst measured over this file's grid 5.7e-3); int8: 8-bit activations
#: (1.3e-2 per row, 1.5e-2 per tensor); fp32_packed: float32 in another summation order (9.8e-7).
EXACT_BUDGET = {"fp32": 1e-6, FP32_PACKED: 5e-6, "bf16": 1.5e-2, "int8": 3e-2}
#: against hot_linear_reference (the precision's arithmetic modelled in float64): the kernel's float32 summation;
#: bf16 may also flip the final bf16 rounding of an output (one bf16 ulp = 2^-8 of the value). Worst measured:
#: fp32 6e-7, fp32_packed 1e-6, bf16 1.9e-3, int8 4.9e-7.
MODEL_BUDGET = {"fp32": 2e-6, FP32_PACKED: 5e-6, "bf16": 8e-3, "int8": 5e-6}


def _skip_unavailable(precision: str) -> None:
    reason = unavailable_reason(precision)
    if reason is not None:
        pytest.skip(reason)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    if want.numel() == 0:
        return 0.0
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-12))


def _within_model(y, model, precision, x, w_q, scale, mask, act_quant="row", act_qmax=255) -> bool:
    """``y`` within :data:`MODEL_BUDGET` of ``model`` (hot_linear_reference's product); int8 also allows, per output,
    one activation step times ``|w|`` for each activation within float32 rounding of a code boundary (a relative
    1e-5 of the code): the kernel's float32 quantizer may give it the next code, which the definition allows."""
    diff = (y.double() - model.double()).abs()
    allowed = MODEL_BUDGET[precision] * model.double().abs().max().clamp(min=1e-12)
    if precision == "int8" and x.shape[0]:
        x64 = x.reshape(-1, x.shape[-1]).double()
        if act_quant == "row":
            _, lo, step = quantize_rows_reference(x, act_qmax)
            t = (x64 - lo) / step + 0.5
        else:
            _, step, zp = quantize_tensor_reference(x, act_qmax)
            t = x64 / step + zp + 0.5
        near = ((t - t.round()).abs() <= 1e-5 * t.abs().clamp(min=1.0)).double()
        w = (w_q.double() * scale.double()[:, None] * mask).abs()
        allowed = allowed + step * (near @ w.t())
    return bool((diff <= allowed).all())


def _case(shape, sparsity, rows, seed=0):
    w_q, scale, bias, masks = masked_problem(*shape, sparsity, seed=seed)
    x = torch.randn(rows, shape[1], generator=torch.Generator().manual_seed(seed + 1))
    return x, w_q, scale, bias, masks[0]


@pytest.mark.parametrize("precision", ALL_PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("rows", ROWS)
def test_product_matches_references_within_budget(precision, shape, sparsity, rows):
    _skip_unavailable(precision)
    x, w_q, scale, bias, mask = _case(shape, sparsity, rows)
    hot = materialize(w_q, scale, mask, bias, precision)
    exact = masked_linear_reference(x, w_q, scale, mask, bias)
    for act_quant in (("row", "tensor") if precision == "int8" else ("row",)):
        y = hot_linear(x, hot, act_quant=act_quant)
        assert y.shape == (rows, shape[0]) and y.dtype == torch.float32
        assert _rel(y, exact) <= EXACT_BUDGET[precision], act_quant
        model = hot_linear_reference(x, w_q, scale, mask, bias, precision, act_quant=act_quant, act_qmax=hot.act_qmax)
        assert _within_model(y, model, precision, x, w_q, scale, mask, act_quant, hot.act_qmax), act_quant
    if precision == "fp32":  # bit-identical to today's fp32 path
        assert torch.equal(y, F.linear(x, w_q.to(torch.float32) * scale[:, None] * mask, bias))


@pytest.mark.parametrize("shape", [(384, 384), (7, 13)])
def test_fp32_is_bit_identical_to_todays_path_for_any_leading_shape(shape):
    x, w_q, scale, bias, mask = _case(shape, 0.13, 1)
    hot = materialize(w_q, scale, mask, bias, "fp32")
    served = w_q.to(torch.float32) * scale[:, None] * mask  # backbone.dequantize, then * mask
    for xs in (torch.randn(2, 9, shape[1]), torch.randn(shape[1]), torch.randn(shape[1], 5).t()):
        assert torch.equal(hot_linear(xs, hot), F.linear(xs, served, bias))
    nobias = materialize(w_q, scale, None, None, "fp32")
    assert torch.equal(hot_linear(x, nobias), F.linear(x, w_q.to(torch.float32) * scale[:, None]))


@pytest.mark.parametrize("precision", ALL_PRECISIONS)
def test_mask_matters_none_means_dense_and_packed_bits_equal_bool(precision):
    _skip_unavailable(precision)
    x, w_q, scale, bias, mask = _case((384, 384), 0.5, 12)
    y_bool = hot_linear(x, materialize(w_q, scale, mask, bias, precision))
    y_bits = hot_linear(x, materialize(w_q, scale, pack_bits(mask), bias, precision))
    assert torch.equal(y_bool, y_bits)
    y_none = hot_linear(x, materialize(w_q, scale, None, bias, precision))
    y_ones = hot_linear(x, materialize(w_q, scale, torch.ones_like(mask), bias, precision))
    assert torch.equal(y_none, y_ones)
    dense = masked_linear_reference(x, w_q, scale, torch.ones_like(mask), bias)
    assert _rel(y_none, dense) <= EXACT_BUDGET[precision]
    assert _rel(y_bool, dense) > 0.1  # a kernel ignoring the mask would fail the product test


@pytest.mark.parametrize("precision", ALL_PRECISIONS)
def test_leading_dims_empty_rows_and_no_bias(precision):
    _skip_unavailable(precision)
    _, w_q, scale, bias, mask = _case((384, 1536), 0.13, 1)
    hot = materialize(w_q, scale, mask, None, precision)
    x = torch.randn(2, 9, 1536)
    y = hot_linear(x, hot)
    assert y.shape == (2, 9, 384)
    torch.testing.assert_close(y.reshape(18, 384), hot_linear(x.reshape(18, 1536), hot), rtol=0, atol=0)
    assert _rel(y, masked_linear_reference(x, w_q, scale, mask, None)) <= EXACT_BUDGET[precision]
    assert hot_linear(torch.empty(0, 1536), hot).shape == (0, 384)
    assert hot_linear(torch.empty(3, 0, 1536), hot).shape == (3, 0, 384)
    assert hot_linear(torch.randn(1536), hot).shape == (384,)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_a_rows_result_does_not_depend_on_the_other_rows(precision):
    """A row's result does not depend on the other rows of the product (int8: per-row activation scales): the first
    12 rows give bit-identical outputs whatever the other 12 are."""
    _skip_unavailable(precision)
    x, w_q, scale, bias, mask = _case((1536, 384), 0.13, 24)
    hot = materialize(w_q, scale, mask, bias, precision)
    other = x.clone()
    other[12:] *= 50.0  # neighbours with a 50x larger range
    assert torch.equal(hot_linear(x, hot)[:12], hot_linear(other, hot)[:12])


def test_int8_zero_constant_and_offset_inputs():
    _skip_unavailable("int8")
    x, w_q, scale, bias, mask = _case((384, 384), 0.13, 12)
    hot = materialize(w_q, scale, mask, bias, "int8")
    for act_quant in ("row", "tensor"):
        zero = hot_linear(torch.zeros(3, 384), hot, act_quant=act_quant)
        torch.testing.assert_close(zero, bias.expand(3, -1), rtol=0, atol=1e-6)
        const = torch.full((2, 384), 3.25)
        want = masked_linear_reference(const, w_q, scale, mask, bias)
        assert _rel(hot_linear(const, hot, act_quant=act_quant), want) <= 1e-5
        pos = x.abs() + 10.0  # all-positive rows far from zero
        assert _rel(hot_linear(pos, hot, act_quant=act_quant), masked_linear_reference(pos, w_q, scale, mask, bias)) \
            <= EXACT_BUDGET["int8"]


def test_int8_reduced_range_codes_for_cpus_without_vnni():
    """act_qmax 127 (no VNNI: PyTorch's reduce_range) keeps the product correct, with half the activation levels."""
    _skip_unavailable("int8")
    x, w_q, scale, bias, mask = _case((384, 384), 0.13, 12)
    hot = materialize(w_q, scale, mask, bias, "int8")
    hot.act_qmax = 127
    exact = masked_linear_reference(x, w_q, scale, mask, bias)
    for act_quant in ("row", "tensor"):
        y = hot_linear(x, hot, act_quant=act_quant)
        assert _rel(y, exact) <= 2 * EXACT_BUDGET["int8"]
        model = hot_linear_reference(x, w_q, scale, mask, bias, "int8", act_quant=act_quant, act_qmax=127)
        assert _within_model(y, model, "int8", x, w_q, scale, mask, act_quant, 127)


@pytest.mark.parametrize("qmax", [255, 127])
def test_reference_activation_codes_follow_their_definition(qmax):
    """The reference quantizers, checked on their own: codes are integers in [0, qmax]; per row, the row's min and
    max get codes 0 and qmax and every value decodes within half a step; per tensor, zero decodes exactly."""
    x = torch.randn(7, 50, generator=torch.Generator().manual_seed(3)) * torch.arange(1, 8)[:, None]
    x[6] = 2.5  # a constant row
    q, lo, step = quantize_rows_reference(x, qmax)
    assert torch.equal(q, q.round()) and q.min() >= 0 and q.max() <= qmax
    assert torch.equal(q[:6].amin(-1), torch.zeros(6, dtype=q.dtype))
    assert torch.equal(q[:6].amax(-1), torch.full((6,), float(qmax), dtype=q.dtype))
    assert ((lo + step * q - x.double()).abs() <= step / 2 * (1 + 1e-9)).all()
    q, step, zp = quantize_tensor_reference(x[:6], qmax)
    assert zp == zp.round() and 0 <= zp <= qmax and q.min() >= 0 and q.max() <= qmax
    assert ((step * (q - zp) - x[:6].double()).abs() <= step / 2 * (1 + 1e-9)).all()
    q0, step0, zp0 = quantize_tensor_reference(torch.tensor([[0.0, -1.0, 3.0]]), qmax)
    assert step0 * (q0[0, 0] - zp0) == 0.0


def test_int8_weight_is_the_exact_served_weight():
    """With activations exactly on the uint8 grid the int8 product has no quantization error at all."""
    _skip_unavailable("int8")
    _, w_q, scale, bias, mask = _case((384, 384), 0.13, 1)
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, (12, 384), generator=g).to(torch.float32) * 0.0625 - 3.0  # row min/max 0/255 codes
    x[:, 0] = -3.0
    x[:, 1] = 255 * 0.0625 - 3.0
    hot = materialize(w_q, scale, mask, bias, "int8")
    exact = x.double() @ (w_q.double() * scale.double()[:, None] * mask).t() + bias.double()
    assert _rel(hot_linear(x, hot), exact) <= 1e-6


@pytest.mark.parametrize("precision", ALL_PRECISIONS)
def test_bf16_input_is_accepted_and_the_output_is_float32(precision):
    _skip_unavailable(precision)
    x, w_q, scale, bias, mask = _case((384, 384), 0.13, 12)
    xb = x.to(torch.bfloat16)
    hot = materialize(w_q, scale, mask, bias, precision)
    y = hot_linear(xb, hot)
    assert y.dtype == torch.float32 and y.shape == (12, 384)
    assert _rel(y, masked_linear_reference(xb.float(), w_q, scale, mask, bias)) <= EXACT_BUDGET[precision]
    if precision == "fp32":
        assert torch.equal(y, F.linear(xb.float(), w_q.to(torch.float32) * scale[:, None] * mask, bias))
    if precision == "bf16":  # x is rounded to bf16 by the kernel anyway
        assert torch.equal(y, hot_linear(xb.float(), hot))


# ------------------------------------------------------------------------------------------------ bytes


def _plain_bytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


@pytest.mark.parametrize("shape", [(384, 384), (1536, 384), (384, 1536), (7, 13)])
def test_nbytes_is_exact(shape):
    out, in_ = shape
    _, w_q, scale, bias, mask = _case(shape, 0.13, 1)
    fp32 = materialize(w_q, scale, mask, bias, "fp32")
    assert fp32.nbytes() == out * in_ * 4 + out * 4 == _plain_bytes(fp32.weight, fp32.bias)
    assert materialize(w_q, scale, mask, None, "fp32").nbytes() == out * in_ * 4
    bf16 = materialize(w_q, scale, mask, bias, "bf16")
    if bf16.weight.is_mkldnn:  # oneDNN's blocked buffer: at least the logical bytes, padded to its blocks
        assert bf16.nbytes() == torch.ops.mkldnn._nbytes(bf16.weight) + out * 4
        assert bf16.nbytes() >= out * in_ * 2 + out * 4
    else:
        assert bf16.nbytes() == out * in_ * 2 + out * 4
    for hot in [bf16] + [materialize(w_q, scale, mask, bias, p) for p in ("int8", FP32_PACKED)
                         if unavailable_reason(p) is None]:
        assert hot.nbytes() == sum(torch.ops.mkldnn._nbytes(t) if t.is_mkldnn else _plain_bytes(t)
                                   for t in hot.tensors())
        assert all(t.is_mkldnn or t._base is None for t in hot.tensors())  # owned, not views of the inputs
        assert hot.nbytes() == materialize(w_q, scale, None, bias, hot.precision).nbytes()  # mask-independent
    if unavailable_reason("int8") is None:
        int8 = materialize(w_q, scale, mask, bias, "int8")
        # int8 weight (+ oneDNN's int32 compensation and block padding) + bias, scale, row sums (float32 [out])
        assert int8.nbytes() == torch.ops.mkldnn._nbytes(int8.weight) + 3 * out * 4
        assert out * in_ <= torch.ops.mkldnn._nbytes(int8.weight)
        if out % 64 == 0 and in_ % 64 == 0:  # MiniLM's shapes: no padding, 4 bytes of compensation per row
            assert torch.ops.mkldnn._nbytes(int8.weight) == out * in_ + out * 4


def test_materialize_owns_its_tensors():
    _, w_q, scale, bias, mask = _case((384, 384), 0.13, 1)
    for p in PRECISIONS:
        if unavailable_reason(p) is not None:
            continue
        hot = materialize(w_q, scale, mask, bias, p)
        before = hot_linear(torch.ones(1, 384), hot)
        scale.mul_(2.0)
        bias.add_(1.0)
        assert torch.equal(hot_linear(torch.ones(1, 384), hot), before), p
        scale.div_(2.0)
        bias.sub_(1.0)


# ------------------------------------------------------------------------------------------- CPU features


def test_bf16_without_onednn_bf16_falls_back_to_a_plain_weight(monkeypatch):
    monkeypatch.setattr(cpu_hot, "_mkldnn_bf16_pack_ok", lambda: False)
    x, w_q, scale, bias, mask = _case((384, 1536), 0.13, 12)
    hot = materialize(w_q, scale, mask, bias, "bf16")
    assert not hot.weight.is_mkldnn and hot.weight.dtype == torch.bfloat16
    assert hot.nbytes() == 384 * 1536 * 2 + 384 * 4
    y = hot_linear(x, hot)
    assert y.dtype == torch.float32
    assert _rel(y, masked_linear_reference(x, w_q, scale, mask, bias)) <= EXACT_BUDGET["bf16"]
    assert _rel(y, hot_linear_reference(x, w_q, scale, mask, bias, "bf16")) <= MODEL_BUDGET["bf16"]


def test_cpu_features_reads_torchs_report():
    feats = cpu_features()
    assert isinstance(feats, frozenset) and all(f == f.lower() for f in feats)
    caps = getattr(torch.cpu, "get_capabilities", None)
    if caps is not None:
        assert {k for k, v in caps().items() if v is True} <= feats
    assert any(f.startswith("aten_") for f in feats)
    assert auto_precision() == auto_precision(feats) in PRECISIONS


def test_cpu_features_fall_back_to_proc_cpuinfo(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {}, raising=False)
    monkeypatch.setattr(features_mod, "_proc_cpuinfo_flags", lambda: {"avx512_vnni", "avx2"})
    feats = features_mod._cpu_features.__wrapped__()
    assert {"avx512_vnni", "avx2"} <= feats and auto_precision(feats) in PRECISIONS


def test_proc_cpuinfo_fallback_normalises_flag_names(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_int8\n")
    assert features_mod._proc_cpuinfo_flags(str(info)) == {"fpu", "avx2", "avx512_f", "avx512_bw", "avx512_vnni",
                                                      "avx512_bf16", "amx_int8"}
    assert features_mod._proc_cpuinfo_flags(str(tmp_path / "missing")) == set()


@pytest.mark.parametrize("features, rows, want", [
    ({"avx512_vnni", "avx512_bf16"}, None, "bf16"),  # both: bf16, the more accurate, unless rows are many
    ({"avx_vnni"}, None, "int8"),
    ({"amx_int8", "amx_bf16", "amx_tile"}, None, "bf16"),
    ({"avx512_bf16", "avx512_f"}, None, "bf16"),
    ({"amx_bf16"}, None, "bf16"),
    ({"avx512_f", "avx2"}, None, "fp32"),
    (set(), None, "fp32"),
    ({"avx512_vnni", "avx512_bf16"}, 12, "bf16"),  # few rows: bf16 is faster where both exist
    ({"avx512_vnni", "avx512_bf16"}, features_mod.INT8_MIN_ROWS, "int8"),
    ({"avx512_vnni"}, 12, "int8"),  # no bf16 dot products: int8 at any row count
    ({"avx512_f"}, 4096, "fp32"),
])
def test_auto_precision_rules(features, rows, want, monkeypatch):
    # the rules, whatever this torch build has
    assert auto_precision(frozenset(features), rows, int8_works=True) == want
    assert auto_precision(frozenset(features), rows, int8_works=False) == want.replace(
        "int8", "bf16" if frozenset(features) & features_mod.BF16_DOT_FEATURES else "fp32")


# ---------------------------------------------------------------------------------------------- refusals


def test_refusals():
    _, w_q, scale, bias, mask = _case((7, 13), 0.13, 1)
    with pytest.raises(ValueError, match="precision must be one of"):
        materialize(w_q, scale, mask, bias, "fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        unavailable_reason("fp16")
    with pytest.raises(ValueError, match="w_q must be"):
        materialize(w_q.to(torch.int32), scale, mask, bias, "fp32")
    with pytest.raises(ValueError, match="scale must be"):
        materialize(w_q, scale[:-1], mask, bias, "fp32")
    with pytest.raises(ValueError, match="scale must be"):
        materialize(w_q, scale.double(), mask, bias, "fp32")
    with pytest.raises(ValueError, match="bias must be"):
        materialize(w_q, scale, mask, bias[:-1], "fp32")
    with pytest.raises(ValueError, match="mask must be"):
        materialize(w_q, scale, mask[:, :-1], bias, "fp32")
    with pytest.raises(ValueError, match="do not fit"):
        materialize(w_q, scale, pack_bits(mask)[:-1], bias, "fp32")
    hot = materialize(w_q, scale, mask, bias, "fp32")
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., 13\]"):
        hot_linear(torch.randn(2, 12), hot)
    with pytest.raises(ValueError, match="must be float32 or bfloat16"):
        hot_linear(torch.randn(2, 13, dtype=torch.float64), hot)
    with pytest.raises(ValueError, match="act_quant must be"):
        hot_linear(torch.randn(2, 13), hot, act_quant="channel")


def test_unavailable_int8_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(cpu_hot, "_probe", lambda p: "no oneDNN here" if p == "int8" else None)
    _, w_q, scale, bias, mask = _case((7, 13), 0.13, 1)
    with pytest.raises(RuntimeError, match="no oneDNN here"):
        materialize(w_q, scale, mask, bias, "int8")
    assert not cpu_hot.int8_available()
    assert isinstance(materialize(w_q, scale, mask, bias, "bf16"), HotWeight)


@pytest.mark.parametrize("shape", [(384, 384), (1152, 384), (7, 13)])
def test_bf16_low_output_is_the_product_in_bf16_with_its_bias(shape):
    out, in_ = shape
    w_q, scale, bias, masks = masked_problem(out, in_, 0.13)
    x = torch.randn(12, in_, generator=torch.Generator().manual_seed(5))
    hot = materialize(w_q, scale, masks[0], bias, "bf16")
    got = hot_linear(x, hot, low=True)
    assert got.dtype == torch.bfloat16 and got.shape == (12, out)
    want = masked_linear_reference(x, w_q, scale, masks[0], bias)
    assert _rel(got.float(), want) <= 2e-2  # one more bf16 rounding (the bias) than the float32 output
    assert hot_linear(x, materialize(w_q, scale, masks[0], bias, "int8"), low=True).dtype == torch.float32
