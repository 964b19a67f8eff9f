"""bench.py flatness: the cost of flatness.py's Hessian-vector product H·v in both modes, and
with --pyhessian side by side with PyHessian's two products on the same model and data.

    python bench.py flatness [--model wrn10_1|small_cnn|...] [--dataset fashionmnist] [--samples 512]
                             [--batch_size 256] [--repeats 5] [--device auto] [--pyhessian]
                             [--json out.json]

On synthetic data of the dataset's shape (timings do not depend on pixel values) and a freshly
initialised model in eval mode, H is the Hessian of the mean cross-entropy over --samples images
in batches of --batch_size (runner.hessian.HessianOperator). `small_cnn` is a 2,178-parameter
BatchNorm CNN for Fashion-MNIST's shape (two 5×5 stride-2 convolutions with 8 channels, average
pool, linear), where per-call overheads show; any other name is a model of `python -m models`.

--pyhessian (needs `pip install pyhessian`, PyHessian 0.1 = amirgholami/PyHessian) adds its
products, called as its eigenvalue/trace routines call them: `pyhessian_batch` =
`hessian(model, criterion, data=(all images, labels))` once, then per product
`utils.hessian_vector_product(gradsH, params, v)` (one graph kept for the whole set: PyHessian's
single-batch mode given the set as one batch); `pyhessian_loader` = `hessian.dataloader_hv_product(v)`
over the same batches (forward, gradient with its graph and backward per batch per product).
criterion = torch.nn.CrossEntropyLoss() (mean), so all four compute the same H·v.

- memory: for each method alone, the peak of tensor memory above what the model and data hold
  while the operator is built and two products are formed (CUDA: torch.cuda.max_memory_allocated;
  CPU: the allocator's events recorded by torch.profiler, `peak_mib`).
- time: --repeats products per method, the methods interleaved product by product (all alive), so
  a change in the machine's speed hits all alike; median ms per product and the ratio to the first
  PyHessian method. CUDA: synchronised.
- agreement: each method's largest relative difference to `graph`'s H·v.

The header gives the load average, since on a shared machine absolute times drift; the ratio
between modes survives load better. Bad arguments: UsageError (bench.py: one line, exit code 2).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
import warnings

from runner.config import Parser, UsageError
from runner.records import save_json

MODES = ("graph", "recompute")
PYHESSIAN = ("pyhessian_batch", "pyhessian_loader")


def _parser():
    p = Parser(prog="bench.py flatness", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--model", default="wrn10_1", help="model name (default wrn10_1)")
    p.add_argument("--dataset", default="fashionmnist", help="shape and classes of the data (default fashionmnist)")
    p.add_argument("--samples", type=int, default=512, help="images in the analysis set (default 512)")
    p.add_argument("--batch_size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--repeats", type=int, default=5, help="timed products per mode (default 5)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda when visible")
    p.add_argument("--pyhessian", action="store_true",
                   help="also time PyHessian's single-batch and data-loader products (pip install pyhessian)")
    p.add_argument("--json", metavar="PATH", help="write the figures to this JSON file")
    return p


@contextlib.contextmanager
def _quiet_c_stderr():
    """File descriptor 2 to /dev/null within the block: the profiler's C++ side (kineto) prints
    profiler_start/profiler_stop lines there at every use."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_mib(fn, device):
    """The peak of tensor memory allocated while fn() runs, above what was allocated before (MiB).
    CUDA: torch.cuda.max_memory_allocated. CPU: the running sum of the allocator's allocation and
    free events recorded by torch.profiler (profile_memory=True), so the figure counts tensors
    only, is exact, and does not depend on what the C allocator keeps from earlier calls."""
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    from torch.profiler import ProfilerActivity, profile
    with _quiet_c_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak / 2 ** 20


def small_cnn(channels, classes):
    """Conv(5×5, stride 2, 8) → BN → ReLU → Conv(5×5, stride 2, 8) → BN → ReLU → avg pool 2×2 → linear
    (2,178 parameters for 1 channel and 10 classes)."""
    from torch import nn
    return nn.Sequential(nn.Conv2d(channels, 8, 5, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 5, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, classes))


