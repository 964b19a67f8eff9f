r"""Flatness measures of a trained model on a fixed analysis set S (used by flatness.py).

Everything is a function of the model's trainable parameters θ and the training loss on S,

    L(θ) = (1/|S|) Σ_{(x,y)∈S} CE(f_θ(x), y)                   (mean cross-entropy over the set)

computed batch by batch with sums, so the number does not depend on the batch size (except for
BatchNorm in train mode, which normalises with each batch's statistics).

Curvature (the Hessian H = ∇²L(θ)) is in runner/hessian.py and runner/spectrum.py, adaptive
sharpness in runner/adaptive_sharpness.py.

Each method's sharpness, with the method's own perturbation code (amp.py, sam.py, rwp.py):
    SAM   L(θ + ρ·g/(‖g‖+δ)) − L(θ),  g = ∇L(θ), one global norm          (SAM.perturb)
    AMP   max_{n=0..N} L(θ + Δ_n) − L(θ), Δ_n = Π_ε(Δ_{n-1} + ζ·∇L(θ+Δ_{n-1})), Δ_0 = 0,
          one ε-ball per parameter tensor (the official AMP code)            (AMP.perturb)
    RWP   E_ε[L(θ+ε)] − L(θ), ε_{p,i} ~ N(0, (γ‖W_{p,i}‖)²) per output filter i (γ(‖p‖+1e-16)
          for ≤1-dim tensors); Monte Carlo over K draws, mean ± standard error (RWP.perturb)

Loss landscapes (Li, Xu, Taylor, Studer, Goldstein, NeurIPS 2018, "Visualizing the Loss
Landscape of Neural Nets"; tomgoldstein/loss-landscape net_plotter.py):
    d ~ N(0, I) per tensor; d_{p,i} ← d_{p,i}·‖θ_{p,i}‖/(‖d_{p,i}‖+1e-10) for every filter i of a
    ≥2-dim tensor; d_p = 0 for ≤1-dim tensors (biases, BatchNorm) ("filter" norm, "biasbn" ignore)
    1-D: L(θ + α·d),  2-D: L(θ + α·d₁ + β·d₂)
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm


# ----------------------------------------------------------------------------- model and set

def prepare_model(model, bn="eval"):
    """The model to analyse. bn='eval': as given (eval mode, BatchNorm with its running
    statistics). bn='train': a copy whose BatchNorm layers normalise with each batch's own
    statistics and never touch running statistics (torch.func.replace_all_batch_norm_modules_);
    everything else (dropout) stays in eval mode."""
    if bn == "eval":
        return model.eval()
    if bn != "train":
        raise ValueError(f"bn must be 'eval' or 'train', got {bn!r}")
    model = copy.deepcopy(model).eval()
    torch.func.replace_all_batch_norm_modules_(model)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.train()
    return model


def trainable(model):
    """θ: the parameters that training changes (requires_grad), in model.parameters() order."""
    return [p for p in model.parameters() if p.requires_grad]


def _ctx(autocast):
    return autocast if autocast is not None else contextlib.nullcontext()


def _wide(out):
    """Logits for the loss: half-precision ones (autocast) in fp32, fp32/fp64 ones as they are."""
    return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out


@torch.no_grad()
def evaluate(model, batches, autocast=None):
    """(L, error %) on the set: mean cross-entropy and top-1 error over all its samples."""
    total, wrong, n = 0.0, 0, 0
    for x, y in batches:
        with _ctx(autocast):
            out = model(x)
        total += F.cross_entropy(_wide(out), y, reduction="sum").item()
        wrong += (out.argmax(1) != y).sum().item()
        n += len(y)
    return total / n, 100.0 * wrong / n


def gradient(model, params, batches, autocast=None):
    """Sets p.grad = ∇L(θ) for every p in params (summed over the batches, each weighted |B|/|S|)
    and returns L(θ)."""
    n = sum(len(y) for _, y in batches)
    for p in params:
        p.grad = None
    total = 0.0
    for x, y in batches:
        with torch.enable_grad():
            with _ctx(autocast):
                out = model(x)
            loss = F.cross_entropy(_wide(out), y, reduction="sum")
            (loss / n).backward()
        total += loss.item()
    return total / n


def _mean_se(values):
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))


# ----------------------------------------------------------------------------- sharpness

def sam_sharpness(model, params, batches, rho, autocast=None):
    """SAM's ρ-sharpness L(θ + ρ·g/(‖g‖+1e-12)) − L(θ) with g = ∇L(θ) on the whole set, the
    perturbation made by sam.SAM.perturb (one global norm). Returns (sharpness, L(θ+ε̂), L(θ))."""
    from sam import SAM
    loss0 = gradient(model, params, batches, autocast)
    opt = SAM(params, lr=0.0, rho=rho)
    opt.perturb()                                                   # θ ← θ + ε̂
    try:
        loss1, _ = evaluate(model, batches, autocast)
    finally:
        opt.restore()                                               # θ back exactly
        opt.zero_grad(set_to_none=True)
    return loss1 - loss0, loss1, loss0


def amp_sharpness(model, params, batches, epsilon, inner_lr=1.0, iters=1, autocast=None):
    """AMP's worst loss in the ε-ball, found by its own inner ascent (amp.AMP.perturb, one ball per
    tensor) with full-set gradients: Δ_n = Π_ε(Δ_{n-1} + ζ·∇L(θ+Δ_{n-1})), n = 1..iters.
    Returns (max_{n=0..iters} L(θ+Δ_n) − L(θ), that worst loss, L(θ)); Δ_0 = 0 is in the ball, so
    the sharpness is ≥ 0. The training closure's gradient clipping is not applied."""
    from amp import AMP
    loss0 = gradient(model, params, batches, autocast)              # g_0 = ∇L(θ)
    opt = AMP(params, lr=0.0, epsilon=epsilon, inner_lr=inner_lr, inner_iter=iters, ball="tensor")
    worst = loss0
    try:
        for n in range(1, iters + 1):
            opt.perturb()                                           # θ + Δ_n from the current .grad
            if n < iters:
                loss = gradient(model, params, batches, autocast)   # g_n = ∇L(θ + Δ_n)
            else:
                loss, _ = evaluate(model, batches, autocast)
            worst = max(worst, loss)
    finally:
        opt.restore()
        opt.zero_grad(set_to_none=True)
    return worst - loss0, worst, loss0


