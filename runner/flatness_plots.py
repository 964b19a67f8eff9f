"""Figures of flatness.py: the 1-D and 2-D loss landscapes and the Hessian spectral density, and
the one number format of its tables."""
from __future__ import annotations

import math
import os


def fmt(v, digits=4):
    """One format for every number: `digits` significant digits in fixed point for
    1e-3 ≤ |v| < 1e5, scientific outside; '–' for None."""
    if v is None:
        return "–"
    if v == 0 or not math.isfinite(v):
        return str(v)
    if 1e-3 <= abs(v) < 1e5:
        return f"{v:.{max(0, digits - 1 - math.floor(math.log10(abs(v))))}f}"
    return f"{v:.{digits - 1}e}"


def _name(r):
    return " ".join(x for x in (r["optimizer"], r["setting"], f"s{r['seed']}") if x)


LOSS = "training loss (mean cross-entropy, analysis set)"


def plot(rows, out, args):
    """landscape_1d.png (one line per run; --log_loss: log-scale loss axis) and landscape_2d.png
    (one square filled-contour panel per run, shared log-spaced levels and one colour bar)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    models = {r["model"] for r in rows}
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        c = r["landscape_1d"]
        ax.plot(c["alpha"], c["loss"], marker=".", label=_name(r) + (f" ({r['model']})" if len(models) > 1 else ""))
    if args.log_loss:
        ax.set_yscale("log")
    ax.set_xlabel("α (filter-normalised direction)", fontsize=12)
    ax.set_ylabel(LOSS, fontsize=12)
    ax.set_title(f"1-D landscape: {LOSS}\ndirection seed {args.direction_seed}", fontsize=11)
    ax.tick_params(labelsize=11)
    ax.legend(fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "landscape_1d.png"), dpi=110)
    plt.close(fig)
    two = [r for r in rows if "landscape_2d" in r]
    if not two:
        return
    cols = min(len(two), 3)
    nrows = (len(two) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols + 1.2, 4.4 * nrows), squeeze=False,
                             layout="constrained")
    top = max(max(map(max, r["landscape_2d"]["loss"])) for r in two)
    low = min(min(map(min, r["landscape_2d"]["loss"])) for r in two)
    # log-spaced levels: the basin (near L(θ)) stays visible next to the walls (often 100× higher)
    levels = (np.geomspace(low, top, 21) if low > 0 else np.linspace(low, top, 21)) if top > low else 21
    norm = matplotlib.colors.LogNorm(low, top) if 0 < low < top else None
    for a, r in zip(axes.flat, two):
        s = r["landscape_2d"]
        cs = a.contourf(s["alpha"], s["beta"], s["loss"], levels=levels, cmap="viridis", norm=norm)
        a.plot([0], [0], "r+", markersize=10)
        a.set_aspect("equal")
        a.set_title(f"{r['model']} {_name(r)}\nL(θ) = {fmt(r['loss'])}", fontsize=11)
        a.set_xlabel("α", fontsize=12)
        a.set_ylabel("β", fontsize=12)
        a.tick_params(labelsize=10)
    for a in list(axes.flat)[len(two):]:
        a.axis("off")
    bar = fig.colorbar(cs, ax=axes.ravel().tolist(), shrink=0.9)
    if not isinstance(levels, int):
        bar.minorticks_off()
        bar.set_ticks(levels[::4], labels=[fmt(float(v)) for v in levels[::4]])
    bar.set_label(LOSS, fontsize=11)
    fig.suptitle(f"2-D landscape: {LOSS}", fontsize=12)
    fig.savefig(os.path.join(out, "landscape_2d.png"), dpi=110)
    plt.close(fig)


def plot_density(rows, out):
    """spectral_density.png: each run's smoothed Hessian spectral density (log scale), with its
    width σ and λ_min in the legend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in rows:
        d = r["spectral_density"]
        ax.plot(d["eigenvalue"], [max(p, 1e-12) for p in d["density"]],
                label=f"{_name(r)}: σ = {fmt(d['sigma'])}, λ_min = {fmt(r['hessian_lambda_min'])}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=1e-8)
    ax.set_xlabel("eigenvalue λ", fontsize=12)
    ax.set_ylabel("density p(λ) (integrates to 1)", fontsize=12)
    ax.set_title("Hessian spectral density (stochastic Lanczos quadrature)", fontsize=11)
    ax.tick_params(labelsize=11)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "spectral_density.png"), dpi=110)
    plt.close(fig)


