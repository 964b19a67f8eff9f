"""Flatness analysis of trained runs: Hessian spectrum, each method's own sharpness, loss landscapes.

    python flatness.py RUN_DIR [RUN_DIR ...] [--samples 2048] [--grid 21] [--out flatness_out]

For each run folder (as main.py writes it) the model of its last checkpoint is rebuilt with the
runner's own model code, and one analysis set is fixed: a seeded subset (--data_seed) of --samples
images of the run's own training data (its train_size subset when it used one), normalised with
the run's mean/std, without augmentation. L(θ) is the mean cross-entropy over that set. Measured:

  curvature   top --top_k Hessian eigenvalues (Lanczos/ARPACK on Hessian-vector products, --hvp),
              the trace (Hutchinson deflated by the top eigenvectors, products until its 95 %
              bootstrap-t interval is within --trace_rtol), and with --density the spectral density
              (stochastic Lanczos quadrature: raw nodes/weights, λ_min, width σ); always in fp32
  sharpness   SAM  L(θ + ρ g/‖g‖) − L(θ)                         (--rho, sam.py's perturbation)
              AMP  worst L in the per-tensor ε-ball − L(θ)         (--epsilon --inner_lr --amp_iter, amp.py)
              RWP  E[L(θ + filter-wise noise of scale γ)] − L(θ)  (--gamma --rwp_draws, rwp.py), ± s.e.
  adaptive    adaptive sharpness in the |w|-scaled ball (Andriushchenko et al., ICML 2023): worst
              case L∞ and L2 (momentum ascent), average case L2 (--adaptive_rho_* --adaptive_iters)
  landscape   L and error along one (1-D, --grid points) and two (2-D, --grid² points) random
              filter-normalised directions (Li et al., NeurIPS 2018), the same seeded directions
              (--direction_seed) for every run of one architecture

BatchNorm uses its running statistics (eval mode) unless --bn train. The radii are the same for
every run (defaults: the runner's defaults), so the numbers compare across optimizers.

Writes: the Markdown table on stdout (one row per run, grouped like report.py, with the run's test
error and generalization gap; with ≥ 3 runs the Kendall τ of each measure with them), and in --out:
flatness.md, landscape_1d.png (overlaid curves), landscape_2d.png (contours), landscape.csv,
spectral_density.png (--density), correlation.png (≥ 3 runs), and each run's record
<run>/flatness.json (all numbers, the 1-D/2-D grids, the settings; --save_eigenvectors also
<run>/hessian_eigenvectors.pt); --json and --csv write the per-run rows. Definitions and sources:
docs/flatness.md.

Exit codes: 0 done; 1 an output could not be written (disk full: the file named, a half-written one
removed); 2 bad input (not a run folder, a checkpoint that does not fit its model, an analysis set
larger than the data); 130 Ctrl-C; each with one line on stderr.
"""
from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C from here on, imports included: one line, exit 130 (see __main__ below)
    from runner.signals import exit_on_interrupt
    exit_on_interrupt("flatness.py")
    import numpy, torch  # noqa: E401,F401  (the slow imports, under that handler: a half-imported one breaks later)

import argparse
import csv
import dataclasses
import json
import os
import sys

from runner.config import Parser, UsageError
from runner.flatness_plots import fmt as _fmt, plot, plot_density
from runner.records import WriteFailed, check_output, save_file

MEASURES = ("curvature", "sharpness", "adaptive", "landscape")
RECORD = "flatness.json"   # the per-run record in the run folder (report.py shows it when present)
EIGENVECTORS = "hessian_eigenvectors.pt"   # --save_eigenvectors, in the run folder
CSV_FIELDS = ["run_dir", "dataset", "model", "optimizer", "setting", "seed", "loss", "error", "test_error", "gap",
              "hessian_top_eigenvalues", "hessian_trace", "hessian_trace_low", "hessian_trace_high",
              "hessian_lambda_min", "sam_sharpness", "amp_sharpness", "rwp_sharpness", "rwp_sharpness_se",
              "adaptive_worst_linf", "adaptive_worst_l2", "adaptive_average_l2"]


