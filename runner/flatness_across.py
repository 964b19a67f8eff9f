r"""Does a flatness measure predict generalization? Across the runs of one flatness.py call:

    test error      the run's final test error (summary.json `final_test_error`; for a run that has
                    none yet, the last test error in metrics.jsonl)
    gap             test error − the error on the analysis set (training images, final weights,
                    no augmentation): the generalization gap in error %
    Kendall τ       scipy.stats.kendalltau (τ-b, ties counted) between each measure and each of the
                    two, over the runs that have both, with its two-sided p-value

as the sharpness–generalization studies report it (Jiang et al., "Fantastic Generalization
Measures and Where to Find Them", ICLR 2020; Andriushchenko et al., ICML 2023). τ = 1: the
measure orders the runs exactly as their test error does. Few runs give wide uncertainty: with
n runs, |τ| below about 2/√n is not distinguishable from 0.
"""
from __future__ import annotations

import json
import math
import os

MEASURES = [  # (row key, label); eigenvalues are read from hessian_top_eigenvalues
    ("lambda_max", "λ_max"), ("hessian_trace", "tr H"), ("hessian_lambda_min", "λ_min"),
    ("sam_sharpness", "SAM sharpness"), ("amp_sharpness", "AMP sharpness"), ("rwp_sharpness", "RWP sharpness"),
    ("adaptive_worst_linf", "adaptive worst L∞"), ("adaptive_worst_l2", "adaptive worst L2"),
    ("adaptive_average_l2", "adaptive average L2"), ("loss", "training loss"),
]
TARGETS = [("test_error", "test error %"), ("gap", "gap (test − train error %)")]


def test_error(run_dir):
    """The run's final test error %, or None."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            v = json.load(f).get("final_test_error")
        if isinstance(v, (int, float)):
            return float(v)
    except (OSError, ValueError, AttributeError):
        pass
    last = None
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    v = json.loads(line).get("test_error")
                except (ValueError, AttributeError):
                    continue
                last = float(v) if isinstance(v, (int, float)) else last
    except OSError:
        pass
    return last


def value(row, key):
    if key == "lambda_max":
        eig = row.get("hessian_top_eigenvalues")
        return eig[0] if eig else None
    v = row.get(key)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def add_targets(rows):
    """Sets row['test_error'] and row['gap'] (None where the run has no test error)."""
    for r in rows:
        r["test_error"] = test_error(r["run_dir"])
        r["gap"] = None if r["test_error"] is None else r["test_error"] - r["error"]


def correlations(rows):
    """[{measure, label, target, n, tau, p}] for every measure present in ≥ 3 runs with a target."""
    from scipy.stats import kendalltau
    out = []
    for key, label in MEASURES:
        for target, _ in TARGETS:
            pairs = [(value(r, key), r.get(target)) for r in rows]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            if len(pairs) < 3:
                continue
            res = kendalltau([a for a, _ in pairs], [b for _, b in pairs])
            tau = None if math.isnan(res.statistic) else float(res.statistic)
            out.append(dict(measure=key, label=label, target=target, n=len(pairs), tau=tau,
                            p=None if tau is None else float(res.pvalue)))
    return out


def markdown(corr, fmt):
    """One row per measure: τ with test error and with the gap (p-value in brackets)."""
    by = {}
    for c in corr:
        by.setdefault((c["measure"], c["label"]), {})[c["target"]] = c
    lines = ["| measure | runs | Kendall τ with test error (p) | Kendall τ with gap (p) |", "|---|---|---|---|"]
    for (key, label), t in by.items():
        cells = []
        for target, _ in TARGETS:
            c = t.get(target)
            cells.append("–" if c is None or c["tau"] is None else f"{c['tau']:.2f} ({fmt(c['p'])})")
        n = max(c["n"] for c in t.values())
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def scatter(rows, path):
    """One panel per measure: the measure (x) against the test error (y), one point per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [(k, lab) for k, lab in MEASURES if sum(value(r, k) is not None and r.get("test_error") is not None
                                                   for r in rows) >= 2]
    if not keys:
        return False
    cols = min(len(keys), 4)
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.6 * nrows), squeeze=False)
    opts = sorted({r["optimizer"] for r in rows})
    for a, (key, label) in zip(axes.flat, keys):
        for opt in opts:
            pts = [(value(r, key), r["test_error"]) for r in rows
                   if r["optimizer"] == opt and value(r, key) is not None and r.get("test_error") is not None]
            if pts:
                a.scatter([p[0] for p in pts], [p[1] for p in pts], label=opt, s=30)
        a.set_xlabel(label, fontsize=11)
        a.set_ylabel("test error %", fontsize=11)
    for a in list(axes.flat)[len(keys):]:
        a.axis("off")
    axes.flat[0].legend(fontsize=9)
    fig.suptitle("flatness measure vs test error, one point per run", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
