"""Supermask layers: straight-through gradient, initialisation by magnitude, deterministic mask."""

from __future__ import annotations

import pytest
import torch

from training.model import SCORE_INIT, SupermaskLinear, SupermaskModel


def test_straight_through_gradient_reaches_scores():
    torch.manual_seed(0)
    w = torch.randn(5, 7)
    layer = SupermaskLinear(w, torch.zeros(5))
    layer.train()
    x = torch.randn(3, 7)
    y = layer(x)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    assert layer.scores.grad is not None
    # dL/dnu := dL/dmu, and dL/dmu[o, i] = sum_b upstream[b, o] * x[b, i] * W[o, i]
    expected = (upstream.t() @ x) * w
    torch.testing.assert_close(layer.scores.grad, expected)


def test_sigmoid_straight_through_scales_the_gradient_by_the_sigmoid_derivative():
    torch.manual_seed(0)
    w, x = torch.randn(5, 7), torch.randn(3, 7)
    grads, outs = {}, {}
    for ste in ("identity", "sigmoid"):
        torch.manual_seed(1)  # the same Bernoulli draw for both
        layer = SupermaskLinear(w, torch.zeros(5), ste=ste)
        with torch.no_grad():
            layer.scores.copy_(torch.randn(5, 7) * 3)
        layer.train()
        y = layer(x)
        (y * torch.arange(y.numel()).reshape(y.shape)).sum().backward()
        grads[ste], outs[ste] = layer.scores.grad, y.detach()
    torch.testing.assert_close(outs["sigmoid"], outs["identity"], rtol=0, atol=0)  # forward unchanged
    p = torch.sigmoid(layer.scores.detach())
    torch.testing.assert_close(grads["sigmoid"], grads["identity"] * p * (1 - p))
    assert not torch.allclose(grads["sigmoid"], grads["identity"])
    with pytest.raises(ValueError, match="ste must be one of"):
        SupermaskLinear(w, None, ste="tanh")


@pytest.mark.parametrize("sample", [False, True])
def test_mask_value_is_exactly_binary(sample):
    # the straight-through form must not perturb the forward value: (μ + ν) − ν rounds, μ + (ν − ν) does not
    torch.manual_seed(0)
    layer = SupermaskLinear(torch.randn(64, 64), None)
    with torch.no_grad():
        layer.scores.copy_(5.0 + torch.randn(64, 64) * 3)
    mu = layer.mask(sample)
    assert mu.requires_grad
    assert set(torch.unique(mu.detach()).tolist()) <= {0.0, 1.0}


def test_bernoulli_sampling_follows_sigmoid():
    torch.manual_seed(0)
    layer = SupermaskLinear(torch.ones(200, 200), None)
    with torch.no_grad():
        layer.scores.fill_(0.0)  # sigma = 0.5
    mu = layer.mask(sample=True).detach()
    assert set(mu.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(mu.mean()) - 0.5) < 0.02
    with torch.no_grad():
        layer.scores.fill_(SCORE_INIT)
    assert float(layer.mask(sample=False).detach().mean()) == 1.0


@pytest.mark.parametrize("s0", [0.0, 0.1, 0.5])
def test_init_sparsity_prunes_smallest_magnitudes(s0):
    torch.manual_seed(1)
    w = torch.randn(40, 30)
    layer = SupermaskLinear(w, None, init_sparsity=s0)
    hard = layer.hard_mask()
    assert abs(float((~hard).float().mean()) - s0) < 1e-3
    assert set(layer.scores.detach().unique().tolist()) <= {SCORE_INIT, -SCORE_INIT}
    if s0 > 0:  # every pruned weight is smaller in magnitude than every kept one
        assert w.abs()[~hard].max() <= w.abs()[hard].min()


def test_eval_mode_is_deterministic(tiny_backbone):
    model = SupermaskModel(tiny_backbone, num_outputs=2)
    with torch.no_grad():
        for layer in model.masked_layers().values():
            layer.scores.uniform_(-1, 1)
    ids = torch.tensor([[101, 2023, 2003, 102]])
    am = torch.ones_like(ids)
    model.eval()
    a, b = model(ids, am), model(ids, am)
    torch.testing.assert_close(a, b)
    model.set_sampling(True)
    c = model(ids, am)
    assert not torch.allclose(a, c)  # half the weights are uncertain: a sample differs
    assert 0.3 < model.sparsity() < 0.7


def test_drawn_masks_hold_for_every_sampling_forward_until_cleared(tiny_backbone):
    model = SupermaskModel(tiny_backbone, num_outputs=1)
    with torch.no_grad():
        for layer in model.masked_layers().values():
            layer.scores.fill_(0.0)  # σ(ν) = 0.5: every draw differs
    ids = torch.tensor([[101, 2023, 2003, 102]])
    am = torch.ones_like(ids)
    model.eval()
    model.set_sampling(True)
    assert not torch.allclose(model(ids, am), model(ids, am))  # a fresh mask per forward
    torch.manual_seed(3)
    model.draw_masks()
    a = model(ids, am)
    torch.testing.assert_close(model(ids, am), a)  # one drawn mask, every forward
    drawn = [layer.drawn for layer in model.masked_layers().values()]
    assert all(d is not None and 0.3 < d.mean().item() < 0.7 for d in drawn)
    model.clear_drawn_masks()
    assert all(layer.drawn is None for layer in model.masked_layers().values())
    assert not torch.allclose(model(ids, am), a)


