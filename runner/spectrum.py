r"""Trace and spectral density of a symmetric operator H known only through products H·v.

Trace, deflated Hutchinson (the Hutch++ idea, Meyer, Musco, Musco & Woodruff, SOSA 2021, with the
low-rank part taken from the Lanczos eigenvectors already computed for the top eigenvalues):

    tr H = tr(QᵀHQ) + tr(PHP),   Q = top-k Ritz vectors (orthonormal), P = I − QQᵀ
    tr(QᵀHQ) = Σ_i θ_i                      (Ritz values; no further products)
    tr(PHP) ≈ (1/m) Σ_j (Pg_j)ᵀ H (Pg_j),   g_j Rademacher          (unbiased for any Q)

The top eigenvalues carry most of ‖H‖_F, so the samples of the remainder vary far less than
plain Hutchinson's vᵀHv. The 95 % bootstrap-t interval of the mean (2000 resamples; it holds for
skewed samples) is reported. Products are drawn until the normal-theory half-width 1.96·s/√m is
within rtol·|estimate|, with at least `min_matvecs` and at most `max_matvecs` products. When the
budget covers the dimension the trace is exact, Σ_i e_iᵀHe_i.

Spectral density, stochastic Lanczos quadrature (Papyan, JMLR 2020, algorithm 2; Ghorbani,
Krishnan & Xiao, ICML 2019): for each of `probes` random unit vectors v, m Lanczos steps with full
reorthogonalisation give a tridiagonal T = U diag(θ) Uᵀ, and

    vᵀ f(H) v ≈ Σ_i w_i f(θ_i),   w_i = U_{1i}²       (Gauss quadrature: nodes θ_i, weights w_i)
    p(λ) ≈ (1/probes) Σ_v Σ_i w_i N(λ; θ_i, σ²)

The raw nodes and weights are kept. σ by default follows the spectrum's own scale: a tenth of the
interquartile range of the quadrature measure (the bulk), not of the full range
[λ_min, λ_max] that outliers set.
"""
from __future__ import annotations

import math

import numpy as np
import torch

LEVEL = 0.95          # the trace interval's coverage
BOOTSTRAP = 2000      # bootstrap resamples


def bootstrap_interval(samples, seed=0, level=LEVEL, resamples=BOOTSTRAP):
    """(low, high): bootstrap-t interval of the mean of `samples` (Efron & Tibshirani, "An
    Introduction to the Bootstrap", 1993, ch. 12): t*_b = (m*_b − m)/se*_b over resamples b, and
    [m − t*_{1−a}·se, m − t*_{a}·se], a = (1 − level)/2. It corrects for skew (second-order
    accurate), where m ± 1.96·se and the percentile interval undercover for small samples."""
    x = np.asarray(samples, dtype=np.float64)
    n = len(x)
    m, se = x.mean(), x.std(ddof=1) / math.sqrt(n)
    if n < 2 or se == 0:
        return float(m), float(m)
    rs = x[np.random.default_rng(seed).integers(0, n, size=(resamples, n))]
    se_b = rs.std(axis=1, ddof=1) / math.sqrt(n)
    ok = se_b > 0
    t = (rs.mean(axis=1)[ok] - m) / se_b[ok]
    a = (1 - level) / 2
    return float(m - np.quantile(t, 1 - a) * se), float(m - np.quantile(t, a) * se)


def _project(v, Q):
    return v if Q is None else v - Q @ (Q.T @ v)                     # P v = (I − QQᵀ) v


def trace(H, rtol=0.05, min_matvecs=10, max_matvecs=100, seed=0, Q=None, ritz=None, bar=None):
    """Deflated Hutchinson trace of H (`H @ v` for flat torch vectors, `H.shape`). Q: [dim, k]
    orthonormal float64 numpy (the top Ritz vectors) and ritz their values, or None (plain
    Hutchinson). Returns a dict: estimate, low/high (95 % bootstrap interval), matvecs, exact,
    deflated (Σ ritz), samples (the (Pg)ᵀH(Pg) values)."""
    dim = H.shape[0]
    if max_matvecs >= dim:                                          # the budget covers H: exact
        total = 0.0
        for i in range(dim):
            e = torch.zeros(dim, dtype=torch.float64)
            e[i] = 1.0
            total += float((H @ e)[i])                               # e_iᵀ H e_i
        return dict(estimate=total, low=total, high=total, matvecs=dim, exact=True, deflated=0.0, samples=[])
    rng = np.random.default_rng(seed)
    base = float(sum(ritz)) if Q is not None else 0.0
    samples = []
    while len(samples) < max_matvecs:
        g = _project(rng.choice([-1.0, 1.0], size=dim), Q)
        hg = (H @ torch.from_numpy(g)).double().cpu().numpy()
        samples.append(float(g @ hg))                               # (Pg)ᵀ H (Pg)
        if bar is not None:
            bar.update(1)
        if len(samples) >= min_matvecs:                             # normal half-width to stop,
            half = 1.96 * float(np.std(samples, ddof=1)) / math.sqrt(len(samples))
            if half <= rtol * abs(base + float(np.mean(samples))):  # the bootstrap for the interval
                break
    low, high = bootstrap_interval(samples, seed)
    return dict(estimate=base + float(np.mean(samples)), low=base + low, high=base + high,
                matvecs=len(samples), exact=False, deflated=base, samples=samples)