def _parser():
    p = Parser(prog="flatness.py", description=__doc__, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("runs", nargs="+", metavar="RUN_DIR", help="run folders (with checkpoint.pt)")
    a("--measures", nargs="+", choices=MEASURES, default=list(MEASURES), help="what to compute (default: all)")
    a("--samples", type=int, default=2048, help="images in the analysis set (default 2048)")
    a("--data_seed", type=int, default=0, help="seed of the analysis subset (default 0)")
    a("--data_dir", default=None, help="where the data is, if not the run's own data_dir")
    a("--batch_size", type=int, default=256, help="images per forward pass (default 256; with --bn train also the BN batch)")
    a("--bn", choices=("eval", "train"), default="eval",
      help="BatchNorm with running statistics (eval, default) or each batch's statistics (train)")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when visible")
    a("--precision", choices=("fp32", "bf16"), default="fp32",
      help="forward passes of sharpness and landscapes under bf16 autocast (curvature stays fp32)")
    a("--top_k", type=int, default=5, help="Hessian eigenvalues to compute (default 5)")
    a("--eig_tol", type=float, default=1e-3, help="ARPACK relative tolerance of the eigenvalues (default 1e-3)")
    a("--hvp", choices=("graph", "recompute"), default="graph",
      help="Hessian-vector products: keep the gradient graph of the set (graph, default, fast) or "
           "redo it per product (recompute: half the speed, memory of one batch)")
    a("--save_eigenvectors", action="store_true", help="write the top-k eigenvectors to RUN_DIR/hessian_eigenvectors.pt")
    a("--trace_rtol", type=float, default=0.05,
      help="trace: draw products until the 95%% interval is within ± this fraction (default 0.05)")
    a("--trace_matvecs", type=int, default=100,
      help="trace: at most this many products (default 100; ≥ the parameter count: exact)")
    a("--density", action="store_true", help="also the spectral density (stochastic Lanczos quadrature)")
    a("--density_ncv", type=int, default=64, help="Lanczos steps per probe of the density (default 64)")
    a("--density_probes", type=int, default=4, help="random probe vectors of the density (default 4)")
    a("--density_width", type=float, default=None,
      help="Gaussian width σ of the density (default: a tenth of the spectrum's interquartile range)")
    a("--rho", type=float, default=0.05, help="SAM radius ρ (default 0.05)")
    a("--epsilon", type=float, default=0.5, help="AMP radius ε per tensor (default 0.5)")
    a("--inner_lr", type=float, default=1.0, help="AMP ascent step ζ (default 1)")
    a("--amp_iter", type=int, default=1, help="AMP ascent steps (default 1, as training; more finds a worse loss)")
    a("--gamma", type=float, default=0.01, help="RWP noise scale γ (default 0.01)")
    a("--rwp_draws", type=int, default=10, help="RWP Monte Carlo draws (default 10)")
    a("--adaptive_rho_linf", type=float, default=0.002, help="adaptive worst-case L∞ radius (default 0.002)")
    a("--adaptive_rho_l2", type=float, default=0.5, help="adaptive worst-case L2 radius (default 0.5)")
    a("--adaptive_rho_avg", type=float, default=0.1, help="adaptive average-case L2 radius (default 0.1)")
    a("--adaptive_iters", type=int, default=20, help="ascent steps and average-case draws per batch (default 20)")
    a("--noise_seed", type=int, default=0, help="seed of RWP's noise and the trace/eigen start vectors (default 0)")
    a("--grid", type=int, default=21, help="landscape points per axis (default 21; 2-D costs grid²)")
    a("--log_loss", action="store_true", help="1-D landscape plot with a log-scale loss axis")
    a("--span", type=float, default=1.0, help="landscape coordinates in [-span, span] (default 1)")
    a("--direction_seed", type=int, default=0, help="seed of the random directions (default 0)")
    a("--no-2d", dest="two_d", action="store_false", help="skip the 2-D landscape")
    a("--out", default="flatness_out", help="folder for flatness.md, PNGs and landscape.csv (default flatness_out)")
    a("--json", metavar="FILE", help="also write the per-run rows as JSON")
    a("--csv", metavar="FILE", help="also write the per-run rows as CSV")
    return p


def _check(args):
    for name in ("samples", "batch_size", "top_k", "trace_matvecs", "rwp_draws", "density_ncv", "density_probes",
                 "adaptive_iters"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.amp_iter < 0:
        raise UsageError(f"--amp_iter must be >= 0, got {args.amp_iter}")
    if args.grid < 2:
        raise UsageError(f"--grid must be >= 2, got {args.grid}")
    for name in ("rho", "epsilon", "inner_lr", "gamma", "span", "eig_tol", "trace_rtol", "adaptive_rho_linf",
                 "adaptive_rho_l2", "adaptive_rho_avg"):
        v = getattr(args, name)
        if not v >= 0 or v == float("inf"):
            raise UsageError(f"--{name} must be a finite number >= 0, got {v}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out: {args.out!r} is a file, not a folder")
    for flag, path in (("--json", args.json), ("--csv", args.csv)):
        if path and not os.path.isdir(args.out) and (
                os.path.abspath(os.path.dirname(path) or ".") == os.path.abspath(args.out)):
            continue  # goes into --out, which is made once the inputs are checked
        if path:
            check_output(flag, path)
    if args.density_width is not None and not 0 < args.density_width < float("inf"):
        raise UsageError(f"--density_width must be a finite number > 0, got {args.density_width}")


# ----------------------------------------------------------------------------- data and runs

def analysis_set(cfg, samples, seed, batch_size, device, data_dir=None):
    """[(x, y)]: `samples` images of the run's training data (seeded subset), normalised with the
    run's own mean/std (its Augment's normalize, no random augmentation), in batches on device."""
    import torch
    import data_utils
    from runner.loading import load_data
    from runner.training import build_augment
    if data_dir is not None:
        cfg = dataclasses.replace(cfg, data_dir=data_dir)
    images, labels = load_data(cfg, train=True)
    if samples > len(images):
        raise UsageError(f"--samples {samples} is larger than the run's training data "
                         f"({len(images)} images of {cfg.dataset}, train_size {cfg.train_size})")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:samples]
    augment = build_augment(cfg, data_utils.DATASETS[cfg.dataset])
    return list(data_utils.test_batches(images[idx], labels[idx], batch_size, augment, device=device))


def load(run_dir, device):
    """(model, cfg) of a run folder; the checkpoint must be the one of its config.yaml's model."""
    import yaml
    from runner.loading import load_run
    model, cfg = load_run(run_dir, device)
    path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                saved = yaml.safe_load(f)
        except (OSError, yaml.YAMLError):
            saved = None
        for field in ("model", "dataset"):
            if isinstance(saved, dict) and saved.get(field, getattr(cfg, field)) != getattr(cfg, field):
                raise UsageError(f"{run_dir}: checkpoint.pt is of {field} {getattr(cfg, field)}, but "
                                 f"config.yaml says {saved.get(field)}")
    return model, cfg


def _labels(cfgs):
    """Per run: (dataset, model, optimizer, setting, seed) with setting = report.py's `setting`
    (the fields that change results and differ between the runs, where not at the default)."""
    import report
    confs = [dataclasses.asdict(c) for c in cfgs]
    keys = [{k: v for k, v in c.items() if k not in report.IGNORED
             and (k not in report.RELEVANT_IF or report.RELEVANT_IF[k](c))} for c in confs]
    order = list(confs[0]) if confs else []
    varying = [f for f in order if f not in report.NAMED
               and len({json.dumps(k.get(f)) for k in keys if f in k}) > 1]
    defaults = report._defaults()
    return [(c["dataset"], c["model"], c["optimizer"], report._setting(k, varying, defaults), c["seed"])
            for c, k in zip(confs, keys)]


# ----------------------------------------------------------------------------- one run

def analyse(model, batches, args, device, bar=None):
    """All requested measures of one model on one analysis set → (a dict of plain numbers, the top
    Hessian eigenvectors as a [dim, top_k] array or None)."""
    import torch
    from runner import flatness_measures as fm
    model = fm.prepare_model(model, args.bn)
    params = fm.trainable(model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else None
    loss, error = fm.evaluate(model, batches)                       # fp32 reference point
    rec = {"loss": loss, "error": error, "parameters": sum(p.numel() for p in params)}
    vectors = None
    if "curvature" in args.measures:
        from runner.hessian import curvature
        curv, vectors = curvature(model, params, batches, args.top_k, args.eig_tol, args.noise_seed, args.hvp,
                                  args.trace_rtol, args.trace_matvecs,
                                  args.density_ncv if args.density else 0, args.density_probes,
                                  args.density_width, bar)
        rec.update(curv)
    if "sharpness" in args.measures:
        rec["sam_sharpness"], rec["sam_loss"], _ = fm.sam_sharpness(model, params, batches, args.rho, autocast)
        rec["amp_sharpness"], rec["amp_loss"], _ = fm.amp_sharpness(
            model, params, batches, args.epsilon, args.inner_lr, args.amp_iter, autocast)
        mean, se, _, losses = fm.rwp_sharpness(model, params, batches, args.gamma, args.rwp_draws,
                                               args.noise_seed, autocast, bar)
        rec.update(rwp_sharpness=mean, rwp_sharpness_se=se, rwp_losses=losses)
    if "adaptive" in args.measures:
        from runner import adaptive_sharpness as ad
        with _ctx(autocast):
            rec["adaptive_worst_linf"] = ad.worst_case(model, params, batches, args.adaptive_rho_linf, "linf", args.adaptive_iters)
            rec["adaptive_worst_l2"] = ad.worst_case(model, params, batches, args.adaptive_rho_l2, "l2", args.adaptive_iters)
            rec["adaptive_average_l2"] = ad.average_case(model, params, batches, args.adaptive_rho_avg, "l2",
                                                         args.adaptive_iters, args.noise_seed)
    if "landscape" in args.measures:
        g = torch.Generator().manual_seed(args.direction_seed)
        d1 = fm.filter_normalized_direction(params, g)
        d2 = fm.filter_normalized_direction(params, g)
        ax = fm.axis(args.grid, args.span)
        one = fm.landscape(model, params, batches, [d1], [(a,) for a in ax], autocast, bar)
        rec["landscape_1d"] = {"alpha": ax, "loss": [v[0] for v in one], "error": [v[1] for v in one]}
        if args.two_d:
            two = fm.landscape(model, params, batches, [d1, d2], [(a, b) for b in ax for a in ax], autocast, bar)
            n = len(ax)
            rec["landscape_2d"] = {"alpha": ax, "beta": ax,
                                   "loss": [[two[j * n + i][0] for i in range(n)] for j in range(n)]}
    return rec, vectors


def _ctx(autocast):
    import contextlib
    return autocast if autocast is not None else contextlib.nullcontext()


def save_eigenvectors(path, model, eigenvalues, vectors):
    """{'eigenvalues': [k], 'eigenvectors': [k × {parameter name: tensor}]} (PyHessian's layout,
    one tensor per parameter per eigenvector), float32 on the CPU."""
    import torch
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = []
    for j in range(vectors.shape[1]):
        at, vec = 0, {}
        for name, p in named:
            vec[name] = torch.from_numpy(vectors[at:at + p.numel(), j].copy()).float().view(p.shape)
            at += p.numel()
        out.append(vec)
    torch.save({"eigenvalues": eigenvalues, "eigenvectors": out}, path)


def _work(args, model):
    """Progress-bar units for one run: forward passes over the set and Hessian-vector products."""
    n = 0
    if "sharpness" in args.measures:
        n += args.rwp_draws
    if "landscape" in args.measures:
        n += args.grid + (args.grid ** 2 if args.two_d else 0)
    if "curvature" in args.measures:
        n += min(args.trace_matvecs, sum(p.numel() for p in model.parameters() if p.requires_grad))
        n += args.density_ncv * args.density_probes if args.density else 0
    return n


# ----------------------------------------------------------------------------- output

def _trace_cell(r):
    if r["hessian_trace_exact"]:
        return f"{_fmt(r['hessian_trace'])} (exact)"
    return f"{_fmt(r['hessian_trace'])} [{_fmt(r['hessian_trace_low'])}, {_fmt(r['hessian_trace_high'])}]"


def markdown(rows, args) -> str:
    show_setting = any(r["setting"] for r in rows)
    head = ["dataset", "model", "optimizer"] + (["setting"] if show_setting else []) + ["seed", "loss", "error %", "test error %", "gap"]
    if "curvature" in args.measures:
        head += ["λ_max", f"top-{args.top_k} λ", "tr H [95% interval]"] + (["λ_min"] if args.density else [])
    if "sharpness" in args.measures:
        head += [f"SAM ρ={args.rho:g}", f"AMP ε={args.epsilon:g}", f"RWP γ={args.gamma:g}"]
    if "adaptive" in args.measures:
        head += [f"adaptive worst L∞ ρ={args.adaptive_rho_linf:g}", f"adaptive worst L2 ρ={args.adaptive_rho_l2:g}",
                 f"adaptive average L2 ρ={args.adaptive_rho_avg:g}"]
    if "landscape" in args.measures:
        head += [f"1-D L(±{args.span:g})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dataset"], r["model"], r["optimizer"]] + ([r["setting"] or "–"] if show_setting else [])
        cells += [str(r["seed"]), _fmt(r["loss"]), f"{r['error']:.2f}"]
        cells += ["–" if r.get("test_error") is None else f"{r[k]:.2f}" for k in ("test_error", "gap")]
        if "curvature" in args.measures:
            eig = r["hessian_top_eigenvalues"]
            cells += [_fmt(eig[0]), ", ".join(_fmt(v) for v in eig), _trace_cell(r)]
            cells += [_fmt(r["hessian_lambda_min"])] if args.density else []
        if "sharpness" in args.measures:
            cells += [_fmt(r["sam_sharpness"]), _fmt(r["amp_sharpness"]),
                      f"{_fmt(r['rwp_sharpness'])} ± {_fmt(r['rwp_sharpness_se'])}"]
        if "adaptive" in args.measures:
            cells += [_fmt(r[k]) for k in ("adaptive_worst_linf", "adaptive_worst_l2", "adaptive_average_l2")]
        if "landscape" in args.measures:
            c = r["landscape_1d"]["loss"]
            cells += [f"{_fmt(c[0])} / {_fmt(c[-1])}"]
        lines.append("| " + " | ".join(cells) + " |")
    note = [f"Analysis set: {args.samples} training images per run (seed {args.data_seed}), BatchNorm in "
            f"{args.bn} mode; loss = mean cross-entropy, error = top-1 error on the set; test error = the run's "
            "final test error, gap = test error − error on the set."]
    if "curvature" in args.measures:
        note.append("λ: Hessian eigenvalues (fp32); tr H: deflated Hutchinson estimate with its 95% bootstrap-t "
                    f"interval (products until within ±{args.trace_rtol:g}, at most {args.trace_matvecs})."
                    + (" λ_min: smallest Lanczos Ritz value of the density (an upper bound)." if args.density else ""))
    if "sharpness" in args.measures:
        note.append(f"Sharpness = perturbed loss − loss; AMP with {args.amp_iter} ascent step(s) of ζ={args.inner_lr:g}; "
                    f"RWP mean ± standard error over {args.rwp_draws} draws.")
    if "adaptive" in args.measures:
        note.append(f"Adaptive sharpness (Andriushchenko et al. 2023): per batch of {args.batch_size}, "
                    f"{args.adaptive_iters} ascent steps / draws, mean over batches.")
    if "landscape" in args.measures:
        note.append(f"1-D L(±{args.span:g}): loss at the two ends of the filter-normalised direction.")
    note = " ".join(note)
    return "\n".join(lines) + "\n\n" + note + "\n"


def write_landscape_csv(rows, f):
    w = csv.writer(f)
    w.writerow(["run_dir", "axes", "alpha", "beta", "loss", "error"])
    for r in rows:
        c = r["landscape_1d"]
        for a, loss, err in zip(c["alpha"], c["loss"], c["error"]):
            w.writerow([r["run_dir"], "1d", a, "", loss, err])
        s = r.get("landscape_2d")
        if s:
            for j, b in enumerate(s["beta"]):
                for i, a in enumerate(s["alpha"]):
                    w.writerow([r["run_dir"], "2d", a, b, s["loss"][j][i], ""])


def write_rows_csv(rows, f):
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({**r, "hessian_top_eigenvalues": " ".join(map(repr, r.get("hessian_top_eigenvalues", [])))})


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        _parser().print_help()
        return 0
    try:
        args = _parser().parse_args(argv)
        _check(args)
        import torch
        from tqdm import tqdm
        from runner.records import write_text
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is visible; use --device cpu")
        device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
        loaded = [load(r, device) for r in args.runs]               # all inputs checked before work
        labels = _labels([cfg for _, cfg in loaded])
        for run_dir, (model, _) in zip(args.runs, loaded):
            n = sum(p.numel() for p in model.parameters() if p.requires_grad)
            if "curvature" in args.measures and args.top_k >= n:
                raise UsageError(f"--top_k {args.top_k} must be below the parameter count of {run_dir} ({n})")
        data, keys, rows = {}, [], []
        for _, cfg in loaded:                                       # every analysis set before any measure
            key = (cfg.dataset, args.data_dir or cfg.data_dir, cfg.train_size, tuple(cfg.mean), tuple(cfg.std))
            if key not in data:
                data[key] = analysis_set(cfg, args.samples, args.data_seed, args.batch_size, device, args.data_dir)
            keys.append(key)
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out: cannot make folder {args.out!r} ({e.strerror})") from None
        for run_dir, (model, cfg), label, key in zip(args.runs, loaded, labels, keys):
            with tqdm(total=_work(args, model), desc=os.path.basename(os.path.normpath(run_dir)),
                      file=sys.stderr, disable=None, leave=False) as bar:
                rec, vectors = analyse(model, data[key], args, device, bar)
            if args.save_eigenvectors and vectors is not None:
                save_eigenvectors(os.path.join(run_dir, EIGENVECTORS), model, rec["hessian_top_eigenvalues"], vectors)
            row = dict(zip(("dataset", "model", "optimizer", "setting", "seed"), label))
            row = {"run_dir": run_dir, **row, **rec,
                   "settings": {k: v for k, v in vars(args).items() if k not in ("runs", "json", "csv", "out")}}
            record = os.path.join(run_dir, RECORD)
            try:
                write_text(record, json.dumps(row, indent=1) + "\n")  # (atomic: an older record stays whole)
            except OSError as e:
                raise WriteFailed(e.errno, e.strerror, record) from None
            rows.append(row)
    except UsageError as e:
        print(f"flatness.py: error: {e}", file=sys.stderr)
        return 2
    except WriteFailed as e:  # a run's flatness.json: disk full, quota, ...
        return _write_failed(e)
    except Exception as e:  # a missing or corrupt data set (data_utils.DataError) is bad input too
        import data_utils
        if isinstance(e, data_utils.DataError):
            print(f"flatness.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        raise
    rank = {o: i for i, o in enumerate(("sgd", "amp", "rwp", "sam", "asam"))}
    rows.sort(key=lambda r: (r["dataset"], r["model"], r["setting"], rank.get(r["optimizer"], 9), r["seed"]))
    from runner import flatness_across as across
    across.add_targets(rows)
    table = markdown(rows, args)
    corr = across.correlations(rows)
    if corr:                                                        # ≥ 3 runs with a test error
        table += (f"\nAcross the {len(rows)} runs: Kendall τ between each measure and the test error and gap "
                  "(scatter: correlation.png).\n\n" + across.markdown(corr, _fmt))
        across.scatter(rows, os.path.join(args.out, "correlation.png"))
    sys.stdout.write(table)
    try:
        save_file(os.path.join(args.out, "flatness.md"), lambda f: f.write(table))
        if "curvature" in args.measures and args.density:
            plot_density(rows, args.out)
        if "landscape" in args.measures:
            plot(rows, args.out, args)
            save_file(os.path.join(args.out, "landscape.csv"), lambda f: write_landscape_csv(rows, f))
        if args.json:
            save_file(args.json, lambda f: json.dump(rows, f, indent=1))
        if args.csv:
            save_file(args.csv, lambda f: write_rows_csv(rows, f))
    except OSError as e:
        return _write_failed(e)
    return 0


def _write_failed(error: OSError) -> int:
    """One line for an output that could not be written; exit code 1 (a runtime failure)."""
    where = f" {error.filename}" if error.filename else ""
    print(f"flatness.py: error: cannot write{where}: {error.strerror or error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    from runner.signals import run_main
    sys.exit(run_main("flatness.py", main))