def _stsb_like(n: int = 24):
    from training.glue import Example, get_task

    words = ["a", "film", "the", "cat", "runs", "slowly", "bright", "dark", "song", "long"]
    ex = [Example(" ".join(words[(i + k) % 10] for k in range(3 + i % 5)), words[i % 10], float(i % 6))
          for i in range(n)]
    return get_task("STS-B"), ex


def test_bernoulli_per_mask_evaluates_the_whole_set_with_one_mask(tiny_backbone):
    import numpy as np

    from training.glue import compute_metrics
    from training.trainer import evaluate_bernoulli, predict

    task, ex = _stsb_like()
    model = SupermaskModel(tiny_backbone, num_outputs=1)
    with torch.no_grad():
        for layer in model.masked_layers().values():
            layer.scores.fill_(0.0)
    model.eval()
    tok = tiny_backbone.tokenizer

    def run(per, batch):
        return evaluate_bernoulli(model, tok, task, ex, 32, samples=1, batch_size=batch, seed=0, per=per)["pearson"]

    # the one sample is the metric of one mask drawn from the seed, whatever the batching
    torch.manual_seed(0)
    model.draw_masks()
    one_mask = compute_metrics(task, predict(model, tok, task, ex, 32, batch_size=4, sample=True),
                               np.array([e.label for e in ex]))["pearson"]
    model.clear_drawn_masks()
    assert run("mask", 4)["mean"] == pytest.approx(one_mask, abs=1e-9)
    assert run("mask", 64)["mean"] == pytest.approx(one_mask, abs=1e-5)
    # a fresh mask per batch: with batches of 4 the 24 predictions come from six masks, not one
    assert run("batch", 4)["mean"] != pytest.approx(one_mask, abs=1e-6)
    assert all(layer.drawn is None for layer in model.masked_layers().values())  # left as found
    with pytest.raises(ValueError, match="per must be one of"):
        run("example", 4)


def test_sampled_mask_rule_serves_one_seeded_draw_from_the_trained_distribution(tiny_backbone):
    from training.model import apply_mask_rule, expected_sparsity

    model = SupermaskModel(tiny_backbone, num_outputs=2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # scores spread over (-1, 4): σ(ν) from 0.27 to 0.98
        for layer in model.masked_layers().values():
            layer.scores.copy_(torch.rand(layer.scores.shape, generator=gen) * 5 - 1)
    layers = list(model.masked_layers().values())
    nu = [layer.scores.detach() for layer in layers]
    text = apply_mask_rule(model, "sampled", seed=3)
    first = [layer.hard_mask().clone() for layer in layers]
    assert "one draw" in text and "seed 3" in text and f"{model.sparsity():.6f}" in text
    n = sum(m.numel() for m in first)
    # a Bernoulli draw: its sparsity is the expected one within 5 binomial s.d.
    assert abs(model.sparsity() - expected_sparsity(nu)) < 5 * (0.25 / n) ** 0.5
    # not the threshold rule: weights with ν > 0 are pruned too, and some with ν < 0 kept
    assert any(bool((~m & (s > 0)).any()) for m, s in zip(first, nu))
    assert any(bool((m & (s < 0)).any()) for m, s in zip(first, nu))
    # the deterministic forward uses that draw, and the same seed gives the same mask
    x = torch.randn(2, layers[0].weight.shape[1])
    layer0 = layers[0].eval()  # eval mode: the deterministic mask
    torch.testing.assert_close(layer0(x), torch.nn.functional.linear(x, layer0.weight * first[0], layer0.bias))
    apply_mask_rule(model, "sampled", seed=3)
    assert all(torch.equal(a, layer.hard_mask()) for a, layer in zip(first, layers))
    apply_mask_rule(model, "sampled", seed=4)
    assert not all(torch.equal(a, layer.hard_mask()) for a, layer in zip(first, layers))
    # the sign rule clears the draw: back to 1[ν > 0]
    assert apply_mask_rule(model, "sign") is None
    assert all(torch.equal(layer.hard_mask(), s > 0) for layer, s in zip(layers, nu))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the draw on a CUDA model against the CPU one")
def test_sampled_mask_rule_draws_the_same_mask_on_cuda_as_on_cpu(tiny_backbone):
    from training.model import apply_mask_rule

    model = SupermaskModel(tiny_backbone, num_outputs=2)
    apply_mask_rule(model, "sampled", seed=5)
    cpu = [layer.hard_mask().clone() for layer in model.masked_layers().values()]
    model.to("cuda")
    apply_mask_rule(model, "sampled", seed=5)
    assert all(torch.equal(a, layer.hard_mask().cpu()) for a, layer in zip(cpu, model.masked_layers().values()))