def _methods(args):
    methods = MODES + (PYHESSIAN if args.pyhessian else ())
    if args.pyhessian:
        try:
            import pyhessian  # noqa: F401
        except ImportError:
            raise UsageError("PyHessian's products need the PyHessian package: pip install pyhessian") from None
    return methods


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
        torch.manual_seed(0)
        model = (small_cnn(info.channels, info.num_classes) if args.model == "small_cnn" else
                 models.build_model(args.model, info.num_classes, info.channels)).to(device).eval()
    except (KeyError, ValueError) as e:
        raise UsageError(f"--model: {str(e).splitlines()[0]}") from None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, info.channels, info.size, info.size, generator=g)
    y = torch.randint(0, info.num_classes, (args.samples,), generator=g)
    batches = [(x[i:i + args.batch_size].to(device), y[i:i + args.batch_size].to(device))
               for i in range(0, args.samples, args.batch_size)]
    return model, batches, device


@contextlib.contextmanager
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def product(method, model, params, batches):
    """A function flat v → flat H·v (a new operator: the graph methods build theirs here)."""
    import torch
    from runner.hessian import HessianOperator
    if method in MODES:
        H = HessianOperator(model, params, batches, mode=method)
        return lambda v: H @ v
    from pyhessian import hessian
    from pyhessian.utils import hessian_vector_product
    crit, cuda = torch.nn.CrossEntropyLoss(), params[0].is_cuda

    def split(v):
        return [t.view_as(p) for t, p in zip(torch.split(v, [p.numel() for p in params]), params)]

    def flat(hv):
        return torch.cat([t.reshape(-1) for t in hv]).detach()
    if method == "pyhessian_batch":
        x, y = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
        with _no_warnings():                                        # (its backward(create_graph=True) warns)
            H = hessian(model, crit, data=(x, y), cuda=cuda)
        return lambda v: flat(hessian_vector_product(H.gradsH, H.params, split(v)))
    H = hessian(model, crit, dataloader=batches, cuda=cuda)

    def loader(v):
        with _no_warnings():
            return flat(H.dataloader_hv_product(split(v))[1])
    return loader


def measure(model, batches, device, repeats, methods):
    """{method: {ms, peak_mib, difference}}: difference = largest |H·v − graph's H·v| / max |graph's|."""
    import torch
    params = [p for p in model.parameters() if p.requires_grad]
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(1)).to(device)
    out = {}
    for method in methods:                                          # memory: one method at a time
        def build_and_use():
            f = product(method, model, params, batches)
            f(v)
            f(v)
        out[method] = {"peak_mib": peak_mib(build_and_use, device)}
        model.zero_grad(set_to_none=True)                           # (PyHessian leaves graphs in .grad)
    fs = {method: product(method, model, params, batches) for method in methods}
    ref = (fs["graph"] if "graph" in fs else product("graph", model, params, batches))(v)
    for method, f in fs.items():
        out[method]["difference"] = float((f(v) - ref).abs().max() / ref.abs().max())
    times = {method: [] for method in methods}
    for _ in range(repeats):                                        # time: interleaved
        for method, f in fs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            f(v)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[method].append(time.perf_counter() - t0)
    base = next((m for m in PYHESSIAN if m in methods), None)
    for method in methods:
        out[method]["ms"] = 1000 * statistics.median(times[method])
    for method in methods:
        out[method]["ratio"] = out[method]["ms"] / out[base]["ms"] if base else None
    return out


def main(argv) -> dict:
    """Runs the benchmark, prints a Markdown table, returns the figures (UsageError on bad input)."""
    import datetime
    import torch
    args = _parser().parse_args(argv)
    methods = _methods(args)
    model, batches, device = setup(args)
    dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    figures = measure(model, batches, device, args.repeats, methods)
    report = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "load_average_1min": load, "model": args.model, "dataset": args.dataset, "parameters": dim,
              "samples": args.samples, "batch_size": args.batch_size, "repeats": args.repeats,
              "methods": figures}
    print(f"Hessian-vector product, {args.model} ({dim:,} parameters), {args.samples} images in batches of "
          f"{args.batch_size}, {device}, {torch.get_num_threads()} threads, load average {load}, "
          f"{args.repeats} products each, interleaved")
    ratio_to = next((m for m in PYHESSIAN if m in methods), "PyHessian")
    print(f"\n| method | ms / product (median) | ratio to {ratio_to} | peak tensor memory above model + data (MiB) "
          "| largest relative difference to graph |\n|---|---|---|---|---|")
    for method in methods:
        f = figures[method]
        peak = f"{f['peak_mib']:,.1f}"
        ratio = "" if f["ratio"] is None else f"{f['ratio']:.2f}"
        print(f"| {method} | {f['ms']:,.1f} | {ratio} | {peak} | {f['difference']:.1e} |")
    if args.json:
        save_json(args.json, report)
    return report
