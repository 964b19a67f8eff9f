"""Curvature of flatness.py against the exact float64 Hessian of a small trained CNN: the
Hessian-vector product (both modes), the trace interval's coverage over many seeds, and the
spectral density's mass in bins."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from runner import spectrum
from runner.hessian import HessianOperator, top_eigenpairs


@pytest.fixture(scope="module")
def trained():
    """A 292-parameter CNN trained 100 steps on 64 random images (the spectrum of a trained
    network: a few outliers, a bulk near 0, small negative eigenvalues), its batches and exact H."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 4)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (64,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    params = list(model.parameters())
    flat = torch.func.functional_call

    def loss(theta):                                  # L(θ), θ flat: an independent exact Hessian
        at, named = 0, {}
        for (name, p) in model.named_parameters():
            named[name] = theta[at:at + p.numel()].view_as(p)
            at += p.numel()
        return F.cross_entropy(flat(model, named, (x,)), y)
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    exact = torch.autograd.functional.hessian(loss, theta).numpy()
    return model, params, batches, exact


class _Dense:
    """The exact Hessian as an operator (fast products for many seeds)."""

    def __init__(self, H):
        self.H, self.shape = H, H.shape

    def __matmul__(self, v):
        return torch.from_numpy(self.H @ v.double().numpy())


