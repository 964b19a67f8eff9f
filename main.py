"""Train a model with SGD, AMP, RWP, SAM or ASAM and log its test error next to the paper's.

    python main.py [--config configs/x.yaml] [--flag value ...]

Settings come from one dataclass, `Config`: defaults in code → YAML file → command-line flags,
each layer overriding the one before. Every run writes `runs/<name>/` (see README.md).

Exit codes: 0 done; 1 runtime failure (loss became NaN/inf, crash); 2 invalid input (flag, config,
value, path, missing data) with one line on stderr; 130/143 stopped by SIGINT/SIGTERM.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import signal
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field

EXIT_RUNTIME, EXIT_USAGE = 1, 2


@dataclass
class Config:
    # data
    dataset: str = "cifar10"          # cifar10 | cifar100 | svhn | fashionmnist | synthetic
    data_dir: str = "data"            # dataset folder (Fashion-MNIST also: flat idx files)
    download: bool = False            # let torchvision download the dataset
    train_size: int = 0               # use only the first N training samples (0 = all)
    test_size: int = 0                # use only the first N test samples (0 = all)
    augment: bool = True              # random crop with padding + horizontal flip
    crop_padding: int = 4             # pixels of padding before the random crop
    pad_mode: str = "constant"        # constant | reflect
    pad_fill: int = 128               # 0..255 fill value of constant padding (128 = grey, AMP code)
    flip: bool = True                 # horizontal flip (when augment)
    cutout: bool = False              # one Cutout hole per image
    cutout_size: int = 16             # side of the hole, pixels
    cutout_prob: float = 1.0          # probability of a hole per image
    cutout_style: str = "amp"         # amp: black before normalising | rwp: zero after normalising
    autoaugment: bool = False         # torchvision's AutoAugment policy for the dataset
    mean: list = field(default_factory=list)  # per-channel mean in [0,1] (empty = dataset's)
    std: list = field(default_factory=list)   # per-channel std in [0,1] (empty = dataset's)
    # model
    model: str = "preactresnet18"     # name in the models registry (python -m models)
    dropout: float = 0.0              # dropout probability where the model has dropout
    # optimisation
    optimizer: str = "amp"            # sgd | amp | rwp | sam | asam
    epochs: int = 200                 # training epochs
    batch_size: int = 50              # mini-batch size (per branch for RWP, per process under torchrun)
    lr: float = 0.1                   # base learning rate
    momentum: float = 0.9             # SGD momentum
    nesterov: bool = True             # Nesterov momentum
    weight_decay: float = 1e-4        # L2 penalty, applied in the base step only
    schedule: str = "step"            # step (×lr_decay at milestones) | cosine
    milestones: list = field(default_factory=lambda: [100, 150])  # epochs of the step schedule
    lr_decay: float = 0.1             # factor of the step schedule
    lr_updates_per_epoch: int = 1     # how often within an epoch the LR changes (1 = at epoch ends)
    clip_norm: float = 50.0           # clip the gradient to this global norm in every pass (0 = off)
    # AMP
    epsilon: float = 0.5              # radius of the perturbation ball
    inner_lr: float = 1.0             # ascent step size ζ
    inner_iter: int = 1               # ascent steps N
    amp_ball: str = "tensor"          # tensor (one ball per parameter tensor, official) | global
    # RWP
    gamma: float = 0.01               # noise scale relative to the filter norm
    alpha: float = 0.5                # weight of the perturbed gradient
    arwp: bool = False                # ARWP noise shaping by a per-filter gradient-square accumulator
    arwp_eta: float = 0.1             # η of ARWP
    arwp_beta: float = 0.99           # β of ARWP's accumulator
    gamma_final: typing.Optional[float] = None  # cosine schedule of γ to this value (None = constant)
    # SAM / ASAM
    rho: float = 0.05                 # perturbation radius
    adaptive_eta: float = 0.01        # η of ASAM's T = |w| + η
    bn_update: str = "auto"           # BN running stats: auto (the paper's) | all passes | clean pass
    # runtime
    seed: int = 0                     # seeds init, shuffling, augmentation, noise
    device: str = "auto"              # auto | cpu | cuda
    precision: str = "fp32"           # fp32 | bf16 (autocast) | fp16 (refused: needs loss scaling)
    channels_last: bool = False       # NHWC memory layout (faster convolutions on GPU)
    compile: bool = False             # torch.compile the model
    workers: int = 4                  # CPU workers for AutoAugment
    eval_every: int = 1               # evaluate every k epochs (and after the last)
    eval_batch_size: int = 1000       # test batch size
    out_dir: str = "runs"             # parent folder of run folders
    name: str = ""                    # run folder name ('' = dataset_model_optimizer_sSEED)
    resume: str = ""                  # run folder to continue
    # the paper's number this config reproduces (for the log and report.py)
    paper_ref: str = ""               # "source, table, row"
    paper_error: typing.Optional[float] = None   # % test error
    paper_spread: typing.Optional[float] = None  # ± of the paper's number


CHOICES = {
    "dataset": ("cifar10", "cifar100", "svhn", "fashionmnist", "synthetic"),
    "pad_mode": ("constant", "reflect"),
    "cutout_style": ("amp", "rwp"),
    "optimizer": ("sgd", "amp", "rwp", "sam", "asam"),
    "schedule": ("step", "cosine"),
    "amp_ball": ("tensor", "global"),
    "bn_update": ("auto", "all", "clean"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("fp32", "bf16", "fp16"),
}
# (field, low, high, low inclusive): numeric ranges; None = unbounded.
RANGES = [
    ("epochs", 1, None, True), ("batch_size", 1, None, True), ("lr", 0, None, False),
    ("momentum", 0, 1, True), ("weight_decay", 0, None, True), ("lr_decay", 0, None, False),
    ("lr_updates_per_epoch", 1, None, True), ("clip_norm", 0, None, True),
    ("train_size", 0, None, True), ("test_size", 0, None, True), ("crop_padding", 0, None, True),
    ("pad_fill", 0, 255, True), ("cutout_size", 1, None, True), ("cutout_prob", 0, 1, True),
    ("dropout", 0, 1, True), ("epsilon", 0, None, True), ("inner_lr", 0, None, True),
    ("inner_iter", 0, None, True), ("gamma", 0, None, True), ("alpha", 0, 1, True),
    ("arwp_eta", 0, None, True), ("arwp_beta", 0, 1, True), ("gamma_final", 0, None, True),
    ("rho", 0, None, True), ("adaptive_eta", 0, None, True), ("workers", 0, None, True),
    ("eval_every", 1, None, True), ("eval_batch_size", 1, None, True), ("seed", 0, None, True),
]
FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# Fields that may differ when resuming a run: they do not change its results.
RESUME_MAY_CHANGE = {"device", "workers", "resume", "eval_batch_size", "compile", "channels_last"}


class UsageError(Exception):
    """Invalid input; the message is one line naming the problem and the valid choices."""


class Diverged(Exception):
    """The training loss became NaN or inf."""


# ----------------------------------------------------------------------------- config

def _kind(name):
    """'bool' | 'int' | 'float' | 'str' | 'list' | 'optfloat' for a Config field."""
    t = str(FIELDS[name].type)
    return {"bool": "bool", "int": "int", "float": "float", "str": "str", "list": "list"}.get(
        t, "optfloat" if "float" in t else t)


def _coerce(name, value):
    """Type-check a YAML value for field `name`; ints are accepted where floats are."""
    kind = _kind(name)
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "optfloat": value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)),
        "str": isinstance(value, str),
        "list": isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
    }[kind]
    if not ok:
        want = {"optfloat": "a number or null", "list": "a list of numbers"}.get(kind, f"a {kind}")
        raise UsageError(f"{name}: expected {want}, got {value!r}")
    if kind in ("float",) or (kind == "optfloat" and value is not None):
        return float(value)
    return value


def _validate(cfg: Config):
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise UsageError(f"{name}: invalid choice {getattr(cfg, name)!r} (choose from {', '.join(allowed)})")
    for name, low, high, low_inclusive in RANGES:
        v = getattr(cfg, name)
        if v is None:
            continue
        bad = (low is not None and (v < low if low_inclusive else v <= low)) or (high is not None and v > high)
        if bad or (isinstance(v, float) and not math.isfinite(v)):
            lo = f"{'≥' if low_inclusive else '>'} {low}"
            raise UsageError(f"{name}: {v} is out of range (must be {lo}" + (f" and ≤ {high})" if high is not None else ")"))
    if any(m < 0 for m in cfg.milestones) or cfg.milestones != sorted(cfg.milestones):
        raise UsageError(f"milestones: {cfg.milestones} must be non-negative epochs in increasing order")
    from data_utils import DATASETS
    channels = DATASETS[cfg.dataset].channels
    for name in ("mean", "std"):
        v = getattr(cfg, name)
        if v and len(v) != channels:
            raise UsageError(f"{name}: {cfg.dataset} has {channels} channel(s), got {len(v)} values")
    if cfg.std and min(cfg.std) <= 0:
        raise UsageError(f"std: values must be > 0, got {cfg.std}")
    import models
    import torch
    try:  # on the meta device: checks name and arguments without allocating anything
        with torch.device("meta"):
            models.build_model(cfg.model, DATASETS[cfg.dataset].num_classes, channels, dropout=cfg.dropout)
    except ValueError as e:
        raise UsageError(f"model: {e}") from None
    if cfg.precision == "fp16":
        raise UsageError("precision: fp16 needs loss scaling, which this runner does not implement "
                         "(two-pass optimizers break GradScaler); use --precision bf16")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.optimizer == "rwp" and world > 1 and world % 2 and not cfg.arwp:
        raise UsageError(f"torchrun: parallel RWP splits ranks into clean and perturbed halves and needs an "
                         f"even number of processes, got {world}; use --nproc_per_node {world - 1} or {world + 1}")
    if cfg.name and (os.sep in cfg.name or cfg.name in (".", "..")):
        raise UsageError(f"name: {cfg.name!r} must be a plain folder name")


def _load_yaml(path):
    import yaml
    if not os.path.isfile(path):
        raise UsageError(f"config: file {path!r} does not exist")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UsageError(f"config: {path} is not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config: {path} must be a mapping of Config fields, got {type(data).__name__}")
    for key in data:
        if key not in FIELDS or key in ("resume",):
            hint = difflib.get_close_matches(str(key), FIELDS, n=1)
            raise UsageError(f"config: unknown key {key!r} in {path}"
                             + (f" (did you mean {hint[0]!r}?)" if hint else "") + "; see README 'Configuration'")
    return data


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        if "unrecognized arguments" in message:
            flag = message.split(":", 1)[1].split()[0]
            hint = difflib.get_close_matches(flag.split("=")[0], [f"--{n}" for n in FIELDS], n=1)
            message += f" (did you mean {hint[0]}?)" if hint else "; see python main.py --help"
        raise UsageError(message)


def _parser():
    p = _Parser(prog="main.py", description=__doc__.split("\n")[0], allow_abbrev=False,
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML file of Config fields (overrides the defaults)")
    for name, f in FIELDS.items():
        kind = _kind(name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(dest=name, default=argparse.SUPPRESS, help=f"(default: {default})")
        if kind == "bool":
            p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, **kw)
        elif kind == "list":
            p.add_argument(f"--{name}", type=float if name in ("mean", "std") else int, nargs="*", **kw)
        elif kind == "optfloat":
            p.add_argument(f"--{name}", type=float, metavar="FLOAT", **kw)
        else:
            p.add_argument(f"--{name}", type={"int": int, "float": float, "str": str}[kind],
                           choices=CHOICES.get(name), **kw)
    return p


def parse_config(argv):
    """defaults → --config YAML → flags. Returns (Config, names set explicitly by YAML or flags)."""
    args = vars(_parser().parse_args(argv))
    values = {}
    if args.get("config"):
        values.update({k: _coerce(k, v) for k, v in _load_yaml(args.pop("config")).items()})
    args.pop("config", None)
    values.update(args)
    cfg = Config(**values)
    _validate(cfg)
    return cfg, set(values)


# ----------------------------------------------------------------------------- building blocks

def build_optimizer(cfg: Config, model, world_size: int, no_sync=None):
    """The optimizer named by cfg; perturbation optimizers wrap SGD with cfg's base settings.
    `model` is the unwrapped module (BN buffers); `no_sync` the DDP wrapper's no_sync, if any."""
    import torch
    base = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                weight_decay=cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    bn = {} if cfg.bn_update == "auto" else {"bn_update": cfg.bn_update}
    try:
        return _make_optimizer(cfg, model, world_size, params, base, bn, no_sync)
    except ValueError as e:  # the optimizers' argument checks
        raise UsageError(str(e).splitlines()[0]) from None


