"""Reproduction report: run folders → our test error (mean ± std over seeds) beside the paper's.

    python report.py runs/amp_table_a [more folders or globs ...] [--csv F] [--json F] [--plot F.png]

Each argument is a run folder (one with `config.yaml`, as `main.py` writes), a folder holding run
folders (searched recursively), or a glob of either; no argument means `runs`. Runs are grouped
by their resolved `config.yaml`, ignoring the fields that do not change results (below), and by
their process count (`world_size` in summary.json: the global batch and RWP's mode depend on it), and
for folder datasets (`--dataset imagenet`) by the data itself (summary.json's `data`: class count,
file counts and hashes of the class and file names; `data_dir` alone does not say; runs from before
it was recorded form their own `data=unrecorded` groups). For each
group the Markdown table on stdout gives

  n                           completed runs (seeds) in the group
  final test error            after the last epoch: mean ± sample std over seeds (ddof = 1; – when n = 1)
  best (picked on test)       lowest test error over evaluated epochs, per run, then mean ± std;
                              optimistic, since the epoch is chosen on the test set (the AMP code
                              reported this number)
  paper                       the config's paper_error ± paper_spread (the ± means what the paper says)
  ours − paper                mean final test error minus the paper's number
  test NLL                    cross-entropy of the final model on the test set, mean ± std (shown when
                              a run records it), beside the config's paper_nll where one is named
  criterion test loss         the training criterion on the test set (label smoothing, flooding per
                              batch), shown when a group smooths or floods: the AMP code's "NLL" column
                              is this loss, so the paper's label-smoothing NLLs (≈1.0–2.3) compare with it

The group is named by dataset, model, optimizer and a `setting` column holding the fields whose
values differ between the groups shown, where not at the runner's default (main.py --help).
Runs that did not complete (no `summary.json`: still running or crashed; or status interrupted /
diverged / failed) are listed in a second table with their status and epochs, and never averaged;
so are malformed folders (a summary.json or metrics.jsonl in a form main.py does not write), with
the reason. A torn last line of metrics.jsonl (a write cut short) is dropped with a note.
`--plot` draws test error and training loss against epoch, one line per group (mean over its
completed seeds) with a band spanning min–max over the seeds.
A folder holding a table submitted with `recipes/X.sh --slurm` (its `slurm/plan.tsv`) also gets the
state of every planned run, per row: finished, running, stopped, failed, not started
(runner/table_status.py).

Grouping ignores:
  - always: seed, name, out_dir, resume, on_existing, device, workers, eval_batch_size, compile, channels_last
    (main.py lets these change on --resume), data_dir, download (where the data comes from), and
    paper_ref / paper_error / paper_spread / paper_nll (labels, taken from the runs);
  - fields that the run's other settings switch off: the AMP fields unless optimizer is amp, the
    RWP fields unless rwp (arwp_eta / arwp_beta unless arwp), rho and sam_m unless sam/asam,
    adaptive_eta and asam_all_params unless asam, bn_update for sgd, nesterov without momentum,
    milestones / lr_decay under a cosine schedule, the Cutout fields without cutout,
    autoaugment_first / autoaugment_policy without autoaugment, the crop/flip fields without
    augment (pad_fill also matters for AutoAugment's fill), label_smoothing_style without
    label_smoothing, mixup_beta without mixup_alpha, adv_step / adv_iter without adv_epsilon.

Exit codes: 0 done; 1 nothing to plot, or --csv/--json/--plot could not be written (disk full: the file is removed);
2 bad arguments or no run folders found (one line on stderr).
"""
from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import json
import math
import os
import statistics
import sys

from runner.config import Parser, UsageError
from runner.records import check_output
from runner.table_status import find_plans, status_markdown

_DATA_COUNTS, _DATA_NAMES = ("classes", "train_files", "val_files"), ("class_names", "train_names", "val_names")
IGNORED = {"seed", "name", "out_dir", "resume", "on_existing", "device", "workers", "eval_batch_size", "compile",
           "channels_last", "data_dir", "download", "paper_ref", "paper_error", "paper_spread", "paper_nll",
           "progress_every", "tensorboard"}