# ----------------------------------------------------------------------------- spectral density

def lanczos(H, v, steps):
    """(nodes θ, weights w) of the Gauss quadrature of the measure vᵀδ(H − λ)v / ‖v‖², from
    `steps` Lanczos iterations with full reorthogonalisation (float64)."""
    dim = H.shape[0]
    steps = min(steps, dim)
    V = np.zeros((steps, dim))
    alpha, beta = [], []
    V[0] = v / np.linalg.norm(v)
    for j in range(steps):
        w = (H @ torch.from_numpy(V[j])).double().cpu().numpy()
        a = float(V[j] @ w)
        alpha.append(a)
        w = w - V[:j + 1].T @ (V[:j + 1] @ w)                        # full reorthogonalisation, twice
        w = w - V[:j + 1].T @ (V[:j + 1] @ w)
        b = float(np.linalg.norm(w))
        if j + 1 == steps or b < 1e-10 * max(1.0, abs(a)):
            break
        beta.append(b)
        V[j + 1] = w / b
    T = np.diag(alpha) + np.diag(beta[:len(alpha) - 1], 1) + np.diag(beta[:len(alpha) - 1], -1)
    theta, U = np.linalg.eigh(T)
    return theta, U[0] ** 2


def slq(H, steps=64, probes=4, seed=0, bar=None):
    """[(nodes, weights)] per probe: stochastic Lanczos quadrature with Rademacher probes."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(probes):
        nodes, weights = lanczos(H, rng.choice([-1.0, 1.0], size=H.shape[0]), steps)
        out.append((nodes, weights))
        if bar is not None:
            bar.update(steps)
    return out


def _pooled(quadrature):
    nodes = np.concatenate([n for n, _ in quadrature])
    weights = np.concatenate([w for _, w in quadrature]) / len(quadrature)
    return nodes, weights


def default_width(quadrature):
    """σ = a tenth of the interquartile range of the pooled quadrature measure (weights summing to
    1); when the bulk is one node (IQR 0), 1/1000 of the full range of the nodes."""
    nodes, weights = _pooled(quadrature)
    order = np.argsort(nodes)
    cdf = np.cumsum(weights[order])
    q1, q3 = (nodes[order][np.searchsorted(cdf, q * cdf[-1])] for q in (0.25, 0.75))
    sigma = (q3 - q1) / 10
    if sigma <= 0:
        sigma = (nodes.max() - nodes.min()) / 1000
    return float(sigma) if sigma > 0 else 1e-6


def density(quadrature, sigma, grid):
    """p(λ) on `grid`: the pooled quadrature smoothed by Gaussians of width σ."""
    nodes, weights = _pooled(quadrature)
    g = np.asarray(grid, dtype=np.float64)[:, None]
    return (weights * np.exp(-0.5 * ((g - nodes) / sigma) ** 2)).sum(axis=1) / (sigma * math.sqrt(2 * math.pi))


def mass(quadrature, edges, sigma=None):
    """Fraction of the spectrum in each bin [edges[i], edges[i+1]): of the raw quadrature
    (sigma None) or of its Gaussian smoothing (exact integrals, via the normal CDF)."""
    from scipy.special import ndtr
    nodes, weights = _pooled(quadrature)
    e = np.asarray(edges, dtype=np.float64)
    if sigma is None:
        cdf = np.array([weights[nodes < x].sum() for x in e])
    else:
        cdf = (weights * ndtr((e[:, None] - nodes) / sigma)).sum(axis=1)
    return np.diff(cdf)


def grid_for(quadrature, sigma, points=512):
    """Where to evaluate the smoothed density: `points` evenly over [min − 4σ, max + 4σ] plus 9
    points within ±4σ of every node, so narrow peaks are resolved (sorted, unique)."""
    nodes, _ = _pooled(quadrature)
    lo, hi = nodes.min() - 4 * sigma, nodes.max() + 4 * sigma
    local = (nodes[:, None] + sigma * np.linspace(-4, 4, 9)).ravel()
    return np.unique(np.concatenate([np.linspace(lo, hi, points), local]))
