"""Throughput of the training step per optimizer, of the data pipeline and of evaluation.

    python bench.py [--optimizers sgd amp rwp sam] [--steps N] [--json out.json] [Config flags ...]

Every flag that is not bench.py's own is a field of main.py's Config (`--model`, `--batch_size`,
`--dataset`, `--precision`, `--channels_last`, `--compile`, `--device`, `--clip_norm`, `--config`,
...), validated exactly as main.py does; the optimizers are built by the runner's `build_optimizer` and
each step calls `optimizer.step(closure)` with the runner's own closure (`runner.training.make_closure`;
with `--precision fp16` its loss scaler too).
Without `--config`, bench.py starts from small CPU defaults (BENCH_DEFAULTS below); with it, the
config file decides and flags still override.

What is measured, on synthetic tensors of the dataset's shape on the device (timings do not
depend on pixel values):

- train: after `--warmup` steps, `--repeats` blocks of `--steps` optimizer steps each; a block's
  time / steps is one ms/step sample and the table gives the median. CPU: wall clock, blocks of one
  step (default), the optimizers interleaved block by block (all models alive) so that a change in
  the machine's speed hits every optimizer alike. CUDA: CUDA events, blocks of 50 steps (one
  synchronisation per block, none inside it), the optimizers one after another, each freed before
  the next. "in passes" is the time inside the closure calls (forward, backward, clip: perf_counter
  or CUDA events around each call), "rest" the optimizer's own work (perturb, restore, base step).
  An RWP step consumes two batches (clean + perturbed, as the runner feeds it), so its images/s
  counts both: images/s = batches/step × batch_size / (s/step). "ratio" is ms/step over SGD's.
  "epoch" is the compute time of one epoch of the dataset's training set (the runner's optimizer
  steps per epoch × ms/step; data pipeline and evaluation excluded). Peak memory (CUDA):
  torch.cuda.max_memory_allocated over one optimizer's build, warm-up and timed steps; on CPU not
  measured (n/a). GFLOP/step: convolution/matmul FLOPs of one eager step (torch.utils.flop_counter,
  counted after all timing), TFLOP/s = that / time.
- pipeline: data_utils.TrainLoader + Augment as the runner builds them from the Config (bench
  default: crop with padding 4 and fill 128, flip, Cutout 'amp' 16) on uint8 data of the dataset's
  shape (`--train_size` samples, 0 = the dataset's training-set size); augmented images/s at
  the training batch size over `--pipeline_batches` batches.
- eval: images/s of the runner's evaluation (normalise, forward in eval mode, loss and errors on
  the device) at `--eval_batch_size` over `--eval_batches` batches.
- `--check_sync`: on CUDA, one steady-state step of each optimizer under
  torch.cuda.set_sync_debug_mode("error"): pass, or fail with the first offending call.
- `--profile ROWS`: torch.profiler over one step of each optimizer, top operators by self time.

The header says how many cores other processes kept busy during each phase (Linux /proc/stat):
on a shared 2-core machine, figures taken while that is well above 0 are not comparable; with two
intra-op threads, tiny operators then slow down many times over (OMP_NUM_THREADS=1 is robust).

Prints Markdown tables; `--json` writes device, torch version, date, the command line, the resolved
Config and every figure. Exit code 2 with one line on stderr for bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import difflib
import json
import os
import platform
import statistics
import sys
import time

from runner.records import output_problem

BENCH_OPTIMIZERS = ("sgd", "amp", "rwp", "sam", "asam")
# Config settings bench.py starts from when no --config is given (small enough for a 2-core CPU;
# Cutout on so that the pipeline runs the standard CIFAR augmentation: crop/4/fill 128, flip, Cutout 16).
BENCH_DEFAULTS = ["--model", "wrn16_2", "--batch_size", "32", "--cutout"]
# Training-set sizes: an epoch's number of optimizer steps (and the pipeline's data when train_size=0).
TRAIN_SIZE = {"cifar10": 50000, "cifar100": 50000, "svhn": 73257, "fashionmnist": 60000, "synthetic": 50000,
              "imagenet": 1281167}  # ILSVRC-2012 training images
QUICK = dict(steps=2, warmup=1, repeats=1, pipeline_batches=2, eval_batches=1)
# Counts per device. CPU: blocks of one step, the optimizers interleaved step by step, so that a
# drift of the machine's speed (other processes, a shared host) hits all alike; median of the
# blocks. CUDA: blocks of many steps (one synchronisation per block, the queue stays full).
DEFAULTS = {"cpu": dict(steps=1, warmup=2, repeats=10, pipeline_batches=50, eval_batches=2),
            "cuda": dict(steps=50, warmup=10, repeats=3, pipeline_batches=200, eval_batches=5)}


class UsageError(Exception):
    """Bad arguments; the message is one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _parser():
    p = _Parser(prog="bench.py", description=__doc__.split("\n")[0], allow_abbrev=False,
                epilog="Any other --flag is a main.py Config field (python main.py --help lists them). "
                       "`python bench.py imagenet_pipeline --help`: the ImageNet file pipeline against the official one; "
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
    from runner.config import UsageError as RunnerUsageError
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
    except RunnerUsageError as e:
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


def check_output(flag, path):
    problem = output_problem(path)
    if problem:
        raise UsageError(f"{flag}: {problem}")


def resolve_counts(args, device_type):
    """Fill the counts not given on the command line: --quick's, else the device's defaults."""
    for k, v in (QUICK if args.quick else DEFAULTS[device_type]).items():
        if getattr(args, k) is None:
            setattr(args, k, v)


# ----------------------------------------------------------------------------- helpers

def _device(cfg):
    from runner.config import UsageError as RunnerUsageError
    from runner.training import resolve_device
    try:
        return resolve_device(cfg)  # as the runner: cuda:0 + cudnn.benchmark, or the CPU
    except RunnerUsageError as e:
        raise UsageError(str(e)) from None


def _device_name(device):
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


class _OtherCPU:
    """Average number of CPU cores that other processes kept busy between start() and stop()
    (Linux /proc/stat minus this process's own CPU time); None where /proc/stat is missing."""

    def start(self):
        self.t0 = self._sample()
        return self

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        except (OSError, ValueError):
            return None
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        own = os.times()
        return busy - own.user - own.system, time.monotonic()

    def stop(self):
        t1 = self._sample()
        if self.t0 is None or t1 is None or t1[1] <= self.t0[1]:
            return None
        return max(0.0, (t1[0] - self.t0[0]) / (t1[1] - self.t0[1]))


class _Timer:
    """Seconds of the enclosed work: wall clock on CPU; CUDA events on GPU (one sync at the end)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.seconds = None

    def __enter__(self):
        import torch
        if self.cuda:
            torch.cuda.synchronize()  # start from an idle queue; not part of the timing
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0
        return False


def _build_model(cfg, device):
    """(model, net) as the runner builds them in one process (seeded, channels_last, compile)."""
    import torch
    import data_utils
    from runner.training import build_net
    torch.manual_seed(cfg.seed)
    model, net, _ = build_net(cfg, data_utils.DATASETS[cfg.dataset], device)
    return model, net


def _augment(cfg):
    import data_utils
    from runner.training import build_augment
    return build_augment(cfg, data_utils.DATASETS[cfg.dataset])


def _steps_per_epoch(cfg):
    n = cfg.train_size or TRAIN_SIZE[cfg.dataset]
    b = cfg.batch_size
    return n // b + (1 if n % b > 1 else 0)  # TrainLoader's count: the runner's steps per epoch


class _Run:
    """One optimizer on its own model, stepping on fixed synthetic batches like the runner's Trainer."""

    def __init__(self, cfg, name, device, batches):
        from runner.scaler import LossScaler
        from runner.training import autocast_for, build_optimizer
        self.cfg = dataclasses.replace(cfg, optimizer=name)
        self.name = name
        self.model, self.net = _build_model(self.cfg, device)
        self.optimizer = build_optimizer(self.cfg, self.model, world_size=1)
        if getattr(self.optimizer, "total_steps", 0) is None:  # γ schedules, as the runner sets it
            self.optimizer.total_steps = self.cfg.epochs * _steps_per_epoch(self.cfg)
        self.batches_per_step = getattr(self.optimizer, "batches_per_step", 1)
        self.batches = batches[:self.batches_per_step]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.autocast = autocast_for(self.cfg, device)
        self.scaler = LossScaler(self.optimizer, self.params) if self.cfg.precision == "fp16" else None
        self.model.train()

    def step(self, eager=False, marks=None):
        """One optimizer step as the runner makes it (runner.training.make_closure, the runner's
        closure). `eager` calls the module instead of the compiled net; `marks` (a _Marks)
        brackets every closure call."""
        from runner.training import make_closure
        closure = make_closure(self.optimizer, self.model if eager else self.net, self.params, self.batches,
                               autocast=self.autocast, clip_norm=self.cfg.clip_norm, scaler=self.scaler)
        return self.optimizer.step(closure if marks is None else marks.wrap(closure))

    def steps(self, n, marks=None):
        for _ in range(n):
            self.step(marks=marks)


class _Marks:
    """Time stamps around each closure call (forward + backward + clip): perf_counter on CPU, CUDA
    events on GPU (recorded asynchronously, read after the block's one synchronisation)."""

    def __init__(self, device):
        self.cuda, self.stamps = device.type == "cuda", []

    def _mark(self):
        import torch
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def wrap(self, closure):
        def timed(*args, **kwargs):
            self.stamps.append(self._mark())
            out = closure(*args, **kwargs)
            self.stamps.append(self._mark())
            return out
        return timed

    def seconds(self):
        """(number of closure calls, their total seconds); call after the block is synchronised."""
        pairs = list(zip(self.stamps[::2], self.stamps[1::2]))
        total = sum(a.elapsed_time(b) / 1000 if self.cuda else b - a for a, b in pairs)
        return len(pairs), total


class _Labels:
    """Names every closure call "bench.closure" in a torch.profiler trace."""

    @staticmethod
    def wrap(closure):
        import torch

        def labelled(*args, **kwargs):
            with torch.profiler.record_function("bench.closure"):
                return closure(*args, **kwargs)
        return labelled


def _synthetic_batches(cfg, device, count):
    """`count` (normalised images, labels) batches of the dataset's shape on the device."""
    import torch
    import data_utils
    info = data_utils.DATASETS[cfg.dataset]
    size = cfg.image_size if cfg.dataset == "imagenet" else info.size  # (imagenet: the crop side)
    g = torch.Generator().manual_seed(cfg.seed)
    out = []
    for _ in range(count):
        x = torch.randn(cfg.batch_size, info.channels, size, size, generator=g).to(device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, torch.randint(0, info.num_classes, (cfg.batch_size,), generator=g).to(device)))
    return out