_AMP = ("epsilon", "inner_lr", "inner_iter", "amp_ball")
_RWP = ("gamma", "alpha", "arwp", "gamma_final")
# field → condition on the config under which the field changes results
RELEVANT_IF = {
    **{f: lambda c: c.get("optimizer") == "amp" for f in _AMP},
    **{f: lambda c: c.get("optimizer") == "rwp" for f in _RWP},
    **{f: lambda c: c.get("optimizer") == "rwp" and c.get("arwp") for f in ("arwp_eta", "arwp_beta")},
    "rho": lambda c: c.get("optimizer") in ("sam", "asam"),
    "adaptive_eta": lambda c: c.get("optimizer") == "asam",
    "sam_m": lambda c: c.get("optimizer") in ("sam", "asam"),
    "asam_all_params": lambda c: c.get("optimizer") == "asam",
    "bn_update": lambda c: c.get("optimizer") != "sgd",
    "nesterov": lambda c: c.get("momentum", 1) > 0,
    "milestones": lambda c: c.get("schedule") != "cosine",
    "lr_decay": lambda c: c.get("schedule") != "cosine",
    **{f: lambda c: c.get("cutout", True) for f in ("cutout_size", "cutout_prob", "cutout_style")},
    **{f: lambda c: c.get("augment", True) for f in ("crop_padding", "pad_mode", "flip")},
    "autoaugment_first": lambda c: c.get("autoaugment"),
    "autoaugment_policy": lambda c: c.get("autoaugment"),
    "image_size": lambda c: c.get("dataset") == "imagenet",
    "pad_fill": lambda c: c.get("autoaugment") or (c.get("augment", True) and c.get("pad_mode") != "reflect"),
    "label_smoothing_style": lambda c: c.get("label_smoothing", 0) > 0,
    "mixup_beta": lambda c: c.get("mixup_alpha", 0) > 0,
    **{f: lambda c: c.get("adv_epsilon", 0) > 0 for f in ("adv_step", "adv_iter")},
}
OPTIMIZER_FIELDS = {*_AMP, *_RWP, "arwp_eta", "arwp_beta", "rho", "adaptive_eta", "bn_update", "sam_m",
                    "asam_all_params"}
NAMED = ("dataset", "model", "optimizer")  # always their own columns
OPTIMIZER_ORDER = ("sgd", "amp", "rwp", "sam", "asam")
NOTE = ("setting = the fields that differ between the groups, where not at the runner's default "
        "(python main.py --help); n = completed runs (seeds); ± = sample standard deviation over "
        "seeds (ddof = 1; – when n = 1); final = test error after the last epoch; best = lowest test "
        "error over epochs, picked on the test set (optimistic; the AMP code reported it); "
        "ours − paper uses the final mean. Errors in %. NLL = test cross-entropy after the last epoch; "
        "criterion = the training criterion on the test set (the AMP code's NLL column).")


# ----------------------------------------------------------------------------- reading runs

