"""Throughput of the training step per optimizer, of the data pipeline and of evaluation.

    python bench.py [--optimizers sgd amp rwp sam] [--steps N] [--json out.json] [Config flags ...]

Every flag that is not bench.py's own is a field of main.py's Config (`--model`, `--batch_size`,
`--dataset`, `--precision`, `--channels_last`, `--compile`, `--device`, `--clip_norm`, `--config`,
...), validated exactly as main.py does; the optimizers are built by the runner's `build_optimizer` and
each step calls `optimizer.step(closure)` with the runner's own closure (`runner.training.make_closure`;
with `--precision fp16` its loss scaler too).
Without `--config`, bench.py starts from small CPU defaults (BENCH_DEFAULTS below); with it, the
config file decides and flags still override.

What is measured and how: runner/bench_step.py (train, pipeline, eval, `--check_sync`,
`--profile`), runner/bench_imagenet.py (`bench.py imagenet_pipeline`: the ImageNet file pipeline per
core against the official one) and runner/bench_decode.py (`bench.py jpeg_decode`: JPEG decoding in
CPU workers against on the GPU).

Prints Markdown tables; `--json` writes device, torch version, date, the command line, the resolved
Config and every figure. Exit codes: 0 done; 1 `--json` could not be written (disk full; the file
named, a half-written one removed); 2 bad arguments; each with one line on stderr.
"""
from __future__ import annotations

import dataclasses
import datetime
import difflib
import os
import platform
import sys

from runner.bench_decode import bench_jpeg_decode
from runner.bench_flatness import main as bench_flatness
from runner.bench_imagenet import bench_imagenet_pipeline
from runner.bench_step import (OtherCPU, add_flops, bench_eval, bench_pipeline, bench_train, check_sync, device_for,
                               device_name, profile_steps)
from runner.config import Parser, UsageError
from runner.records import WriteFailed, check_output, save_json

BENCH_OPTIMIZERS = ("sgd", "amp", "rwp", "sam", "asam")
# Config settings bench.py starts from when no --config is given (small enough for a 2-core CPU;
# Cutout on so that the pipeline runs the standard CIFAR augmentation: crop/4/fill 128, flip, Cutout 16).
BENCH_DEFAULTS = ["--model", "wrn16_2", "--batch_size", "32", "--cutout"]
QUICK = dict(steps=2, warmup=1, repeats=1, pipeline_batches=2, eval_batches=1)
# Counts per device. CPU: blocks of one step, the optimizers interleaved step by step, so that a
# drift of the machine's speed (other processes, a shared host) hits all alike; median of the
# blocks. CUDA: blocks of many steps (one synchronisation per block, the queue stays full).
DEFAULTS = {"cpu": dict(steps=1, warmup=2, repeats=10, pipeline_batches=50, eval_batches=2),
            "cuda": dict(steps=50, warmup=10, repeats=3, pipeline_batches=200, eval_batches=5)}
# `python bench.py MODE ...`: the other benchmarks, each with its own flags (MODE --help)
MODES = {"imagenet_pipeline": bench_imagenet_pipeline, "jpeg_decode": bench_jpeg_decode, "flatness": bench_flatness}


def _parser():
    p = Parser(prog="bench.py", description=__doc__.split("\n")[0], allow_abbrev=False,
               epilog="Any other --flag is a main.py Config field (python main.py --help lists them). "
                      "`python bench.py imagenet_pipeline --help`: the ImageNet file pipeline against the official one; "
                      "`python bench.py jpeg_decode --help`: JPEG decoding in CPU workers against on the GPU; "
                      "`python bench.py flatness --help`: flatness.py's Hessian-vector product.")
    p.add_argument("--optimizers", nargs="*", choices=BENCH_OPTIMIZERS, default=["sgd", "amp", "rwp", "sam"],
                   metavar="NAME", help=f"optimizers to time, from {', '.join(BENCH_OPTIMIZERS)} "
                   "(default: sgd amp rwp sam; none = time only the pipeline and evaluation)")
    def default(k):
        return f"default {DEFAULTS['cpu'][k]} on CPU, {DEFAULTS['cuda'][k]} on CUDA"
    p.add_argument("--steps", type=int, help=f"timed optimizer steps per block ({default('steps')})")
    p.add_argument("--warmup", type=int, help=f"untimed steps first ({default('warmup')})")
    p.add_argument("--repeats", type=int, help=f"timed blocks; the median is reported ({default('repeats')})")
    p.add_argument("--pipeline_batches", type=int,
                   help=f"augmented batches timed ({default('pipeline_batches')}; 0 = skip the pipeline)")
    p.add_argument("--eval_batches", type=int,
                   help=f"evaluation batches timed ({default('eval_batches')}; 0 = skip evaluation)")
    p.add_argument("--quick", action="store_true",
                   help="tiny counts for a smoke test: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    p.add_argument("--check_sync", action="store_true",
                   help='CUDA: one step per optimizer under torch.cuda.set_sync_debug_mode("error")')
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="profile one step of each optimizer (torch.profiler) and print its top ROWS operators")
    p.add_argument("--json", metavar="PATH", help="write all figures to this JSON file")
    return p