def add_flops(rows, cfg, device):
    """Convolution/matmul FLOPs of one eager step of each optimizer (all its passes) on a fresh
    model, and the achieved TFLOP/s. Run after every timing: in this process, a FlopCounterMode
    pass was followed by slower steps on CPU."""
    from torch.utils.flop_counter import FlopCounterMode
    batches = _synthetic_batches(cfg, device, 2)
    for row in rows:
        run = _Run(cfg, row["optimizer"], device, batches)
        with FlopCounterMode(display=False) as counter:
            run.step(eager=True)
        row["flop_per_step"] = counter.get_total_flops()
        row["achieved_tflops"] = row["flop_per_step"] / row["ms_per_step"] / 1e9
        del run


# ----------------------------------------------------------------------------- measurements

def bench_train(args, cfg, device):
    import torch
    cuda = device.type == "cuda"
    batches = _synthetic_batches(cfg, device, 2)
    names = list(args.optimizers)
    # CPU: rounds interleave the optimizers (all alive); CUDA: one optimizer at a time (peak memory).
    order = ([(r, n) for r in range(args.repeats) for n in names] if not cuda
             else [(r, n) for n in names for r in range(args.repeats)])
    last_use = {n: max(i for i, (_, m) in enumerate(order) if m == n) for n in names}
    runs, samples, closure_samples, passes, rows = {}, {n: [] for n in names}, {n: [] for n in names}, {}, {}
    for i, (_, name) in enumerate(order):
        if name not in runs:
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            runs[name] = _Run(cfg, name, device, batches)
            runs[name].steps(args.warmup)
        run = runs[name]
        marks = _Marks(device)
        with _Timer(device) as t:
            run.steps(args.steps, marks)
        samples[name].append(1000 * t.seconds / args.steps)
        calls, closure_s = marks.seconds()
        closure_samples[name].append(1000 * closure_s / args.steps)
        passes[name] = calls / args.steps
        if i == last_use[name]:
            peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
            rows[name] = dict(optimizer=name, batches_per_step=run.batches_per_step, peak_memory_mib=peak)
            if cuda:
                del runs[name], run
    runs.clear()
    steps_per_epoch = _steps_per_epoch(cfg)
    out = []
    for name in names:
        row = rows[name]
        ms = statistics.median(samples[name])
        images = row["batches_per_step"] * cfg.batch_size
        # per block: closure calls (forward + backward + clip) and the rest (the optimizer's own work)
        other = [t - c for t, c in zip(samples[name], closure_samples[name])]
        row.update(passes_per_step=passes[name], closure_ms_per_step=statistics.median(closure_samples[name]),
                   other_ms_per_step=statistics.median(other), closure_ms_per_step_samples=closure_samples[name])
        row.update(ms_per_step=ms, ms_per_step_samples=samples[name], steps_per_s=1000 / ms,
                   images_per_step=images, images_per_s=images * 1000 / ms,
                   epoch_s=steps_per_epoch * ms / 1000)
        out.append(row)
    base = next((r for r in out if r["optimizer"] == "sgd"), None)
    for row in out:
        row["ratio_to_sgd"] = row["ms_per_step"] / base["ms_per_step"] if base else None
        # CPU: block r of every optimizer ran in the same round, so the ratio per round pairs them
        row["ratio_to_sgd_paired"] = (statistics.median(
            a / b for a, b in zip(row["ms_per_step_samples"], base["ms_per_step_samples"])) if base else None)
        row["peak_memory_ratio_to_sgd"] = (row["peak_memory_mib"] / base["peak_memory_mib"]
                                           if base and row["peak_memory_mib"] else None)
    return out, steps_per_epoch