def test_both_hvp_modes_equal_the_exact_hessian(trained):
    model, params, batches, exact = trained
    v = torch.randn(exact.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for mode in ("graph", "recompute"):
        H = HessianOperator(model, params, batches, mode=mode)
        assert np.allclose((H @ v).numpy(), exact @ v.numpy(), rtol=1e-10, atol=1e-12)
        assert np.allclose((H @ v).numpy(), exact @ v.numpy(), rtol=1e-10, atol=1e-12)   # graph reused
        assert H.count == 2
    vals, vecs = top_eigenpairs(HessianOperator(model, params, batches), k=3, tol=1e-10)
    want = np.linalg.eigvalsh(exact)[::-1][:3]
    assert np.allclose(vals, want, rtol=1e-8)
    assert np.allclose(np.abs(vecs.T @ vecs), np.eye(3), atol=1e-8)
    low, _ = top_eigenpairs(HessianOperator(model, params, batches), k=1, tol=1e-10, which="SA")
    assert low[0] == pytest.approx(np.linalg.eigvalsh(exact)[0], rel=1e-6) and low[0] < 0


def _coverage(H, seeds, **kw):
    exact = float(np.trace(H.H))
    hits, used = 0, []
    for s in range(seeds):
        r = spectrum.trace(H, seed=s, **kw)
        hits += r["low"] <= exact <= r["high"]
        used.append(r["matvecs"])
    return hits / seeds, float(np.mean(used))


def test_trace_interval_covers_the_exact_trace_at_its_stated_rate(trained):
    # 200 seeds: 95 % ± 3 binomial standard deviations (1.5 %) is [0.905, 0.995]
    model, params, batches, exact = trained
    H = _Dense(exact)
    vals, vecs = top_eigenpairs(HessianOperator(model, params, batches), k=5, tol=1e-10)
    cov, used = _coverage(H, 200, rtol=0.0, min_matvecs=10, max_matvecs=10)          # plain, m = 10
    assert 0.905 <= cov <= 0.995 and used == 10
    cov, used = _coverage(H, 200, rtol=0.05, max_matvecs=150, Q=vecs, ritz=vals)     # deflated, adaptive
    assert 0.905 <= cov <= 0.995 and used < 40
    one = spectrum.trace(H, seed=0, rtol=0.05, max_matvecs=150, Q=vecs, ritz=vals)
    assert (one["high"] - one["low"]) / 2 <= 0.07 * one["estimate"]                  # the requested accuracy
    plain = spectrum.trace(H, seed=0, rtol=0.05, max_matvecs=150)
    assert plain["matvecs"] > one["matvecs"]                                          # deflation saves products


def test_trace_is_exact_when_the_budget_covers_the_dimension(trained):
    _, _, _, exact = trained
    r = spectrum.trace(_Dense(exact), max_matvecs=exact.shape[0])
    assert r["exact"] and r["low"] == r["high"] == pytest.approx(float(np.trace(exact)), rel=1e-12)


def test_bootstrap_t_interval_corrects_for_skew():
    # exponential samples (skew 2): the interval reaches further above the mean than below it
    x = np.random.default_rng(0).exponential(size=15)
    low, high = spectrum.bootstrap_interval(x)
    assert low < x.mean() < high and high - x.mean() > x.mean() - low


def test_spectral_density_mass_in_bins_matches_the_exact_spectrum(trained):
    model, params, batches, exact = trained
    ev = np.linalg.eigvalsh(exact)
    H = HessianOperator(model, params, batches)
    quad = spectrum.slq(H, steps=30, probes=4, seed=0)
    assert len(quad) == 4 and all(abs(w.sum() - 1) < 1e-10 for _, w in quad)
    edges = [-np.inf, -0.005, 0.005, 0.05, 0.2, np.inf]
    want = np.histogram(ev, bins=[-1e9, *edges[1:-1], 1e9])[0] / len(ev)
    sigma = spectrum.default_width(quad)
    assert np.abs(spectrum.mass(quad, edges) - want).max() < 0.03                     # raw quadrature
    assert np.abs(spectrum.mass(quad, edges, sigma) - want).max() < 0.03              # smoothed, default σ
    wide = 3 * (ev[-1] - ev[0]) / 256                                                # a range-based width
    assert np.abs(spectrum.mass(quad, edges, wide) - want).max() > 0.1                # smears the bulk
    lam_min = min(n.min() for n, _ in quad)                                           # a Ritz value ≥ λ_min
    assert ev[0] <= lam_min < 0.9 * ev[0]
    grid = spectrum.grid_for(quad, sigma)
    p = spectrum.density(quad, sigma, grid)
    assert np.trapezoid(p, grid) == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("kw", [dict(kernel_size=3), dict(kernel_size=(5, 3), stride=2, padding=(2, 1), dilation=(1, 2)),
                                dict(kernel_size=2, stride=(1, 2), bias=False)])
def test_data_convolutions_as_matmul_equal_the_convolution(kw):
    """The first layer's W_mat · unfold(x) + b equals the convolution (values and H·v), applies only
    inside the block and only to inputs that need no gradient."""
    from runner.hessian import data_convs_as_matmul
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, **kw).double()
    model = nn.Sequential(conv, nn.Tanh(), nn.Conv2d(5, 2, 3), nn.Flatten()).double()
    x = torch.randn(4, 3, 11, 9, dtype=torch.float64)
    want = model(x)
    with data_convs_as_matmul(model):
        assert "_conv_forward" in vars(conv)
        assert torch.allclose(model(x), want, rtol=1e-12, atol=1e-12)
        xg = x.clone().requires_grad_()
        assert torch.equal(conv(xg), F.conv2d(xg, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation))
    assert all("_conv_forward" not in vars(m) for m in model.modules())
    y = torch.randint(0, 2, (4,))
    model = nn.Sequential(model, nn.LazyLinear(3)).double()
    model(x)
    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss = lambda: F.cross_entropy(model(x), y, reduction="sum") / 4
    g = torch.autograd.grad(loss(), params, create_graph=True)                      # native convolutions
    at, vs = 0, []
    for p in params:
        vs.append(v[at:at + p.numel()].view_as(p))
        at += p.numel()
    ref = torch.cat([h.reshape(-1) for h in torch.autograd.grad(g, params, grad_outputs=vs)])
    for mode in ("graph", "recompute"):
        assert torch.allclose(HessianOperator(model, params, [(x, y)], mode=mode) @ v, ref, rtol=1e-10, atol=1e-12)


def test_a_product_computes_no_gradient_for_the_data():
    """PyTorch's convolution double backward forms the input's gradient (a transposed convolution)
    even when the input needs none; through W_mat · unfold(x) no convolution runs in a product."""
    from torch.profiler import profile
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 3, (8,))
    params = list(model.parameters())
    H = HessianOperator(model, params, [(x, y)])
    v = torch.randn(sum(p.numel() for p in params))
    with profile() as prof:
        H @ v
    assert not [e.key for e in prof.key_averages() if "conv" in e.key]
    g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    with profile() as prof:                                                          # what it avoids
        torch.autograd.grad(g, params, grad_outputs=[torch.ones_like(p) for p in params])
    assert "aten::_convolution_double_backward" in [e.key for e in prof.key_averages()]