def parse_args(argv):
    """(bench options, resolved Config). Raises UsageError with a one-line message."""
    from runner.config import parse_config
    args, rest = _parser().parse_known_args(argv)
    if args.quick:
        resolve_counts(args, "cpu")
    for k in ("steps", "repeats"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise UsageError(f"--{k}: {getattr(args, k)} must be >= 1")
    for k in ("warmup", "pipeline_batches", "eval_batches", "profile"):
        if getattr(args, k) is not None and getattr(args, k) < 0:
            raise UsageError(f"--{k}: {getattr(args, k)} must be >= 0")
    if any(a == "--optimizer" or a.startswith("--optimizer=") for a in rest):
        raise UsageError("--optimizer: bench.py takes a list, --optimizers (e.g. --optimizers sgd amp)")
    if len(set(args.optimizers)) != len(args.optimizers):
        raise UsageError(f"--optimizers: {' '.join(args.optimizers)} names one twice")
    if args.json is not None:
        check_output("--json", args.json)
    given_config = any(a == "--config" or a.startswith("--config=") for a in rest)
    try:
        cfg, _ = parse_config(([] if given_config else BENCH_DEFAULTS) + rest)
    except UsageError as e:  # (the runner's wording)
        message = str(e)
        if message.startswith("unrecognized arguments:"):  # the runner's hint knows only Config's flags
            message = _unrecognized(message, [f"--{k}" for k in vars(args)])
        raise UsageError(message.replace("python main.py --help", "python bench.py --help")) from None
    return args, cfg


def _unrecognized(message, own_flags):
    """The runner's "unrecognized arguments: ARGS (did you mean --F?)" with the hint taken over
    bench.py's flags and Config's flags, less --optimizer (bench.py takes --optimizers)."""
    from runner.config import FIELDS
    unknown = message.split(":", 1)[1].split(" (did you mean ")[0].split("; see ")[0].strip()
    flags = own_flags + ["--config"] + [f"--{n}" for n in FIELDS if n != "optimizer"]
    hint = difflib.get_close_matches(unknown.split()[0].split("=")[0], flags, n=1)
    return f"unrecognized arguments: {unknown}" + (f" (did you mean {hint[0]}?)" if hint else
                                                   "; see python bench.py --help")


def resolve_counts(args, device_type):
    """Fill the counts not given on the command line: --quick's, else the device's defaults."""
    for k, v in (QUICK if args.quick else DEFAULTS[device_type]).items():
        if getattr(args, k) is None:
            setattr(args, k, v)


# ----------------------------------------------------------------------------- report

def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def tables(report):
    cfg = report["config"]
    lines = [f"bench.py: {cfg['model']}, {cfg['dataset']}-shaped synthetic data, batch {cfg['batch_size']}, "
             f"{cfg['precision']}" + (", channels_last" if cfg["channels_last"] else "")
             + (", compile" if cfg["compile"] else "") + f" | {report['device']} | torch {report['torch']} | "
             f"{report['date']}",
             f"machine load: loadavg {report['loadavg_start'][0]:.2f}→{report['loadavg_end'][0]:.2f}"
             + "".join(f"; other processes kept {v:.2f} cores busy during {k}"
                       for k, v in report["other_cpu_cores"].items() if v is not None and report[k]), ""]
    if report["train"]:
        lines += ["| optimizer | batches/step | passes/step | ms/step | in passes | rest | images/s | ratio to SGD "
                  "| paired | epoch s (compute) | peak MiB | peak ratio | GFLOP/step | TFLOP/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in report["train"]:
            lines.append(f"| {r['optimizer']} | {r['batches_per_step']} | {r['passes_per_step']:g} | "
                         f"{r['ms_per_step']:.1f} | {r['closure_ms_per_step']:.1f} | {r['other_ms_per_step']:.1f} | "
                         f"{r['images_per_s']:.0f} | {_fmt(r['ratio_to_sgd'], '.3f')} | {_fmt(r['ratio_to_sgd_paired'], '.3f')} | "
                         f"{r['epoch_s']:.1f} | "
                         f"{_fmt(r['peak_memory_mib'], '.0f')} | {_fmt(r['peak_memory_ratio_to_sgd'], '.3f')} | "
                         f"{r['flop_per_step'] / 1e9:.2f} | {r['achieved_tflops']:.3f} |")
        lines.append(f"(median of {report['settings']['repeats']} blocks of {report['settings']['steps']} steps "
                     f"after {report['settings']['warmup']} warm-up; epoch = {report['steps_per_epoch']} steps; "
                     "ms/step = in passes (closure calls: forward, backward, clip) + rest (the optimizer's own "
                     "work: perturb, restore, base step); paired = median over blocks of the ratio to SGD's block "
                     "of the same round; RWP's images/s counts both batches of a step)")
        lines.append("")
    rows = []
    if report["pipeline"]:
        p = report["pipeline"]
        rows.append(f"| pipeline (augmented, train batches) | {p['batch_size']} | {p['batches']} | "
                    f"{p['batches_per_s']:.1f} batches/s | {p['images_per_s']:.0f} |")
    if report["eval"]:
        e = report["eval"]
        rows.append(f"| evaluation (forward, eval mode) | {e['batch_size']} | {e['batches']} | "
                    f"{e['images'] / e['seconds'] / e['batch_size']:.2f} batches/s | {e['images_per_s']:.0f} |")
    if rows:
        lines += ["| stage | batch | batches timed | rate | images/s |", "|---|---:|---:|---:|---:|", *rows, ""]
    if report["sync_check"] is not None:
        lines += ["| optimizer | no host sync in step (sync debug mode \"error\") |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in report["sync_check"].items()] + [""]
    for name, rows in (report["profile"] or {}).items():
        lines += [f"profile of one {name} step (self time; total includes children)", "",
                  "| operator | calls | self ms | total ms |", "|---|---:|---:|---:|"]
        lines += [f"| {r['name']} | {r['calls']} | {r['self_ms']:.2f} | {r['total_ms']:.2f} |" for r in rows] + [""]
    return "\n".join(lines)


def run(argv):
    import torch
    from runner.records import git_commit
    args, cfg = parse_args(argv)
    device = device_for(cfg)
    resolve_counts(args, device.type)
    report = dict(
        bench="bench.py", date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        device=device_name(device), device_type=device.type, torch=torch.__version__,
        cuda=torch.version.cuda, python=platform.python_version(), git_commit=git_commit(),
        command=" ".join(["python", "bench.py", *argv]), argv=list(argv),
        settings={k: getattr(args, k) for k in ("optimizers", "steps", "warmup", "repeats", "pipeline_batches",
                                                 "eval_batches", "quick", "check_sync", "profile")},
        config=dataclasses.asdict(cfg), threads=torch.get_num_threads(), loadavg_start=list(os.getloadavg()),
        memory_note=("torch.cuda.max_memory_allocated over one optimizer's build, warm-up and steps" if
                     device.type == "cuda" else "not measured on CPU"),
    )
    others = {}
    probe = OtherCPU().start()
    report["train"], report["steps_per_epoch"] = bench_train(args, cfg, device) if args.optimizers else ([], None)
    others["train"], probe = probe.stop(), OtherCPU().start()
    # (imagenet's pipeline decodes files: `bench.py imagenet_pipeline` times it)
    report["pipeline"] = bench_pipeline(args, cfg, device) if args.pipeline_batches and cfg.dataset != "imagenet" else None
    others["pipeline"], probe = probe.stop(), OtherCPU().start()
    report["eval"] = bench_eval(args, cfg, device) if args.eval_batches else None
    others["eval"] = probe.stop()
    report["other_cpu_cores"] = others  # cores kept busy by other processes during each phase
    report["sync_check"] = check_sync(args, cfg, device) if args.check_sync else None
    report["profile"] = profile_steps(args, cfg, device) if args.profile and args.optimizers else None
    add_flops(report["train"], cfg, device)
    report["loadavg_end"] = list(os.getloadavg())
    print(tables(report), flush=True)
    if args.json:
        save_json(args.json, report)
    return report


def main_cli(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] and argv[0] in MODES:
            MODES[argv[0]](argv[1:])
            return 0
        run(argv)
    except WriteFailed as e:  # --json on a full disk
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        from data_utils import DataError
        if not isinstance(e, (UsageError, DataError)):
            raise
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main_cli())