class Run:
    """One run folder: its config, summary (None if absent), metrics rows and status."""

    def __init__(self, path):
        import yaml
        self.path, self.config, self.summary, self.rows, self.problem, self.note = path, None, None, [], "", ""
        try:
            with open(os.path.join(path, "config.yaml"), "rb") as f:
                self.config = yaml.safe_load(f)
            if not isinstance(self.config, dict):
                raise ValueError("config.yaml is not a mapping")
            summary = os.path.join(path, "summary.json")
            if os.path.isfile(summary):
                with open(summary) as f:
                    self.summary = json.load(f)
                _check_summary(self.summary)
            metrics = os.path.join(path, "metrics.jsonl")
            if os.path.isfile(metrics):
                with open(metrics) as f:
                    self.rows, self.note = _read_rows(f.read().splitlines())
        except (OSError, ValueError, yaml.YAMLError) as e:
            reason = str(e) if isinstance(e, _Malformed) else type(e).__name__
            self.problem = f"unreadable ({reason})"
            self.summary, self.rows = None, []

    @property
    def status(self) -> str:
        if self.problem:
            return self.problem
        if self.summary is None:
            return "unfinished (no summary.json: running or crashed)"
        status = self.summary.get("status", "unknown")
        if status == "completed" and self.summary.get("final_test_error") is None:
            return "completed without a test error"
        return status

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def seed(self):
        return (self.config or {}).get("seed")

    @property
    def epochs_completed(self) -> int:
        # a resumed run that is still going has the summary of its stopped attempt: take the larger
        return max((self.summary or {}).get("epochs_completed") or 0, len(self.rows))

    def key(self):
        """The config without the fields that do not change results (module docstring), plus the
        process count (summary.json's world_size; 1 for runs from before it was recorded)."""
        c = self.config
        key = {k: v for k, v in c.items() if k not in IGNORED and (k not in RELEVANT_IF or RELEVANT_IF[k](c))}
        key["world_size"] = (self.summary or {}).get("world_size") or 1
        if c.get("dataset") == "imagenet":  # folder datasets: which data (classes, file names)
            data = (self.summary or {}).get("data")
            key["data"] = "unrecorded" if data is None else (
                f"{data['classes']} classes, {data['train_files']}/{data['val_files']} files #"
                + hashlib.sha256(" ".join(data[k] for k in _DATA_NAMES).encode()).hexdigest()[:8])
        return key


class _Malformed(ValueError):
    """A run record in a form main.py does not write; the message says which part."""


def _is_number(v, optional=False):
    return (v is None and optional) or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _check_summary(summary):
    if not isinstance(summary, dict):
        raise _Malformed(f"summary.json is a {type(summary).__name__}, not an object")
    completed = summary.get("status") == "completed"
    for field in ("final_test_error", "best_test_error"):
        if not _is_number(summary.get(field), optional=not completed):
            raise _Malformed(f"summary.json: {field} is {summary.get(field)!r}, not a number")
        if completed and not 0 <= summary[field] <= 100:  # (NaN too: it would make the group's mean NaN)
            raise _Malformed(f"summary.json: {field} is {summary[field]!r}, not an error in [0, 100] %")
    for field in ("epochs_completed", "world_size"):
        if not _is_number(summary.get(field), optional=True):
            raise _Malformed(f"summary.json: {field} is {summary.get(field)!r}, not a number")
    data = summary.get("data")
    if data is not None and not (isinstance(data, dict) and all(_is_number(data.get(k)) for k in _DATA_COUNTS)
                                 and all(isinstance(data.get(k), str) for k in _DATA_NAMES)):
        raise _Malformed(f"summary.json: data is {data!r}, not the record of a folder dataset")


def _read_rows(lines):
    """metrics.jsonl rows, and a note. A torn last line (a run killed while appending) is dropped
    with a note (summary.json holds the final numbers); any other bad line makes the folder malformed."""
    rows, note = [], ""
    lines = [line for line in lines if line.strip()]
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                note = "metrics.jsonl: its torn last line (a write cut short) was ignored"
                break
            raise _Malformed(f"metrics.jsonl line {i + 1} is not JSON") from None
        if not isinstance(row, dict) or not _is_number(row.get("epoch")):
            raise _Malformed(f"metrics.jsonl line {i + 1} is not a row of epoch metrics")
        for field in ("test_error", "train_loss"):  # (the curves of --plot)
            if not _is_number(row.get(field), optional=True):
                raise _Malformed(f"metrics.jsonl line {i + 1}: {field} is {row.get(field)!r:.80}, not a number")
        rows.append(row)
    return rows, note


def find_run_dirs(patterns):
    """Run folders named by the arguments (folders, folders of runs, globs), in order, no repeats."""
    found, seen = [], set()
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isdir(m)]
        if not matches:
            raise UsageError(f"{pattern!r} is not a folder and matches no folder")
        for top in matches:
            for path in _walk_runs(top):
                if os.path.realpath(path) not in seen:
                    seen.add(os.path.realpath(path))
                    found.append(path)
    if not found:
        raise UsageError(f"no run folders (folders with config.yaml) under {' '.join(patterns)}")
    return found


