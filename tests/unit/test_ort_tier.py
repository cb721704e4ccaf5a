"""The ONNX Runtime CPU tier (service/tiers/onnxruntime.py, service/kernels/ort_encoder.py): the graph computes the
lean encoder's int8 semantics (per-channel int8 W_q ⊙ μ, per-tensor uint8 activations), the engine serves through
it within the int8 tolerance of the fp32 reference, masks matter, hot/warm/cold and the byte budget hold, and
settings that cannot run are refused with the reason."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from backbone import load_backbone, mean_pool
from service.engine import Engine
from service.encoder import LeanEncoder
from service.kernels import cpu_hot, ort_encoder
from service.metrics import Metrics
from service.tiers.select import resolve_runtime
from tests.conftest import make_bundle, make_store

pytestmark = pytest.mark.skipif(ort_encoder.unavailable_reason() is not None,
                                reason=str(ort_encoder.unavailable_reason()))

ROWS = [("a charming and often affecting journey", None), ("dull, flat and lifeless", None),
        ("the film is strictly routine", None)]
TASKS = {"s0": 0.0, "s10": 0.10, "s50": 0.5}
TOLERANCE = dict(rtol=0.05, atol=0.03)  # as the torch int8 tier's (tests/unit/test_precision.py)


@pytest.fixture
def store(tiny_backbone, tmp_path):
    return make_store(tiny_backbone, tmp_path, TASKS)


def _engine(backbone_dir, store, precision="int8", runtime="onnxruntime", **kw) -> Engine:
    return Engine(load_backbone(backbone_dir), store, Metrics(), cache_bytes=1 << 30, device="cpu",
                  precision=precision, runtime=runtime, **kw)


def _inputs(backbone, texts):
    return backbone.tokenizer(texts, padding=True, return_tensors="pt")


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu", "silu"])
@pytest.mark.parametrize("act_quant", ort_encoder.ACT_QUANT)
def test_graph_equals_the_torch_reference_of_its_semantics(tiny_backbone, act_quant, act):
    """Reference: the lean encoder with every product as cpu_hot.hot_linear int8, activations quantized the same way
    (per row, or per tensor), for each activation the graph computes. Every bias and LayerNorm parameter is made
    random first (a fresh tiny BERT has them at zero or one): each product's bias, which the graph adds in the fused
    op after it, must count exactly once."""
    model = copy.deepcopy(tiny_backbone.model)
    model.config.hidden_act = act
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.5)
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + torch.randn(module.weight.shape, generator=gen) * 0.2)
    enc = LeanEncoder(model)
    mats = {n: (tiny_backbone.qweight[n], tiny_backbone.scale[n], model.get_submodule(n).bias)
            for n in tiny_backbone.masked}
    oe = ort_encoder.OrtEncoder(enc, mats, threads=1, act_quant=act_quant)
    gen = torch.Generator().manual_seed(0)
    masks = {g: torch.rand(oe.base[g].shape, generator=gen) > 0.3 for g in enc.groups}
    session = oe.session({g: oe.base[g] * m for g, m in masks.items()})
    x = _inputs(tiny_backbone, [t for t, _ in ROWS])
    got = oe.run(session, oe.embed(x["input_ids"], x["token_type_ids"]), x["attention_mask"])

    hot = {}
    for g, members in enc.groups.items():
        w_q, scale, bias = (torch.cat([mats[m][k] for m in members]) for k in range(3))
        hot[g] = cpu_hot.materialize(w_q, scale, masks[g], bias, "int8")
    hidden = enc(x["input_ids"], x["attention_mask"], x["token_type_ids"],
                 lambda g, v, low=False: cpu_hot.hot_linear(v, hot[g], act_quant=act_quant))
    want = mean_pool(hidden, x["attention_mask"])
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)
    if act_quant == "row":  # a row's result does not depend on the other rows of its batch
        alone = oe.run(session, oe.embed(x["input_ids"][:1], x["token_type_ids"][:1]), x["attention_mask"][:1])
        width = int(x["attention_mask"][0].sum())
        alone_trim = oe.run(session, oe.embed(x["input_ids"][:1, :width], x["token_type_ids"][:1, :width]),
                            x["attention_mask"][:1, :width])
        torch.testing.assert_close(alone, got[:1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(alone_trim, got[:1], rtol=1e-5, atol=1e-5)
    # the masks matter: the unmasked weights move the output far more than the graph differs from its reference
    plain = oe.run(oe.session({}), oe.embed(x["input_ids"], x["token_type_ids"]), x["attention_mask"])
    assert (plain - got).abs().max() > 5 * (got - want).abs().max()


def test_engine_serves_within_the_int8_tolerance_of_fp32_and_masks_matter(tiny_backbone_dir, store):
    ref = _engine(tiny_backbone_dir, store, precision="fp32", runtime="torch")
    low = _engine(tiny_backbone_dir, store)
    assert low.precision == "int8" and low.compute_tier.runtime == "onnxruntime"
    assert low.status()["runtime"] == "onnxruntime"
    assert all(ml.weight is None for ml in low.layers.values())  # no float32 copy of the masked weights kept
    outs = {t: ref.logits(t, ROWS) for t in TASKS}
    for task in TASKS:
        torch.testing.assert_close(low.logits(task, ROWS), outs[task], **TOLERANCE)
    assert not torch.allclose(outs["s50"], outs["s0"], **TOLERANCE)
    assert low.tier("s10") == "hot"
    text = low.metrics.render().decode()
    assert 'supermask_cpu_precision_info{precision="int8"} 1.0' in text
    assert 'supermask_tier_info{precision="int8",runtime="onnxruntime"} 1.0' in text


def test_mixed_batch_of_hot_warm_and_cold_tasks_equals_single_task_passes(tiny_backbone_dir, store):
    engine = _engine(tiny_backbone_dir, store)
    engine.hot.capacity_bytes = engine.hot.task_bytes(engine.warm("s10"))  # room for one session
    engine.logits("s10", ROWS)
    engine.warm("s50")
    assert [engine.tier(t) for t in ("s10", "s50", "s0")] == ["hot", "warm", "cold"]
    hot_alone = _engine(tiny_backbone_dir, store).logits("s10", ROWS)
    never_hot = _engine(tiny_backbone_dir, store, hot_promote_after=1000)  # no task kept hot
    sparse_alone = {t: never_hot.logits(t, ROWS) for t in ("s50", "s0")}
    assert len(never_hot.hot.tasks) == 0 and sorted(never_hot.compute_tier.sparse.tasks) == ["s0", "s50"]
    mixed = engine.logits_mixed([("s10", ROWS), ("s50", ROWS), ("s0", ROWS)])
    # s10 runs through its session on its own rows; s50 and s0 (no room for them; on this tier even a half-pruned
    # task: a session for one pass costs more than its sparse form) share one plain pass and each subtract their
    # own sparse correction: each the same as a pass of that task alone through the same form
    torch.testing.assert_close(mixed[0], hot_alone, rtol=1e-5, atol=1e-6)
    for task, got in zip(("s50", "s0"), mixed[1:]):
        torch.testing.assert_close(got, sparse_alone[task], rtol=1e-5, atol=1e-5)
    assert engine.hot.used_bytes <= engine.hot.capacity_bytes and len(engine.hot.tasks) == 1


def test_replaced_bundle_gets_a_new_session(tiny_backbone, tiny_backbone_dir, store):
    engine = _engine(tiny_backbone_dir, store)
    before = engine.logits("s10", ROWS)
    store.put("s10", make_bundle(tiny_backbone, task="s10", sparsity=0.6, seed=9))
    after = engine.logits("s10", ROWS)
    torch.testing.assert_close(after, _engine(tiny_backbone_dir, store).logits("s10", ROWS), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before, after, atol=1e-3)
    engine.delete("s10")
    assert "s10" not in engine.hot.tasks


def test_runtime_choices_and_refusals(tiny_backbone_dir, store):
    assert resolve_runtime("auto", "int8") == "onnxruntime"  # int8's fastest runtime where it runs
    assert resolve_runtime("auto", "bf16") == "torch"
    assert resolve_runtime("torch", "int8") == "torch"
    assert resolve_runtime("onnxruntime", "int8") == "onnxruntime"
    with pytest.raises(ValueError, match="serves precision int8, not 'bf16'"):
        resolve_runtime("onnxruntime", "bf16")
    with pytest.raises(ValueError, match="serves precision int8, not 'fp32'"):
        resolve_runtime("onnxruntime", "fp32")
    with pytest.raises(ValueError, match="unknown CPU runtime 'tvm'"):
        resolve_runtime("tvm", "int8")
    # a refused setting leaves the backbone unwrapped: a second engine on it still builds
    bb = load_backbone(tiny_backbone_dir)
    with pytest.raises(ValueError, match="serves precision int8"):
        Engine(bb, store, Metrics(), cache_bytes=1 << 30, device="cpu", precision="bf16", runtime="onnxruntime")
    Engine(bb, store, Metrics(), cache_bytes=1 << 30, device="cpu", precision="int8", runtime="onnxruntime")


def test_settings_read_the_runtime(monkeypatch):
    from service.settings import Settings

    monkeypatch.setenv("SUPERMASK_CPU_RUNTIME", "onnxruntime")
    assert Settings().cpu_runtime == "onnxruntime"
    monkeypatch.setenv("SUPERMASK_CPU_RUNTIME", "tvm")
    with pytest.raises(ValueError):
        Settings()


def test_sessions_spin_during_a_pass_and_stop_when_it_ends(tiny_backbone):
    """A session's pool threads spin between nodes (a woken thread costs more than a small node) and stop spinning
    when the pass ends (sessions take turns: one left spinning would take the CPU from the next)."""
    enc = LeanEncoder(tiny_backbone.model)
    mats = {n: (tiny_backbone.qweight[n], tiny_backbone.scale[n], tiny_backbone.model.get_submodule(n).bias)
            for n in tiny_backbone.masked}
    opts = ort_encoder.OrtEncoder(enc, mats, threads=2).session({}).get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"


def test_a_session_from_pruned_positions_equals_one_from_masked_weights(tiny_backbone):
    """session_pruned (zeros written into the weights kept in the graph's layout, row sums less the pruned values)
    computes exactly what session(W_q ⊙ μ) does; a group it leaves out multiplies the plain weights; bad input is
    refused."""
    enc = LeanEncoder(tiny_backbone.model)
    mats = {n: (tiny_backbone.qweight[n], tiny_backbone.scale[n], tiny_backbone.model.get_submodule(n).bias)
            for n in tiny_backbone.masked}
    oe = ort_encoder.OrtEncoder(enc, mats, threads=1)
    gen = torch.Generator().manual_seed(4)
    groups = sorted(enc.groups)
    masks = {g: torch.rand(oe.base[g].shape, generator=gen) > 0.2 for g in groups[1:]}  # groups[0]: plain
    x = _inputs(tiny_backbone, [t for t, _ in ROWS])
    emb = oe.embed(x["input_ids"], x["token_type_ids"])
    want = oe.run(oe.session({g: oe.base[g] * m for g, m in masks.items()}), emb, x["attention_mask"])
    pruned = {g: np.flatnonzero(~m.numpy().reshape(-1)) for g, m in masks.items()}
    pruned[groups[0]] = np.zeros(0, dtype=np.int64)
    got = oe.run(oe.session_pruned(pruned), emb, x["attention_mask"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    plain = oe.run(oe.session({}), emb, x["attention_mask"])
    assert (plain - got).abs().max() > 1e-3  # the positions matter
    with pytest.raises(ValueError, match="no product group"):
        oe.session_pruned({"nope": np.zeros(1, dtype=np.int64)})
    out, in_ = oe.base[groups[0]].shape
    with pytest.raises(ValueError, match="outside"):
        oe.session_pruned({groups[0]: np.array([out * in_], dtype=np.int64)})