def bench_pipeline(args, cfg, device):
    import torch
    import data_utils
    info = data_utils.DATASETS[cfg.dataset]
    n = cfg.train_size or TRAIN_SIZE[cfg.dataset]
    g = torch.Generator().manual_seed(cfg.seed)
    images = torch.randint(0, 256, (n, info.channels, info.size, info.size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, info.num_classes, (n,), generator=g)
    loader = data_utils.TrainLoader(images, labels, cfg.batch_size, _augment(cfg), device=device, seed=cfg.seed)
    if len(loader) == 0:
        raise UsageError(f"train_size: {n} samples make no batch of {cfg.batch_size}")

    def forever():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    it = forever()
    next(it)  # warm-up: first shuffle and kernels
    count = 0
    with _Timer(device) as t:
        for _ in range(args.pipeline_batches):
            x, y = next(it)
            count += len(y)
    return dict(batch_size=cfg.batch_size, batches=args.pipeline_batches, images=count, seconds=t.seconds,
                batches_per_s=args.pipeline_batches / t.seconds, images_per_s=count / t.seconds,
                train_size=n, augment=dict(crop=cfg.augment, crop_padding=cfg.crop_padding, pad_mode=cfg.pad_mode,
                                           pad_fill=cfg.pad_fill, flip=cfg.augment and cfg.flip,
                                           cutout=cfg.cutout, cutout_size=cfg.cutout_size,
                                           cutout_style=cfg.cutout_style))


def bench_eval(args, cfg, device):
    import torch
    import data_utils
    info = data_utils.DATASETS[cfg.dataset]
    model, net = _build_model(cfg, device)
    model.eval()
    from runner.training import autocast_for
    autocast = autocast_for(cfg, device)
    bs = cfg.eval_batch_size
    g = torch.Generator().manual_seed(cfg.seed + 1)
    size = cfg.image_size if cfg.dataset == "imagenet" else info.size
    x_all = torch.randint(0, 256, (bs, info.channels, size, size), generator=g, dtype=torch.uint8).to(device)
    y_all = torch.randint(0, info.num_classes, (bs,), generator=g).to(device)
    aug = _augment(cfg)
    totals = torch.zeros(3, device=device, dtype=torch.float64)

    def one_batch():  # Trainer.evaluate's body for one batch
        for x, y in data_utils.test_batches(x_all, y_all, bs, aug, device=device):
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast if autocast is not None else contextlib.nullcontext():
                out = net(x)
            totals[0] += torch.nn.functional.cross_entropy(out.float(), y, reduction="sum").double()
            totals[1] += (out.argmax(1) != y).sum()
            totals[2] += len(y)

    with torch.no_grad():
        one_batch()  # warm-up
        with _Timer(device) as t:
            for _ in range(args.eval_batches):
                one_batch()
    images = bs * args.eval_batches
    return dict(batch_size=bs, batches=args.eval_batches, images=images, seconds=t.seconds,
                images_per_s=images / t.seconds)


def profile_steps(args, cfg, device):
    """torch.profiler over one step of each optimizer (after 2 warm-up steps): the top operators by
    self time. Closure calls are labelled "bench.closure"; the optimizer's own step shows as
    "Optimizer.step#<class>.step" (its base optimizer's as "Optimizer.step#SGD.step")."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    batches = _synthetic_batches(cfg, device, 2)
    out = {}
    for name in args.optimizers:
        run = _Run(cfg, name, device, batches)
        run.steps(2)
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            run.step(marks=_Labels)
            if cuda:
                torch.cuda.synchronize()
        averages = prof.key_averages()
        events = sorted(averages, key=lambda e: getattr(e, key), reverse=True)
        out[name] = [dict(name=e.key, calls=e.count, self_ms=getattr(e, key) / 1000,
                          total_ms=(e.device_time_total if cuda else e.cpu_time_total) / 1000)
                     for e in events[:args.profile]]
        for label in ("bench.closure", f"Optimizer.step#{type(run.optimizer).__name__}.step",
                      "Optimizer.step#SGD.step"):
            e = next((e for e in averages if e.key == label), None)
            if e is not None and all(r["name"] != label for r in out[name]):
                out[name].append(dict(name=label, calls=e.count, self_ms=getattr(e, key) / 1000,
                                      total_ms=(e.device_time_total if cuda else e.cpu_time_total) / 1000))
        del run
    return out


def check_sync(args, cfg, device):
    """One steady-state step per optimizer under sync debug mode "error" (CUDA only)."""
    import torch
    if device.type != "cuda":
        return {name: "n/a (no CUDA)" for name in args.optimizers}
    batches = _synthetic_batches(cfg, device, 2)
    result = {}
    for name in args.optimizers:
        run = _Run(cfg, name, device, batches)
        run.steps(2)  # state allocated, kernels chosen, compiled if --compile
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run.step()
            result[name] = "pass"
        except RuntimeError as e:
            result[name] = "fail: " + str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        del run
    return result


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
    device = _device(cfg)
    resolve_counts(args, device.type)
    report = dict(
        bench="bench.py", date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        device=_device_name(device), device_type=device.type, torch=torch.__version__,
        cuda=torch.version.cuda, python=platform.python_version(), git_commit=git_commit(),
        command=" ".join(["python", "bench.py", *argv]), argv=list(argv),
        settings={k: getattr(args, k) for k in ("optimizers", "steps", "warmup", "repeats", "pipeline_batches",
                                                 "eval_batches", "quick", "check_sync", "profile")},
        config=dataclasses.asdict(cfg), threads=torch.get_num_threads(), loadavg_start=list(os.getloadavg()),
        memory_note=("torch.cuda.max_memory_allocated over one optimizer's build, warm-up and steps" if
                     device.type == "cuda" else "not measured on CPU"),
    )
    others = {}
    probe = _OtherCPU().start()
    report["train"], report["steps_per_epoch"] = bench_train(args, cfg, device) if args.optimizers else ([], None)
    others["train"], probe = probe.stop(), _OtherCPU().start()
    # (imagenet's pipeline decodes files: `bench.py imagenet_pipeline` times it)
    report["pipeline"] = bench_pipeline(args, cfg, device) if args.pipeline_batches and cfg.dataset != "imagenet" else None
    others["pipeline"], probe = probe.stop(), _OtherCPU().start()
    report["eval"] = bench_eval(args, cfg, device) if args.eval_batches else None
    others["eval"] = probe.stop()
    report["other_cpu_cores"] = others  # cores kept busy by other processes during each phase
    report["sync_check"] = check_sync(args, cfg, device) if args.check_sync else None
    report["profile"] = profile_steps(args, cfg, device) if args.profile and args.optimizers else None
    add_flops(report["train"], cfg, device)
    report["loadavg_end"] = list(os.getloadavg())
    print(tables(report), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return report


# ----------------------------------------------------------------------------- ImageNet pipeline mode

def _folder_parser():
    p = _Parser(prog="bench.py imagenet_pipeline", allow_abbrev=False,
                description="Decoded + augmented images/s per CPU core: our ImageNet pipeline (data_folder.py) "
                            "against the official one (torchvision ImageFolder + PIL transforms), same run.")
    p.add_argument("--images", type=int, default=200, help="JPEGs written (default 200)")
    p.add_argument("--width", type=int, default=500, help="image width (default 500; ImageNet's typical 500x375)")
    p.add_argument("--height", type=int, default=375, help="image height (default 375)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--image_size", type=int, default=224, help="train crop / val crop side (default 224)")
    p.add_argument("--batch_size", type=int, default=50, help="batch size (default 50)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds; medians reported (default 5)")
    p.add_argument("--data_dir", help="an existing ImageFolder (train/, val/) instead of generated JPEGs")
    p.add_argument("--json", metavar="PATH", help="write all figures to this JSON file")
    return p


def _write_jpegs(root, n, width, height, quality, seed=0):
    """n JPEGs (10 classes, train/ and val/ alike) of smooth colour fields with detail and noise: about
    the entropy, hence the decode cost, of photographs at that size (the mean file size is reported)."""
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for split in ("train", "val"):
        for i in range(n):
            folder = os.path.join(root, split, f"n{i % 10:08d}")
            os.makedirs(folder, exist_ok=True)
            f = rng.uniform(5, 40, 3)
            img = np.stack([np.sin(x / f[0] + rng.uniform(0, 6)) * np.cos(y / f[1]) * 80 + 128,
                            (x * y / (f[2] * 400)) % 256, np.hypot(x - width / 2, y - height / 2) % 256], -1)
            img += rng.normal(0, 25, img.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                os.path.join(folder, f"{split}_{i}.JPEG"), quality=quality)


def _official_datasets(root, size):
    """The official script's train and val datasets (nblt/RWP train_rwp_imagenet.py)."""
    from torchvision import datasets, transforms
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    train = datasets.ImageFolder(os.path.join(root, "train"), transforms.Compose([
        transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]))
    val = datasets.ImageFolder(os.path.join(root, "val"), transforms.Compose([
        transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size), transforms.ToTensor(), normalize]))
    return train, val


