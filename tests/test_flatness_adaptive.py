"""Adaptive sharpness (runner/adaptive_sharpness.py) against hand-computed values; agreement with the
official code (tml-epfl/sharpness-vs-generalization) was checked outside the suite (docs/flatness.md)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from runner import adaptive_sharpness as ad


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (16,), generator=g)
    return model, list(model.parameters()), [(x[:8], y[:8]), (x[8:], y[8:])]


def _loss_at(model, params, x, y, delta):
    old = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, delta):
            p.add_(d)
        out = float(F.cross_entropy(model(x), y))
        for p, o in zip(params, old):
            p.copy_(o)
    return out


def test_one_linf_step_is_the_momentum_mix_of_the_clipped_sign_step():
    # δ = 0.75·clip(2ρ|w|·sign g, ±ρ|w|) = 0.75·ρ|w|·sign g (iteration 0 has no step-size check)
    model, params, batches = _setup()
    theta = [p.detach().clone() for p in params]
    rho, want = 0.05, []
    for x, y in batches:
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        delta = [0.75 * rho * w.abs() * t.sign() for w, t in zip(theta, g)]
        base = _loss_at(model, params, x, y, [torch.zeros_like(w) for w in theta])
        want.append(max(0.0, _loss_at(model, params, x, y, delta) - base))
    got = ad.worst_case(model, params, batches, rho, "linf", iters=1)
    assert got == pytest.approx(sum(want) / 2, rel=1e-10) and got > 0
    assert all(torch.equal(a, b) for a, b in zip(theta, params))


def test_more_ascent_steps_find_a_higher_loss_and_rho_zero_gives_zero():
    model, params, batches = _setup()
    theta = [p.detach().clone() for p in params]
    for norm in ("linf", "l2"):
        one = ad.worst_case(model, params, batches, 0.1, norm, iters=1)
        many = ad.worst_case(model, params, batches, 0.1, norm, iters=20)
        assert many >= one > 0
        assert ad.worst_case(model, params, batches, 0.0, norm, iters=3) == 0.0
        assert ad.average_case(model, params, batches, 0.0, norm, draws=2) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(theta, params))


def test_l2_projection_lands_on_the_scaled_ellipsoid():
    w = [torch.tensor([0.5, -2.0, 0.0], dtype=torch.float64), torch.tensor([[1.0, 0.1]], dtype=torch.float64)]
    scale = [t.abs() for t in w]
    z = [torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64), torch.tensor([[-2.0, 0.5]], dtype=torch.float64)]
    p = ad._project_l2(z, scale, 0.7)
    assert ad._wnorm(p, scale) == pytest.approx(0.7, abs=1e-5)
    assert p[0][2] == 0.0                                                # w = 0 is never perturbed
    assert ad._project_l2(p, scale, 1.0) is p                            # inside: unchanged


def test_average_case_is_the_mean_over_seeded_scaled_draws():
    model, params, batches = _setup()
    theta = [p.detach().clone() for p in params]
    rho, draws, seed = 0.2, 3, 4
    for norm in ("l2", "linf"):
        gen, want = torch.Generator().manual_seed(seed), []
        for x, y in batches:
            base = _loss_at(model, params, x, y, [torch.zeros_like(w) for w in theta])
            total = 0.0
            for _ in range(draws):
                r = [torch.randn(w.shape, generator=gen) if norm == "l2" else 2 * torch.rand(w.shape, generator=gen) - 1
                     for w in theta]
                total += _loss_at(model, params, x, y, [rho * t.double() * w.abs() for t, w in zip(r, theta)])
            want.append(total / draws - base)
        got = ad.average_case(model, params, batches, rho, norm, draws, seed)
        assert got == pytest.approx(sum(want) / 2, rel=1e-10) and math.isfinite(got)
    assert all(torch.equal(a, b) for a, b in zip(theta, params))

