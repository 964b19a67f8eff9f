"""Step 6 of the GPU visit: every step's record → OUT/results.json and OUT/results.md (one table).

Reads OUT/status/<step>.json (recipes/gpu_visit.sh: exit code, seconds, time share, timed out),
OUT/<step>.json (runner.gpu_visit: the items) and the files the items name (bench.py JSON, run
folders, flatness rows). A step with no status did not run; one whose record is missing or
unreadable is reported as such: the report is always written.
"""
from __future__ import annotations

import json
import os

from runner.gpu_visit import STEPS

TITLES = {"env": "1 environment", "bench": "2 training step", "sync_pipeline": "3 sync check, pipelines",
          "train": "4 Fashion-MNIST 2 epochs", "flatness": "5 flatness"}
# dense bf16 tensor-core rate of an H200 (H100-class compute) that the issue measures steps against
PEAK_BF16_TFLOPS = 790


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _num(v, spec):
    return "n/a" if v is None else format(v, spec)


def bench_figures(r):
    """Figures of one bench.py JSON, per optimizer and per stage."""
    out = {"device": r.get("device"), "torch": r.get("torch"), "date": r.get("date")}
    if r.get("bench") == "bench.py jpeg_decode":
        out["cpu_workers"] = {k: r["cpu_workers"][k] for k in ("workers", "images_per_s")}
        out["device_decode"] = {k: v["images_per_s"] for k, v in r["device_decode"].items()}
        return out
    out["train"] = [dict({k: row.get(k) for k in ("optimizer", "ms_per_step", "images_per_s", "ratio_to_sgd",
                                                   "epoch_s", "peak_memory_mib", "peak_memory_ratio_to_sgd",
                                                   "achieved_tflops")},
                         fraction_of_bf16_peak=row["achieved_tflops"] / PEAK_BF16_TFLOPS)
                    for row in r.get("train") or []]
    out["pipeline_images_per_s"] = (r.get("pipeline") or {}).get("images_per_s")
    out["eval_images_per_s"] = (r.get("eval") or {}).get("images_per_s")
    out["sync_check"] = r.get("sync_check")
    return out


def run_figures(run_dir):
    summary = _load(os.path.join(run_dir, "summary.json")) or {}
    epochs = []
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            epochs = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        pass
    return dict(status=summary.get("status"), epoch_time_s=[e["epoch_time_s"] for e in epochs],
                test_error=[e["test_error"] for e in epochs], final_test_error=summary.get("final_test_error"),
                images_per_s=summary.get("images_per_s"))


def flatness_figures(rows):
    keys = ("run_dir", "loss", "error", "hessian_top_eigenvalues", "hessian_eig_matvecs", "hessian_eig_time_s",
            "hessian_trace", "hessian_trace_low", "hessian_trace_high", "hessian_trace_time_s", "sam_sharpness", "amp_sharpness",
            "rwp_sharpness")
    return {"runs": [{k: row[k] for k in keys if k in row} for row in rows]}


def item_figures(out, item):
    """The item's figures, read from the file it names (None where it wrote nothing readable)."""
    figures = item.get("figures") or {}
    if "json" in figures:
        data = _load(os.path.join(out, figures["json"]))
        if data is None:
            return None
        extra = {"note": figures["note"]} if "note" in figures else {}
        if isinstance(data, list):
            return flatness_figures(data) | extra
        if "methods" in data:  # bench.py flatness
            return {k: data.get(k) for k in ("model", "parameters", "samples", "batch_size", "methods")} | extra
        return bench_figures(data) | extra
    if "run_dir" in figures:
        return run_figures(os.path.join(out, figures["run_dir"]))
    return figures or None


def collect(out):
    steps = []
    for name in STEPS:
        status = _load(os.path.join(out, "status", f"{name}.json"))
        record = _load(os.path.join(out, f"{name}.json"))
        if status is None:
            state = "not run"
        elif status.get("timed_out"):
            state = "timed out"
        else:
            state = "ok" if status.get("exit_code") == 0 else "failed"
        items = []
        for item in (record or {}).get("items", []):
            items.append({k: item.get(k) for k in ("label", "command", "exit_code", "seconds", "error")}
                         | {"figures": item_figures(out, item)})
        steps.append(dict(step=name, title=TITLES[name], status=state, seconds=(status or {}).get("seconds"),
                          share_s=(status or {}).get("share_s"), exit_code=(status or {}).get("exit_code"),
                          record=None if record is None else f"{name}.json", items=items))
    return steps


def _train_row(r):
    return (f"{_num(r['ms_per_step'], '.1f')} ms/step, {_num(r['images_per_s'], '.0f')} img/s, "
            f"{_num(r['ratio_to_sgd'], '.3f')}× SGD, peak {_num(r['peak_memory_mib'], '.0f')} MiB "
            f"({_num(r['peak_memory_ratio_to_sgd'], '.3f')}× SGD), {_num(r['achieved_tflops'], '.3g')} TFLOP/s "
            f"({100 * r['fraction_of_bf16_peak']:.1f}% of {PEAK_BF16_TFLOPS})")