def _walk_runs(top):
    if os.path.isfile(os.path.join(top, "config.yaml")):
        return [top]
    runs = []
    for dirpath, dirnames, _ in os.walk(top):
        dirnames.sort()
        if os.path.isfile(os.path.join(dirpath, "config.yaml")):
            runs.append(dirpath)
            dirnames[:] = []  # a run folder holds no further runs
    return runs


# ----------------------------------------------------------------------------- statistics

def _mean_std(values):
    """(mean, sample std with ddof = 1 or None when n = 1)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "[]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _defaults():
    """The runner's defaults (main.Config), {} when main.py cannot be imported."""
    try:
        import dataclasses
        from main import Config
    except ImportError:
        return {}
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(Config)}


def _setting(key, fields, defaults) -> str:
    """`name=value` (booleans: `name` / `no-name`) for each field of `fields` not at its default."""
    parts = []
    for f in fields:
        if f in key and (f not in defaults or key[f] != defaults[f]):
            v = key[f]
            parts.append((f if v else f"no-{f}") if isinstance(v, bool) else f"{f}={_show(v)}")
    return ", ".join(parts)


def _agree(runs, field):
    """The value of a paper field in a group (most common; warn when the runs disagree)."""
    values = [r.config.get(field) for r in runs]
    distinct = sorted({json.dumps(v) for v in values})
    if len(distinct) > 1:
        print(f"report.py: warning: runs of one group disagree on {field} ({', '.join(distinct)}); "
              f"showing the most common; runs: {' '.join(r.path for r in runs)}", file=sys.stderr)
    return max(values, key=values.count)


def summarize(runs):
    """Completed runs → sorted groups (dicts); other runs → rows of the not-averaged list."""
    groups = {}
    for run in runs:
        if run.completed:
            groups.setdefault(json.dumps(run.key(), sort_keys=True), []).append(run)
    keys = {k: json.loads(k) for k in groups}
    # fields whose values differ between the groups, in Config order (first run's)
    first = next((r.config for r in runs if r.config), {})
    order = list(first) + sorted({f for k in keys.values() for f in k} - set(first))
    varying = [f for f in order if f not in NAMED
               and len({json.dumps(k.get(f)) for k in keys.values() if f in k}) > 1]
    defaults = _defaults()
    data_fields = [f for f in varying if f not in OPTIMIZER_FIELDS]  # rows sort on these first
    out = []
    for k, members in groups.items():
        key = keys[k]
        seeds = [r.seed for r in members]
        if len(set(seeds)) < len(seeds):
            print(f"report.py: warning: seeds {sorted(seeds)} repeat in one group (the same run twice?); "
                  f"all are averaged: {' '.join(r.path for r in members)}", file=sys.stderr)
        final = [float(r.summary["final_test_error"]) for r in members]
        best = [float(r.summary["best_test_error"]) for r in members]
        (fm, fs), (bm, bs) = _mean_std(final), _mean_std(best)
        top5 = [r.summary.get("final_test_error_top5") for r in members]  # absent in runs before top-5
        t5m, t5s = _mean_std([float(v) for v in top5]) if all(isinstance(v, (int, float)) for v in top5) else (None, None)
        paper, spread, ref, paper_nll = (_agree(members, f) for f in ("paper_error", "paper_spread", "paper_ref",
                                                                       "paper_nll"))
        (nm, ns), (cm, cs) = (_losses(members, f) for f in ("final_test_nll", "final_test_criterion_loss"))
        out.append({
            "dataset": key.get("dataset"), "model": key.get("model"), "optimizer": key.get("optimizer"),
            "setting": _setting(key, varying, defaults), "_sort": _setting(key, data_fields, defaults),
            "n": len(members), "seeds": seeds,
            "final_mean": fm, "final_std": fs, "best_mean": bm, "best_std": bs,
            "final": final, "best": best, "final_top5_mean": t5m, "final_top5_std": t5s,
            "paper_error": paper, "paper_spread": spread, "paper_ref": ref or "",
            "nll_mean": nm, "nll_std": ns, "paper_nll": paper_nll, "criterion_mean": cm, "criterion_std": cs,
            "smoothed_or_flooded": key.get("label_smoothing", 0) > 0 or key.get("flooding", 0) > 0,
            "diff_final": fm - paper if paper is not None else None,
            "diff_best": bm - paper if paper is not None else None,
            "runs": [r.path for r in members], "config": key, "_runs": members,
            "flatness": _flatness(members),
        })
    rank = {o: i for i, o in enumerate(OPTIMIZER_ORDER)}
    out.sort(key=lambda g: (str(g["dataset"]), str(g["model"]), g["_sort"],
                            rank.get(g["optimizer"], len(rank)), str(g["optimizer"])))
    others = [{"run": r.path, "seed": r.seed, "status": r.status, "epochs_completed": r.epochs_completed,
               "epochs": (r.config or {}).get("epochs"),
               "last_test_error": next((row["test_error"] for row in reversed(r.rows)
                                        if _is_number(row.get("test_error"))), None),
               "message": (r.summary or {}).get("message", "")}
              for r in runs if not r.completed]
    return out, others


