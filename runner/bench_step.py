"""The measurements of bench.py: the training step per optimizer, the data pipeline, evaluation,
the host-sync check and the profile (bench.py parses the arguments and prints the tables).

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

"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import statistics
import time

from runner.config import UsageError

# Training-set sizes: an epoch's number of optimizer steps (and the pipeline's data when train_size=0).
TRAIN_SIZE = {"cifar10": 50000, "cifar100": 50000, "svhn": 73257, "fashionmnist": 60000, "synthetic": 50000,
              "imagenet": 1281167}  # ILSVRC-2012 training images


# ----------------------------------------------------------------------------- helpers

def device_for(cfg):
    from runner.training import resolve_device
    return resolve_device(cfg)  # as the runner: cuda:0 + cudnn.benchmark, or the CPU


def device_name(device):
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


class OtherCPU:
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
        import data_utils
        from runner.methods import build_regularizers  # the Config's Table A methods, as the Trainer
        self.regularizers = build_regularizers(self.cfg, self.model, self.params,
                                               data_utils.DATASETS[self.cfg.dataset].num_classes, self.autocast)
        self.model.train()

    def step(self, eager=False, marks=None):
        """One optimizer step as the runner makes it (runner.training.make_closure, the runner's
        closure). `eager` calls the module instead of the compiled net; `marks` (a _Marks)
        brackets every closure call."""
        from runner.training import make_closure
        closure = make_closure(self.optimizer, self.model if eager else self.net, self.params, self.batches,
                               autocast=self.autocast, clip_norm=self.cfg.clip_norm, scaler=self.scaler,
                               label_smoothing=self.cfg.label_smoothing, regularizers=self.regularizers)
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