def _make_optimizer(cfg, model, world_size, params, base, bn, no_sync):
    import torch
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, **base)
    if cfg.optimizer == "amp":
        from amp import AMP
        return AMP(params, epsilon=cfg.epsilon, inner_lr=cfg.inner_lr, inner_iter=cfg.inner_iter,
                   base_optimizer=torch.optim.SGD, ball=cfg.amp_ball, model=model, **bn, **base)
    if cfg.optimizer == "rwp":
        from rwp import RWP
        return RWP(params, gamma=cfg.gamma, alpha=cfg.alpha, base_optimizer=torch.optim.SGD,
                   model=model, seed=cfg.seed, two_batches=True, parallel=world_size > 1 and not cfg.arwp,
                   arwp=cfg.arwp, arwp_eta=cfg.arwp_eta, arwp_beta=cfg.arwp_beta,
                   gamma_final=cfg.gamma_final, **bn, **base)
    from sam import SAM
    return SAM(params, rho=cfg.rho, base_optimizer=torch.optim.SGD, adaptive=cfg.optimizer == "asam",
               eta=cfg.adaptive_eta, model=model, no_sync=no_sync, **bn, **base)


def lr_factor(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """LR multiplier after `step` optimizer steps; changes lr_updates_per_epoch times an epoch."""
    k = cfg.lr_updates_per_epoch
    epoch = math.floor(step * k / steps_per_epoch) / k  # fractional epoch, quantised
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(epoch, cfg.epochs) / cfg.epochs))
    return cfg.lr_decay ** sum(epoch >= m for m in cfg.milestones)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=os.path.dirname(os.path.abspath(__file__)),
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + (" (modified)" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def atomic_write(path: str, write):
    """write(file) to a temporary file, fsync, then rename over `path`: readers (and a resume after
    a crash or SIGKILL at any moment) see the old file or the new one, never a half-written one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str):
    atomic_write(path, lambda f: f.write(text.encode()))


def make_run_dir(cfg: Config) -> str:
    """Create a new run folder; never reuse one (name, name-1, name-2, ... — atomic mkdir)."""
    base = cfg.name or f"{cfg.dataset}_{cfg.model}_{cfg.optimizer}_s{cfg.seed}"
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"out_dir: cannot create {cfg.out_dir!r} ({e.strerror})") from None
    if not os.access(cfg.out_dir, os.W_OK):
        raise UsageError(f"out_dir: {cfg.out_dir!r} is not writable; choose another with --out_dir")
    for i in range(1000):
        path = os.path.join(cfg.out_dir, base if i == 0 else f"{base}-{i}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise UsageError(f"out_dir: cannot create {path!r} ({e.strerror})") from None
    raise UsageError(f"name: too many runs named {base!r} in {cfg.out_dir!r}")


def load_checkpoint(path: str):
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or not a plain-data checkpoint
        raise UsageError(f"resume: cannot load {path} ({type(e).__name__}); it is corrupt or not ours") from None


def resume_config(cfg: Config, explicit: set):
    """The saved Config of run folder cfg.resume; explicit settings must agree with it."""
    run_dir = cfg.resume
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isdir(run_dir):
        raise UsageError(f"resume: {run_dir!r} is not a run folder")
    if not os.path.isfile(ckpt_path):
        raise UsageError(f"resume: {run_dir!r} has no checkpoint.pt (nothing to resume; start a new run)")
    ckpt = load_checkpoint(ckpt_path)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "epoch" not in ckpt:
        raise UsageError(f"resume: {ckpt_path} is not a checkpoint of this runner")
    saved = Config(**{k: v for k, v in ckpt["config"].items() if k in FIELDS})
    for name in sorted(explicit - RESUME_MAY_CHANGE):
        if getattr(saved, name) != getattr(cfg, name):
            raise UsageError(f"resume: {run_dir} was run with {name}={getattr(saved, name)!r}, not "
                             f"{getattr(cfg, name)!r}; drop that setting or start a new run")
    for name in RESUME_MAY_CHANGE & explicit:
        setattr(saved, name, getattr(cfg, name))
    saved.resume = run_dir
    return saved, ckpt, run_dir


# ----------------------------------------------------------------------------- training

class Trainer:
    """Data, model, optimizer and the one training loop for every optimizer."""

    def __init__(self, cfg: Config, run_dir: str, ckpt=None):
        import torch
        import torch.distributed as dist
        import data_utils
        import models
        self.cfg, self.run_dir, self.torch = cfg, run_dir, torch
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("device: cuda requested but no CUDA GPU is visible; use --device cpu")
        cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        torch.manual_seed(cfg.seed)

        # data
        info = data_utils.DATASETS[cfg.dataset]
        self.info = info
        xtr, ytr = data_utils.load_dataset(cfg.dataset, cfg.data_dir, True, cfg.download, cfg.train_size, cfg.seed)
        xte, yte = data_utils.load_dataset(cfg.dataset, cfg.data_dir, False, cfg.download, cfg.test_size, cfg.seed)
        mean, std = tuple(cfg.mean) or info.mean, tuple(cfg.std) or info.std
        self.aug = data_utils.Augment(
            mean, std, crop=cfg.augment, padding=cfg.crop_padding, pad_mode=cfg.pad_mode,
            fill=cfg.pad_fill, flip=cfg.augment and cfg.flip,
            cutout_size=cfg.cutout_size if cfg.cutout else 0, cutout_prob=cfg.cutout_prob,
            cutout_style=cfg.cutout_style)
        self.test_x, self.test_y = xte.to(self.device), yte.to(self.device)

        # model
        self.model = models.build_model(cfg.model, info.num_classes, info.channels, dropout=cfg.dropout).to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.net = DDP(self.model, device_ids=[self.device.index] if cuda else None)
        no_sync = getattr(self.net, "no_sync", None)  # SAM's first pass skips the all-reduce
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.optimizer = build_optimizer(cfg, self.model, self.world, no_sync)
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # clipped in the closure

        # one loader per batch a step consumes; under torchrun, ranks split into groups
        per_step = getattr(self.optimizer, "batches_per_step", 1)
        group, groups = getattr(self.optimizer, "rank_group", (0, 1))
        if self.world % groups:
            raise UsageError(f"torchrun: {cfg.optimizer} needs a world size divisible by {groups}, got {self.world}")
        policy = data_utils.autoaugment_policy(cfg.dataset, cfg.pad_fill, info.channels) if cfg.autoaugment else None
        self.loaders = [data_utils.TrainLoader(
            xtr, ytr, cfg.batch_size, self.aug, device=self.device, seed=cfg.seed,
            stream=group * per_step + i, shard=self.rank // groups, num_shards=self.world // groups,
            autoaugment=policy, workers=cfg.workers) for i in range(per_step)]
        self.steps_per_epoch = len(self.loaders[0])
        if self.steps_per_epoch == 0:
            raise UsageError(f"train_size: {self.loaders[0].num_samples} training sample(s) per process make "
                             f"no batch of 2 or more; use more data")
        if hasattr(self.optimizer, "total_steps"):  # step-indexed schedules inside the optimizer
            self.optimizer.total_steps = cfg.epochs * self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(cfg, s, self.steps_per_epoch))
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if cfg.precision == "bf16" else None)
        self.start_epoch, self.history = 0, []
        if ckpt is not None:
            self._restore(ckpt)

    # -- checkpoints
    def _rng_state(self):
        torch = self.torch
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def state(self, epoch):
        return {"format": "flat-minima-runner/1", "epoch": epoch, "config": dataclasses.asdict(self.cfg),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": self._rng_state(),
                "history": self.history}

    def _restore(self, ckpt):
        torch = self.torch
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise UsageError(f"resume: checkpoint does not fit this model/optimizer ({str(e).splitlines()[0]})") from None
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if "cuda" in ckpt["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        self.start_epoch, self.history = ckpt["epoch"], list(ckpt["history"])

    def save_checkpoint(self, epoch):
        state = self.state(epoch)
        atomic_write(os.path.join(self.run_dir, "checkpoint.pt"), lambda f: self.torch.save(state, f))

    # -- one epoch
    def closure_for(self, batches):
        torch, model, cfg, params = self.torch, self.net, self.cfg, self.params

        def closure(batch=0, loss_weight=1.0):
            self.optimizer.zero_grad(set_to_none=True)
            x, y = batches[batch]
            if self.autocast is not None:
                with self.autocast:
                    outputs = model(x)
                    loss = torch.nn.functional.cross_entropy(outputs, y)
            else:
                outputs = model(x)
                loss = torch.nn.functional.cross_entropy(outputs, y)
            (loss * loss_weight if loss_weight != 1.0 else loss).backward()
            if cfg.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm, foreach=True)
            return outputs, loss.detach()
        return closure

    def train_epoch(self, epoch, progress):
        torch = self.torch
        self.model.train()
        for loader in self.loaders:
            loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        wrong = torch.zeros((), device=self.device, dtype=torch.int64)
        bad_step = torch.full((), -1, device=self.device, dtype=torch.int64)  # first non-finite step
        seen, images = 0, 0
        for step, batches in enumerate(zip(*self.loaders)):
            batches = [(x.contiguous(memory_format=torch.channels_last), y) if self.cfg.channels_last else (x, y)
                       for x, y in batches]
            outputs, loss = self.optimizer.step(self.closure_for(batches))
            self.scheduler.step()
            y = batches[0][1]
            loss_sum += loss.double() * len(y)
            wrong += (outputs.argmax(1) != y).sum()
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step, bad_step)
            seen += len(y)
            images += sum(len(b[1]) for b in batches)
            progress.update(1)
            if (step + 1) % 50 == 0:  # one host sync per log interval
                if bad_step.item() >= 0:
                    raise Diverged(f"loss became non-finite at epoch {epoch + 1}, step {bad_step.item() + 1}")
                progress.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", refresh=False)
            if STOP.requested:
                return None
        if bad_step.item() >= 0:
            raise Diverged(f"loss became non-finite at epoch {epoch + 1}, step {bad_step.item() + 1}")
        # Train metrics come from clean passes (at θ); ranks whose step returns the perturbed pass
        # (parallel RWP's odd ranks) count only if no rank has a clean pass (ARWP: α = 1).
        clean = float(getattr(self.optimizer, "returns_clean", True))
        mine = torch.stack([loss_sum, wrong.double(), torch.tensor(float(seen), device=self.device, dtype=torch.float64)])
        totals = torch.cat([mine * clean, mine])
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(totals)
        totals = totals.tolist()
        loss_total, wrong_total, n = totals[:3] if totals[2] > 0 else totals[3:]
        return loss_total / n, 100.0 * wrong_total / n, images * self.world

    def evaluate(self):
        torch = self.torch
        import data_utils
        if self.world > 1:  # every rank evaluates rank 0's BN statistics
            import torch.distributed as dist
            for b in self.model.buffers():
                dist.broadcast(b, 0)
        self.model.eval()
        totals = torch.zeros(3, device=self.device, dtype=torch.float64)
        with torch.no_grad():
            for x, y in data_utils.test_batches(self.test_x, self.test_y, self.cfg.eval_batch_size, self.aug,
                                                device=self.device, shard=self.rank, num_shards=self.world):
                if self.cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                if self.autocast is not None:
                    with self.autocast:
                        out = self.net(x)
                else:
                    out = self.net(x)
                totals[0] += torch.nn.functional.cross_entropy(out.float(), y, reduction="sum").double()
                totals[1] += (out.argmax(1) != y).sum()
                totals[2] += len(y)
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(totals)
        loss, wrong, n = totals.tolist()
        return loss / n, 100.0 * wrong / n


class _Stop:
    """SIGINT/SIGTERM set `requested`; the loop stops at the next step and keeps the last checkpoint."""
    requested = 0

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = signum


STOP = _Stop()


def train(cfg: Config, explicit: set, argv) -> int:
    import torch
    from tqdm import tqdm
    ckpt = None
    if cfg.resume:
        cfg, ckpt, run_dir = resume_config(cfg, explicit)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out_existed = os.path.isdir(cfg.out_dir)
    if world > 1:
        run_dir = run_dir if cfg.resume else None
    else:
        run_dir = cfg.resume or make_run_dir(cfg)
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir or "", ckpt)
        if world > 1:  # rank 0 creates the folder, everyone learns its name
            import torch.distributed as dist
            box = [run_dir or (make_run_dir(cfg) if rank0 else None)]
            dist.broadcast_object_list(box, 0)
            run_dir = trainer.run_dir = box[0]
    except BaseException:
        if not cfg.resume and run_dir and rank0 and not os.listdir(run_dir):
            os.rmdir(run_dir)  # nothing written: leave nothing behind
            if not out_existed and not os.listdir(cfg.out_dir):
                os.rmdir(cfg.out_dir)
        raise
    log = RunLog(run_dir, rank0)
    if not cfg.resume and rank0:
        import yaml
        write_text(os.path.join(run_dir, "config.yaml"), yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        write_text(os.path.join(run_dir, "command.txt"), " ".join(["python", "main.py", *argv]) + "\n")
        write_text(os.path.join(run_dir, "git_commit.txt"), git_commit() + "\n")
    if rank0:  # metrics.jsonl = history of the checkpoint (drops rows of an epoch that was not saved)
        write_text(os.path.join(run_dir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in trainer.history))
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log.line(("resumed" if cfg.resume else "started") + f" {run_dir}: {cfg.dataset} {cfg.model} "
             f"({n_params:,} params) {cfg.optimizer} on {trainer.device}"
             + (f" ×{world} ranks" if world > 1 else "") + f", {cfg.epochs} epochs from epoch {trainer.start_epoch + 1}")
    STOP.install()
    status, message, code = "completed", "", 0
    t_start = time.time()
    train_time = sum(r["epoch_time_s"] for r in trainer.history)
    images_total = sum(r.get("images", 0) for r in trainer.history)
    progress = tqdm(total=trainer.steps_per_epoch * (cfg.epochs - trainer.start_epoch), disable=not rank0 or None,
                    leave=False, dynamic_ncols=True, desc="train")
    try:
        for epoch in range(trainer.start_epoch, cfg.epochs):
            t0 = time.time()
            lr = trainer.optimizer.param_groups[0]["lr"]
            result = trainer.train_epoch(epoch, progress)
            if result is None:
                break
            train_loss, train_error, images = result
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            epoch_time = time.time() - t0
            test_loss = test_error = None
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                test_loss, test_error = trainer.evaluate()
            row = {"epoch": epoch + 1, "train_loss": train_loss, "train_error": train_error,
                   "test_loss": test_loss, "test_error": test_error, "lr": lr,
                   "epoch_time_s": round(epoch_time, 3), "images": images}
            trainer.history.append(row)
            if rank0:
                trainer.save_checkpoint(epoch + 1)
                log.metrics(row)
            test = f"test loss {test_loss:.4f} err {test_error:.2f}%" if test_error is not None else "test -"
            log.line(f"epoch {epoch + 1}/{cfg.epochs}  train loss {train_loss:.4f} err {train_error:.2f}%  "
                     f"{test}  lr {lr:.4g}  {epoch_time:.1f}s")
            train_time += epoch_time
            images_total += images
            if STOP.requested:
                break
        if STOP.requested:
            status, code = "interrupted", 128 + STOP.requested
            message = f"stopped by signal {STOP.requested} after epoch {len(trainer.history)}; resume with --resume {run_dir}"
    except Diverged as e:
        status, message, code = "diverged", f"{e}; last good checkpoint: epoch {len(trainer.history)}", EXIT_RUNTIME
    except KeyboardInterrupt:
        status, code = "interrupted", 130
        message = f"interrupted after epoch {len(trainer.history)}; resume with --resume {run_dir}"
    finally:
        progress.close()
    if rank0:
        write_summary(run_dir, cfg, trainer.history, status, message, train_time, images_total,
                      time.time() - t_start)
    if message:
        log.line(message, err=code != 0)
    if status == "completed":
        tested = [r for r in trainer.history if r["test_error"] is not None]
        final = tested[-1]["test_error"] if tested else float("nan")
        best = min(tested, key=lambda r: r["test_error"]) if tested else None
        paper = (f"  (paper: {cfg.paper_error:.2f}" + (f" ± {cfg.paper_spread:g}" if cfg.paper_spread is not None else "")
                 + f", {cfg.paper_ref})") if cfg.paper_error is not None else ""
        log.line(f"final test error {final:.2f}%{paper}; best {best['test_error']:.2f}% at epoch {best['epoch']} "
                 f"(best-epoch error is picked on the test set)" if best else "no evaluation")
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return code


def write_summary(run_dir, cfg, history, status, message, train_time, images, wall):
    tested = [r for r in history if r["test_error"] is not None]
    best = min(tested, key=lambda r: r["test_error"]) if tested else None
    summary = {
        "status": status, "message": message,
        "final_test_error": tested[-1]["test_error"] if tested else None,
        "best_test_error": best["test_error"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "epochs_completed": len(history), "epochs": cfg.epochs,
        "wall_time_s": round(wall, 3), "train_time_s": round(train_time, 3),
        "images_per_s": round(images / train_time, 1) if train_time > 0 else None,
        "paper_ref": cfg.paper_ref, "paper_error": cfg.paper_error, "paper_spread": cfg.paper_spread,
    }
    write_text(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")


class RunLog:
    """Human lines to stdout and log.txt, one JSON row per epoch to metrics.jsonl (rank 0 only)."""

    def __init__(self, run_dir, active):
        self.run_dir, self.active = run_dir, active

    def line(self, text, err=False):
        if not self.active:
            return
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
        with open(os.path.join(self.run_dir, "log.txt"), "a") as f:
            f.write(text + "\n")

    def metrics(self, row):
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        _parser().print_help()
        return 0
    try:
        cfg, explicit = parse_config(argv)
        return train(cfg, explicit, argv)
    except UsageError as e:
        print(f"main.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        from data_utils import DataError
        if isinstance(e, DataError):
            print(f"main.py: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