def _flatness_row(r):
    return (f"λ_max {_num((r.get('hessian_top_eigenvalues') or [None])[0], '.4g')} "
            f"({_num(r.get('hessian_eig_time_s'), '.1f')} s, {r.get('hessian_eig_matvecs')} products), trace "
            f"{_num(r.get('hessian_trace'), '.4g')} [{_num(r.get('hessian_trace_low'), '.4g')}, "
            f"{_num(r.get('hessian_trace_high'), '.4g')}] "
            f"({_num(r.get('hessian_trace_time_s'), '.1f')} s)")


def _item_rows(item):
    """[(what, result)]: the table rows of one item (one per optimizer of a bench.py run)."""
    f, label = item["figures"], item["label"]
    if f is None:
        return [(label, item.get("error") or "no result")]
    if "train" in f:
        rows = [(f"{label} {r['optimizer']}", _train_row(r)) for r in f["train"]]
        if f.get("pipeline_images_per_s"):
            rows.append((f"{label} pipeline", f"{f['pipeline_images_per_s']:.0f} augmented img/s"))
        if f.get("eval_images_per_s"):
            rows.append((f"{label} evaluation", f"{f['eval_images_per_s']:.0f} img/s"))
        if f.get("sync_check"):
            rows.append((f"{label} no host sync", ", ".join(f"{k} {v}" for k, v in f["sync_check"].items())))
        return rows
    if "cpu_workers" in f:
        d = f["device_decode"]
        return [(label, f"CPU, {f['cpu_workers']['workers']} workers: {f['cpu_workers']['images_per_s']:.0f} img/s; "
                        f"on the device: decode {d['decode']:.0f} img/s, decode + crop + resize "
                        f"{d['decode_crop_resize']:.0f} img/s")]
    if "epoch_time_s" in f:
        return [(label, f"{f['status']}: epoch s {', '.join(f'{t:.1f}' for t in f['epoch_time_s'])} (with data and "
                        f"evaluation); test error % {', '.join(_num(e, '.2f') for e in f['test_error'])}")]
    if "methods" in f:
        return [(f"{label} {m}", f"{_num(r['ms'], '.1f')} ms/product ({f['model']}, {f['samples']} images), "
                                 + (f"{_num(r['ratio'], '.2f')}× PyHessian's single batch, " if r.get("ratio") else "")
                                 + f"peak {_num(r['peak_mib'], '.1f')} MiB, difference to graph {r['difference']:.1e}")
                for m, r in f["methods"].items()]
    if "runs" in f:
        rows = [(f"{label} {os.path.basename(r['run_dir'])}", _flatness_row(r)) for r in f["runs"]]
        return rows + ([(f"{label} note", f["note"])] if "note" in f else [])
    return [(label, ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in f.items() if not isinstance(v, (dict, list))))]


def markdown(visit, steps):
    lines = [f"GPU visit: {visit.get('device')} | torch {visit.get('torch')}, torchvision {visit.get('torchvision')}, "
             f"CUDA {visit.get('cuda')} | commit {visit.get('commit')} | {visit.get('date')}",
             f"command: `{visit.get('command')}`", "",
             "| step | item | result | status | s (share) |", "|---|---|---|---|---:|"]
    for s in steps:
        ran = s["exit_code"] is not None
        lines.append(f"| {s['title']} | (the step) | {len(s['items'])} item(s) | **{s['status']}**"
                     + (f" (exit {s['exit_code']}) | {s['seconds']:.1f} ({s['share_s']}) |" if ran else " | – |"))
        for item in s["items"]:
            state = "ok" if item["exit_code"] == 0 else f"failed (exit {item['exit_code']})"
            for k, (what, text) in enumerate(_item_rows(item)):
                text = text.replace("|", "/").replace("\n", " ")
                seconds = _num(item["seconds"], ".1f") if k == 0 else ""
                lines.append(f"| {s['title']} | {what} | {text} | {state} | {seconds} |")
    return "\n".join(lines) + "\n"


def write_report(out):
    """Write results.json and results.md; 0 when every step ran and passed, else 1."""
    from runner.records import write_text
    steps = collect(out)
    env = next(s for s in steps if s["step"] == "env")
    visit = {}
    for item in env["items"]:
        visit.update(item["figures"] or {})
    try:
        with open(os.path.join(out, "command.txt")) as f:
            visit["command"] = " ; ".join(line.strip() for line in f if line.strip())
    except OSError:
        visit["command"] = None
    write_text(os.path.join(out, "results.json"), json.dumps({"visit": visit, "steps": steps}, indent=1) + "\n")
    write_text(os.path.join(out, "results.md"), markdown(visit, steps))
    print(markdown(visit, steps), end="")
    return 0 if all(s["status"] == "ok" for s in steps) else 1