def _decode_stages(files, size, repeats):
    """Where a training image's time goes, ms per image (best of `repeats` passes over `files`): the
    full JPEG decode (Pillow); the decode at 1/8 DCT scale, which still entropy-decodes the whole file
    (so: the floor of any decoder that reads the file); the crop + resize of ours (torch's uint8
    antialiased kernel) and of the official transform (torchvision resized_crop on a PIL image).
    (The caller passes at most 200 files: they are held decoded.)"""
    import random
    import numpy as np
    from PIL import Image
    import torchvision.transforms.functional as TF
    import data_folder
    decoded = []
    for f in files:
        with Image.open(f) as im:
            decoded.append(im.convert("RGB"))
    boxes = [data_folder.crop_params(im.size[1], im.size[0], random.Random(i)) for i, im in enumerate(decoded)]
    arrays = [np.asarray(im) for im in decoded]

    def decode(scale):
        for f in files:
            with Image.open(f) as im:
                if scale > 1:
                    im.draft(im.mode, (max(1, im.size[0] // scale), max(1, im.size[1] // scale)))
                im.load()

    def ours():
        for a, (top, left, h, w) in zip(arrays, boxes):
            data_folder._resize(a[top:top + h, left:left + w].copy(), size, size)

    def official():
        for im, (top, left, h, w) in zip(decoded, boxes):
            TF.resized_crop(im, top, left, h, w, [size, size])

    stages = {"decode_full": lambda: decode(1), "decode_at_one_eighth": lambda: decode(8),
              "crop_resize_ours": ours, "crop_resize_official": official}
    best = {}
    for name, fn in stages.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best[name] = round(min(times) / len(files) * 1e3, 4)
    return best


def bench_imagenet_pipeline(argv):
    """Per-core rates (one process, one thread, no DataLoader: the work one worker does per batch) of
    ours (decode + crop + resize to uint8 batches; flip and normalisation run on the device) and the
    official pipeline (per-sample PIL decode, transforms, ToTensor, Normalize, default_collate), train
    and val, interleaved round by round (order alternating); then each through a DataLoader with one
    worker, also interleaved (a whole pipeline: worker + transfer to the main process)."""
    import statistics
    import tempfile
    import numpy as np
    import torch
    from torch.utils.data import DataLoader
    import data_folder
    args = _folder_parser().parse_args(argv)
    for k in ("images", "width", "height", "image_size", "batch_size", "repeats"):
        if getattr(args, k) < 1:
            raise UsageError(f"--{k}: {getattr(args, k)} must be >= 1")
    if not 1 <= args.quality <= 100:
        raise UsageError(f"--quality: {args.quality} must be in 1..100")
    if args.json is not None:
        check_output("--json", args.json)
    torch.set_num_threads(1)
    tmp = None
    root = args.data_dir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_imagenet_")
        root = tmp.name
        _write_jpegs(root, args.images, args.width, args.height, args.quality)
    try:
        folder = data_folder.FolderData(root)
        files = [os.path.join(folder.train[0], os.fsdecode(p)) for p in folder.train[1]]
        mean_kb = sum(os.path.getsize(f) for f in files) / len(files) / 1024
        n = len(files)
        order = np.arange(n)
        bs, size = args.batch_size, args.image_size
        batches = [order[i:i + bs] for i in range(0, n, bs)]
        ours = {"train": data_folder._Batches(folder.train[0], folder.train[1], folder.train[2], batches, size,
                                              train=True, replace=True, base=1, flip=True),
                "val": data_folder._Batches(folder.val[0], folder.val[1], folder.val[2],
                                            [np.arange(len(folder.val[1]))[i:i + bs]
                                             for i in range(0, len(folder.val[1]), bs)], size, train=False,
                                            replace=False)}
        official = dict(zip(("train", "val"), _official_datasets(root, size)))
        from torch.utils.data import default_collate

        def counted(batch):  # images built (a run of unreadable files in --data_dir stops the bench)
            data_folder._report(batch[3])
            return len(batch[1])

        def run_ours(split):
            ds = ours[split]
            return sum(counted(ds[b]) for b in range(len(ds)))

        def run_official(split):
            ds, count = official[split], 0
            for i in range(0, len(ds), bs):
                x, y = default_collate([ds[j] for j in range(i, min(i + bs, len(ds)))])
                count += len(y)
            return count

        def loader_ours(split):
            return sum(counted(b) for b in DataLoader(ours[split], batch_size=None, num_workers=1))

        def loader_official(split):
            return sum(len(y) for _, y in DataLoader(official[split], batch_size=bs, num_workers=1))

        sides = {"ours": run_ours, "official": run_official}
        loaders = {"ours": loader_ours, "official": loader_official}
        results = {}
        load_start = list(os.getloadavg())
        for label, fns in (("in_process", sides), ("dataloader_1_worker", loaders)):
            for split in ("train", "val"):
                rates = {k: [] for k in fns}
                for r in range(args.repeats):
                    for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):  # alternate who goes first
                        t0 = time.perf_counter()
                        try:
                            count = fns[name](split)
                        except Exception as e:  # (the official pipeline has no answer to a bad file)
                            if name == "ours":
                                raise
                            raise UsageError(f"--data_dir: the official pipeline (torchvision ImageFolder) cannot "
                                             f"read a file of {root} ({type(e).__name__}: "
                                             f"{str(e).splitlines()[0][:160] if str(e) else ''}); the comparison "
                                             "needs a folder whose images all decode") from None
                        rates[name].append(count / (time.perf_counter() - t0))
                results[f"{label}/{split}"] = {k: statistics.median(v) for k, v in rates.items()} | {
                    "all": rates, "speedup": statistics.median(a / b for a, b in zip(rates["ours"], rates["official"]))}
        stages = _decode_stages(files[:200], size, args.repeats)
        report = dict(bench="bench.py imagenet_pipeline", date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                      command=" ".join(["python", "bench.py", "imagenet_pipeline", *argv]),
                      device=_device_name(torch.device("cpu")), cpus=os.cpu_count(), torch=torch.__version__,
                      pillow=__import__("PIL").__version__, images=n, mean_file_kb=round(mean_kb, 1),
                      image=f"{args.width}x{args.height} q{args.quality}" if args.data_dir is None else args.data_dir,
                      image_size=size, batch_size=bs, repeats=args.repeats, loadavg_start=load_start,
                      loadavg_end=list(os.getloadavg()), results=results, stages_ms=stages)
    finally:
        if tmp is not None:
            tmp.cleanup()
    lines = [f"bench.py imagenet_pipeline: {n} images {report['image']} (mean {mean_kb:.0f} KB), crop {size}, "
             f"batch {bs} | {report['device']} | torch {torch.__version__}, Pillow {report['pillow']} | {report['date']}",
             f"machine load: loadavg {load_start[0]:.2f}→{report['loadavg_end'][0]:.2f}", "",
             "| pipeline | split | ours img/s | official img/s | ours / official |", "|---|---|---:|---:|---:|"]
    for key, r in results.items():
        label, split = key.split("/")
        lines.append(f"| {label.replace('_', ' ')} | {split} | {r['ours']:.0f} | {r['official']:.0f} | {r['speedup']:.2f} |")
    lines.append(f"(median of {args.repeats} interleaved rounds; in process = one core, one thread; "
                 "ours / official = median of the per-round ratios)")
    lines.append("per training image, ms (best of the rounds): " + ", ".join(
        f"{k.replace('_', ' ').replace('one eighth', '1/8 DCT scale')} {v:.3f}" for k, v in stages.items()))
    print("\n".join(lines), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return report


def main_cli(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["flatness"]:                 # the Hessian-vector product (bench_flatness.py)
            import bench_flatness
            return bench_flatness.main_cli(argv[1:])
        if argv[:1] == ["imagenet_pipeline"]:
            bench_imagenet_pipeline(argv[1:])
            return 0
        run(argv)
    except Exception as e:
        from data_utils import DataError
        if not isinstance(e, (UsageError, DataError)):
            raise
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main_cli())