def rwp_sharpness(model, params, batches, gamma, draws=10, seed=0, autocast=None, bar=None):
    """RWP's expected loss under its filter-wise noise minus the clean loss,
    E_ε[L(θ+ε)] − L(θ), by Monte Carlo over `draws` noise draws of rwp.RWP.perturb (draw k uses
    RWP's noise stream at step k with `seed`). Returns (mean, standard error, L(θ), [L(θ+ε_k)])."""
    from rwp import RWP
    loss0, _ = evaluate(model, batches, autocast)
    opt = RWP(params, lr=0.0, gamma=gamma, alpha=1.0, seed=seed)
    losses = []
    for k in range(draws):
        opt.step_count = k                                          # noise_seed(seed, 0, k)
        opt.perturb()                                               # θ ← θ + ε_k
        try:
            losses.append(evaluate(model, batches, autocast)[0])
        finally:
            opt.restore()
        if bar is not None:
            bar.update(1)
    mean, se = _mean_se([v - loss0 for v in losses])
    return mean, se, loss0, losses


# ----------------------------------------------------------------------------- landscapes

@torch.no_grad()
def filter_normalized_direction(params, generator):
    """A random direction d (one tensor per parameter), filter-normalised as Li et al.: each
    filter (row along dim 0) of a ≥2-dim tensor rescaled to the norm of the same filter of θ,
    ≤1-dim tensors (biases, BatchNorm) zero. The raw N(0, I) draw comes from the CPU `generator`
    in parameter order, so it depends only on the seed and the shapes (the same for every run of
    one architecture)."""
    out = []
    for p in params:
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
        if p.dim() <= 1:
            d.zero_()
        else:
            dims = tuple(range(1, p.dim()))
            w_norm = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=True)
            d_norm = torch.linalg.vector_norm(d, dim=dims, keepdim=True)
            d.mul_(w_norm / (d_norm + 1e-10))                      # ‖d_i‖ → ‖θ_i‖
        out.append(d)
    return out


def axis(grid, span=1.0):
    """`grid` evenly spaced points in [-span, span]; the middle one is exactly 0 when grid is odd."""
    if grid < 2:
        return [0.0]
    h = (grid - 1) / 2
    return [span * (i - h) / h for i in range(grid)]


@torch.no_grad()
def landscape(model, params, batches, directions, coords, autocast=None, bar=None):
    """[(L, error %)] at θ + Σ_j c_j·d_j for each coordinate tuple c in `coords` (one direction:
    1-D; two: 2-D). θ is restored exactly afterwards."""
    theta = [p.detach().clone() for p in params]
    out = []
    try:
        for c in coords:
            for p, t, *ds in zip(params, theta, *directions):
                p.copy_(t)
                for a, d in zip(c, ds):
                    if a != 0.0:
                        p.add_(d, alpha=a)                          # θ + Σ c_j d_j
            out.append(evaluate(model, batches, autocast))
            if bar is not None:
                bar.update(1)
    finally:
        torch._foreach_copy_(params, theta)
    return out
