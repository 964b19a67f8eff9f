r"""Adaptive sharpness (Andriushchenko, Croce, Müller, Hein & Flammarion, "A Modern Look at the
Relationship between Sharpness and Generalization", ICML 2023; Kwon et al., "ASAM", ICML 2021),
as their code computes it (tml-epfl/sharpness-vs-generalization, commit 6d73be9, sharpness.py:
eval_APGD_sharpness, weight_ascent_step_momentum, eval_average_sharpness, random_init_lw; the
settings of eval_sharpness.py: mean cross-entropy per batch, 20 iterations, no random start).

For each batch B of the analysis set separately (their m-sharpness with m = |B|), with w the
weights and the elementwise |w|-scaled ball  ‖δ / |w|‖_p ≤ ρ:

  worst case   max over the iterates of L_B(w + δ_k) − L_B(w), δ found by 20 steps of their
               momentum ascent (δ_0 = 0, step η_0 = 2ρ):
                  z = δ_k + η·|w|⊙g/‖g‖₂   (L2)      z = δ_k + η·|w|⊙sign(g)   (L∞),  g = ∇L_B(w + δ_k)
                  z ← Π(z): L∞ clip to ±ρ|w|; L2 the Euclidean projection onto the ellipsoid,
                      z/(1 + 2λ/w²) with λ by bisection until |‖z/|w|‖₂ − ρ| ≤ 1e-5
                  δ_{k+1} = 0.75·z + 0.25·δ_k
               at the iterations ⌈0.22n⌉, … of APGD (Croce & Hein 2020) the step halves when fewer
               than 75 % of the steps since the last check raised the worst loss or nothing changed,
               and the weights go back to the worst point found (δ is not reset, as in their code)
  average case E_δ L_B(w + δ) − L_B(w), δ = ρ|w|⊙N(0, I) (L2) or ρ|w|⊙U(−1, 1) (L∞), 20 draws

The result is the mean over batches. Elements with w = 0 are never perturbed (their code divides
0/0 there; we treat the ratio as 0).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _loss(model, x, y):
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def _set(params, w0, delta):
    with torch.no_grad():
        for p, w, d in zip(params, w0, delta):
            p.copy_(w + d)


def _wnorm(delta, scale):
    """‖δ/|w|‖₂ with 0/0 = 0."""
    return math.sqrt(sum(float(torch.where(s > 0, d / s, torch.zeros_like(d)).pow(2).sum())
                         for d, s in zip(delta, scale)))


def _project_l2(delta, scale, rho):
    """Euclidean projection onto {‖δ/|w|‖₂ ≤ ρ}: δ/(1 + 2λ/w²), λ by their bisection."""
    if _wnorm(delta, scale) <= rho:
        return delta
    lmbd, lo, hi, limit = 0.1, 0.0, 10.0, 10.0
    new = rho + 1.0
    for _ in range(200):
        if abs(new - rho) <= 1e-5:
            break
        tmp = [torch.where(s > 0, d / (1 + 2 * lmbd / s.pow(2).clamp_min(1e-300)), torch.zeros_like(d))
               for d, s in zip(delta, scale)]
        new = _wnorm(tmp, scale)
        if new > rho:
            lmbd, lo = (lmbd + hi) / 2, lmbd
        else:
            lmbd, hi = (lo + lmbd) / 2, lmbd
        if limit - hi < 1e-2:
            limit, hi = limit * 2, hi * 2
    return tmp


def _checkpoints(n):
    """APGD's iterations at which the step size may halve (their version='default')."""
    p, w = [0, 0.22], [0, math.ceil(n * 0.22)]
    while w[-1] < n and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(p[-1] * n))
    return set(w[1:])


def worst_case(model, params, batches, rho, norm="linf", iters=20):
    """Mean over batches of the worst L_B(w + δ) − L_B(w) found by their momentum ascent."""
    w0 = [p.detach().clone() for p in params]
    scale = [w.abs() for w in w0]                                   # |w|
    checks, out = _checkpoints(iters), []
    try:
        for x, y in batches:
            init = worst = _loss(model, x, y)
            delta = [torch.zeros_like(w) for w in w0]
            prev_delta = [d.clone() for d in delta]
            worst_at = [d.clone() for d in delta]
            step = prev_step = 2 * rho
            prev_worst, prev_cp, updates = init, 0, 0
            for i in range(iters):
                backup = [d.clone() for d in delta]
                with torch.enable_grad():
                    g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
                with torch.no_grad():
                    if norm == "l2":
                        gn = math.sqrt(sum(float(t.pow(2).sum()) for t in g))
                        z = [d + step / (gn + 1e-12) * t * s for d, t, s in zip(delta, g, scale)]
                        z = _project_l2(z, scale, rho)
                    else:
                        z = [torch.clamp(d + step * t.sign() * s, -rho * s, rho * s) for d, t, s in zip(delta, g, scale)]
                    delta = [0.75 * a + 0.25 * b for a, b in zip(z, prev_delta)]   # momentum
                    prev_delta = backup
                _set(params, w0, delta)
                loss = _loss(model, x, y)
                if loss > worst:
                    worst, worst_at, updates = loss, [d.clone() for d in delta], updates + 1
                if i in checks:
                    halve = updates < 0.75 * (i - prev_cp) or (prev_step == step and prev_worst == worst)
                    prev_step, prev_worst, prev_cp, updates = step, worst, i, 0
                    if halve:
                        step *= 0.5
                        _set(params, w0, worst_at)                  # back to the worst point
            out.append(worst - init)
            _set(params, w0, [torch.zeros_like(w) for w in w0])
    finally:
        with torch.no_grad():
            torch._foreach_copy_(params, w0)
    return sum(out) / len(out)


@torch.no_grad()
def average_case(model, params, batches, rho, norm="l2", draws=20, seed=0):
    """Mean over batches of E_δ L_B(w + δ) − L_B(w), δ = ρ·|w|⊙N(0, I) (l2) or ρ·|w|⊙U(−1, 1) (linf);
    `draws` draws per batch from a CPU generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    w0 = [p.detach().clone() for p in params]
    out = []
    try:
        for x, y in batches:
            torch._foreach_copy_(params, w0)
            init, total = _loss(model, x, y), 0.0
            for _ in range(draws):
                delta = []
                for w in w0:
                    r = torch.randn(w.shape, generator=gen) if norm == "l2" else 2 * torch.rand(w.shape, generator=gen) - 1
                    delta.append(rho * r.to(w.device, w.dtype) * w.abs())
                _set(params, w0, delta)
                total += _loss(model, x, y)
            out.append(total / draws - init)
    finally:
        torch._foreach_copy_(params, w0)
    return sum(out) / len(out)