def _losses(runs, field):
    """(mean, std) of a summary.json test loss over the runs; (None, None) when a run lacks it (runs
    from before it was recorded: the NLL is then the last evaluated metrics row's test_loss)."""
    values = []
    for r in runs:
        v = r.summary.get(field)
        if v is None and field == "final_test_nll":
            v = next((row.get("test_loss") for row in reversed(r.rows) if _is_number(row.get("test_error"))), None)
        if not _is_number(v):
            return None, None
        values.append(float(v))
    return _mean_std(values)


def _loss_cell(mean, std):
    return "–" if mean is None else f"{mean:.3f} ± " + (f"{std:.3f}" if std is not None else "–")


def _flatness(runs):
    """Means over the runs that hold a flatness.py record (flatness.json): λ_max and the SAM, AMP
    and RWP sharpness, with how many runs had one; None when none has."""
    recs = []
    for r in runs:
        try:
            with open(os.path.join(r.path, "flatness.json")) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("hessian_top_eigenvalues", []), list):
            recs.append(rec)  # (a malformed record is left out)
    if not recs:
        return None
    def mean(get):
        values = [v for v in (get(x) for x in recs) if isinstance(v, (int, float))]
        return statistics.fmean(values) if values else None
    return {"runs": len(recs), "lambda_max": mean(lambda x: (x.get("hessian_top_eigenvalues") or [None])[0]),
            **{k: mean(lambda x, k=k: x.get(k)) for k in ("sam_sharpness", "amp_sharpness", "rwp_sharpness")}}


# ----------------------------------------------------------------------------- output

def _pm(mean, std) -> str:
    return f"{mean:.2f} ± " + (f"{std:.2f}" if std is not None else "–")


