"""bench.py flatness: the cost of flatness.py's Hessian-vector product H·v in both modes.

    python bench.py flatness [--model wrn10_1] [--dataset fashionmnist] [--samples 512]
                             [--batch_size 256] [--repeats 5] [--device auto] [--json out.json]

On synthetic data of the dataset's shape (timings do not depend on pixel values) and a freshly
initialised model in eval mode, H is the Hessian of the mean cross-entropy over --samples images
in batches of --batch_size (runner.hessian.HessianOperator):

- memory: for each mode alone, the peak memory above what the model and data hold while the
  operator is built and two products are formed (CUDA: torch.cuda.max_memory_allocated; CPU on
  Linux: peak resident set size, VmHWM after resetting it through /proc/self/clear_refs).
- time: --repeats products per mode, the modes interleaved product by product (both alive), so a
  change in the machine's speed hits both alike; median ms per product. CUDA: synchronised.
- agreement: the largest relative difference between the two modes' H·v.

The header gives the load average, since on a shared machine absolute times drift; the ratio
between modes survives load better. Bad arguments: UsageError (bench.py: one line, exit code 2).
"""
from __future__ import annotations

import os
import statistics
import time

from runner.bench_step import Parser, UsageError
from runner.records import save_json

MODES = ("graph", "recompute")


def _parser():
    p = Parser(prog="bench.py flatness", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--model", default="wrn10_1", help="model name (default wrn10_1)")
    p.add_argument("--dataset", default="fashionmnist", help="shape and classes of the data (default fashionmnist)")
    p.add_argument("--samples", type=int, default=512, help="images in the analysis set (default 512)")
    p.add_argument("--batch_size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--repeats", type=int, default=5, help="timed products per mode (default 5)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when visible")
    p.add_argument("--json", metavar="PATH", help="write the figures to this JSON file")
    return p


def _peak_rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _reset_peak(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2 ** 20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                            # VmHWM ← current RSS
        return _peak_rss_mib()
    except OSError:
        return None


def _peak(device, base):
    import torch
    if base is None:
        return None
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 20 - base
    return _peak_rss_mib() - base


def setup(args):
    import torch
    import data_utils
    import models
    if args.dataset not in data_utils.DATASETS:
        raise UsageError(f"--dataset: unknown {args.dataset!r}; valid: {', '.join(sorted(data_utils.DATASETS))}")
    for k in ("samples", "batch_size", "repeats"):
        if getattr(args, k) < 1:
            raise UsageError(f"--{k}: {getattr(args, k)} must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    info = data_utils.DATASETS[args.dataset]
    try:
        model = models.build_model(args.model, info.num_classes, info.channels).to(device).eval()
    except (KeyError, ValueError) as e:
        raise UsageError(f"--model: {str(e).splitlines()[0]}") from None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, info.channels, info.size, info.size, generator=g)
    y = torch.randint(0, info.num_classes, (args.samples,), generator=g)
    batches = [(x[i:i + args.batch_size].to(device), y[i:i + args.batch_size].to(device))
               for i in range(0, args.samples, args.batch_size)]
    return model, batches, device


def measure(model, batches, device, repeats):
    """{mode: {ms, peak_mib}}, the modes' largest relative difference."""
    import gc
    import torch
    from runner.hessian import HessianOperator
    params = [p for p in model.parameters() if p.requires_grad]
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(1)).to(device)
    out = {}
    for mode in MODES:                                              # memory: one mode at a time
        gc.collect()
        base = _reset_peak(device)
        H = HessianOperator(model, params, batches, mode=mode)
        H @ v
        H @ v
        out[mode] = {"peak_mib": _peak(device, base)}
        del H
    ops = {mode: HessianOperator(model, params, batches, mode=mode) for mode in MODES}
    results = {mode: ops[mode] @ v for mode in MODES}
    ref = results["graph"]
    diff = max(float((r - ref).abs().max() / ref.abs().max()) for r in results.values())
    times = {mode: [] for mode in MODES}
    for _ in range(repeats):                                        # time: interleaved
        for mode in MODES:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            ops[mode] @ v
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - t0)
    for mode in MODES:
        out[mode]["ms"] = 1000 * statistics.median(times[mode])
    return out, diff


def main(argv) -> dict:
    """Runs the benchmark, prints a Markdown table, returns the figures (UsageError on bad input)."""
    import datetime
    import torch
    args = _parser().parse_args(argv)
    model, batches, device = setup(args)
    dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    figures, diff = measure(model, batches, device, args.repeats)
    report = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "load_average_1min": load, "model": args.model, "dataset": args.dataset, "parameters": dim,
              "samples": args.samples, "batch_size": args.batch_size, "repeats": args.repeats,
              "max_relative_difference": diff, "modes": figures}
    print(f"Hessian-vector product, {args.model} ({dim:,} parameters), {args.samples} images in batches of "
          f"{args.batch_size}, {device}, {torch.get_num_threads()} threads, load average {load}")
    print("\n| mode | ms / product | peak memory above model + data (MiB) |\n|---|---|---|")
    for mode in MODES:
        f = figures[mode]
        peak = "n/a" if f["peak_mib"] is None else f"{f['peak_mib']:.1f}"
        print(f"| {mode} | {f['ms']:.1f} | {peak} |")
    print(f"\nmodes agree to {diff:.1e} (largest relative difference of H·v)")
    if args.json:
        save_json(args.json, report)
    return report