def markdown(groups, others) -> str:
    show_setting = any(g["setting"] for g in groups)
    show_top5 = any(g.get("final_top5_mean") is not None and g["dataset"] == "imagenet" for g in groups)
    head = ["dataset", "model", "optimizer"] + (["setting"] if show_setting else []) + [
        "n", "final test error %"] + (["final top-5 error %"] if show_top5 else []) + [
        "best (picked on test) %", "paper %", "ours − paper"]
    nll = [h for h, show in (("test NLL", any(g["nll_mean"] is not None for g in groups)),
                             ("paper NLL", any(g["paper_nll"] is not None for g in groups)),
                             ("criterion test loss", any(g["smoothed_or_flooded"] for g in groups))) if show]
    head += nll
    flat = any(g.get("flatness") for g in groups)  # runs measured by flatness.py
    head += ["λ_max", "sharpness SAM / AMP / RWP"] if flat else []
    lines = []
    if groups:
        lines += ["| " + " | ".join(head) + " |",
                  "|" + "|".join("---:" if h in ("n",) or "%" in h or "paper" in h or "NLL" in h or "loss" in h else "---" for h in head) + "|"]
        for g in groups:
            paper = "–" if g["paper_error"] is None else f"{g['paper_error']:g}" + (
                f" ± {g['paper_spread']:g}" if g["paper_spread"] is not None else "")
            diff = "–" if g["diff_final"] is None else f"{g['diff_final']:+.2f}"
            cells = [g["dataset"], g["model"], g["optimizer"]] + ([g["setting"]] if show_setting else []) + [
                g["n"], _pm(g["final_mean"], g["final_std"])] + (
                ["–" if g.get("final_top5_mean") is None else _pm(g["final_top5_mean"], g["final_top5_std"])]
                if show_top5 else []) + [_pm(g["best_mean"], g["best_std"]), paper, diff]
            cells += [{"test NLL": _loss_cell(g["nll_mean"], g["nll_std"]),
                       "paper NLL": "–" if g["paper_nll"] is None else f"{g['paper_nll']:g}",
                       "criterion test loss": _loss_cell(g["criterion_mean"], g["criterion_std"])
                       if g["smoothed_or_flooded"] else "–"}[h] for h in nll]
            if flat:
                f = g.get("flatness") or {}
                show = lambda k: "–" if f.get(k) is None else f"{f[k]:.3g}"  # noqa: E731
                cells += [show("lambda_max"), " / ".join(show(k) for k in ("sam_sharpness", "amp_sharpness", "rwp_sharpness"))
                          + (f" ({f['runs']} of {g['n']} runs)" if f and f["runs"] != g["n"] else "")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines += ["", NOTE]
    else:
        lines.append("No completed runs.")
    notes = [f"- {r.path}: {r.note}" for g in groups for r in g["_runs"] if r.note]
    if notes:
        lines += ["", "Notes:", *notes]
    if others:
        lines += ["", "Not averaged (unfinished, interrupted, diverged, failed, crashed or malformed):", "",
                  "| run | seed | status | epochs | last test error % |", "|---|---:|---|---:|---:|"]
        for o in others:
            last = "–" if o["last_test_error"] is None else f"{o['last_test_error']:.2f}"
            lines.append(f"| {o['run']} | {o['seed']} | {o['status']} | "
                         f"{o['epochs_completed']}/{o['epochs']} | {last} |")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["dataset", "model", "optimizer", "setting", "n", "seeds", "final_mean", "final_std",
              "best_mean", "best_std", "paper_error", "paper_spread", "diff_final", "diff_best", "paper_ref", "runs",
              "nll_mean", "nll_std", "paper_nll", "criterion_mean", "criterion_std"]


def write_csv(path, groups):
    """One row per group; seeds and runs space-separated; empty cell = none (n = 1 std, no paper)."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for g in groups:
            row = {k: g[k] for k in CSV_FIELDS}
            row["seeds"] = " ".join(str(s) for s in g["seeds"])
            row["runs"] = " ".join(g["runs"])
            w.writerow({k: "" if v is None else v for k, v in row.items()})


def write_json(path, groups, others):
    data = {"note": NOTE, "groups": [{k: v for k, v in g.items() if not k.startswith("_")} for g in groups],
            "not_averaged": others}
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _curve(runs, field):
    """(epochs, mean, min, max) over the runs at the epochs where every run has `field`."""
    per_run = [{row["epoch"]: row[field] for row in r.rows if row.get(field) is not None} for r in runs]
    epochs = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    values = [[p[e] for p in per_run] for e in epochs]
    return (epochs, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values])


def plot(groups, path):
    """Test error and training loss against epoch; one line (mean) and min–max band per group.
    A panel whose values span more than a factor of 10 gets a log axis, so final errors stay apart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    named = [f for f in NAMED if len({g[f] for g in groups}) > 1] or list(NAMED)
    labels = [" ".join(str(g[f]) for f in named) + (f", {g['setting']}" if g["setting"] else "")
              + f" (n={g['n']})" for g in groups]
    longest = max(len(label) for label in labels)
    ncol = min(len(groups), 1 if longest > 70 else 2 if longest > 45 else 3)
    legend_h = 0.25 + 0.2 * -(-len(groups) // ncol)   # inches below the panels
    panels_h = 4.4
    fig, (ax_err, ax_loss) = plt.subplots(1, 2, figsize=(13, panels_h + legend_h))
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20").colors
    spans = {"test_error": [], "train_loss": []}
    for i, (g, label) in enumerate(zip(groups, labels)):
        style = dict(color=colors[i % len(colors)], linestyle=("-", "--", ":", "-.")[i // len(colors) % 4])
        for ax, field in ((ax_err, "test_error"), (ax_loss, "train_loss")):
            x, mean, lo, hi = _curve(g["_runs"], field)
            ax.plot(x, mean, marker="o" if len(x) < 20 else None, markersize=3, linewidth=1.6,
                    label=label if ax is ax_err else None, **style)
            ax.fill_between(x, lo, hi, color=style["color"], alpha=0.18, linewidth=0)
            spans[field] += lo + hi
    for ax, field, title, ylabel in ((ax_err, "test_error", "Test error", "test error (%)"),
                                     (ax_loss, "train_loss", "Training loss", "training loss (cross-entropy)")):
        values = spans[field]
        if values and min(values) > 0 and max(values) / min(values) > 10:
            ax.set_yscale("log")
            ylabel += ", log scale"
            few = math.log10(max(values) / min(values)) <= 2.5  # label 2× and 5× ticks too
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(
                lambda v, _: f"{v:g}" if few and f"{v:.0e}"[0] in "25" else ""))
            ax.tick_params(axis="y", which="both", labelsize=9)
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    height = panels_h + legend_h
    n_runs = sum(g["n"] for g in groups)
    fig.suptitle(f"{len(groups)} group(s), {n_runs} completed run(s): line = mean over seeds, "
                 f"band = min–max over seeds", fontsize=12)
    fig.tight_layout(rect=(0, legend_h / height, 1, 0.97))
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, legend_h / height), ncol=ncol, fontsize=9, frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # grows to hold a legend wider than the panels
    plt.close(fig)


# ----------------------------------------------------------------------------- command line

def _parser():
    p = Parser(prog="report.py", description=__doc__, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", default=["runs"], help="run folders, folders of runs, or globs (default: runs)")
    p.add_argument("--csv", metavar="FILE", help="also write the groups as CSV")
    p.add_argument("--json", metavar="FILE", help="also write groups and not-averaged runs as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also plot test error and training loss against epoch")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        _parser().print_help()
        return 0
    try:
        args = _parser().parse_args(argv)
        for opt in ("csv", "json", "plot"):
            if getattr(args, opt) is not None:
                check_output(f"--{opt}", getattr(args, opt))
        ext = os.path.splitext(args.plot or "")[1][1:].lower()  # none: matplotlib writes PNG
        if ext:
            from matplotlib.backend_bases import FigureCanvasBase
            kinds = FigureCanvasBase.get_supported_filetypes()
            if ext not in kinds:
                raise UsageError(f"--plot: matplotlib cannot write .{ext} files; it writes {', '.join(sorted(kinds))}")
        plans = find_plans(args.paths)  # tables submitted with --slurm: their status too
        try:
            runs = [Run(p) for p in find_run_dirs(args.paths)]
        except UsageError:
            if not plans:
                raise
            runs = []  # (nothing has started yet)
    except UsageError as e:
        print(f"report.py: error: {e}", file=sys.stderr)
        return 2
    groups, others = summarize(runs)
    sys.stdout.write(markdown(groups, others))
    for table, planned in plans:
        sys.stdout.write("\n" + status_markdown(table, planned))
    outputs = [(args.csv, lambda: write_csv(args.csv, groups)), (args.json, lambda: write_json(args.json, groups, others))]
    if args.plot:
        if not groups:
            print("report.py: error: no completed runs to plot", file=sys.stderr)
            return 1
        outputs.append((args.plot, lambda: plot(groups, args.plot)))
    for path, write in outputs:
        if path:
            try:
                write()
            except OSError as e:  # (disk full, quota, a failing disk): no half-written file is left
                if os.path.isfile(path):
                    os.remove(path)
                print(f"report.py: error: cannot write {path}: {e.strerror or e}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
