"""Config: the one dataclass of settings; defaults in code → YAML file → command-line flags.

Unknown keys or flags, wrong types and out-of-range values raise UsageError with one line that
names the problem and what is allowed (main.py prints it and exits with code 2).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field

EXIT_RUNTIME, EXIT_USAGE = 1, 2


@dataclass
class Config:
    # data
    dataset: str = "cifar10"          # cifar10 | cifar100 | svhn | fashionmnist | synthetic | imagenet
    data_dir: str = "data"            # dataset folder (Fashion-MNIST also: flat idx files; imagenet: train/ val/)
    image_size: int = 224             # imagenet: train RandomResizedCrop side; val Resize(side·256/224) + CenterCrop
    reduced_decode: bool = False      # imagenet training: JPEG decode at reduced DCT size when the crop allows (faster; not the official pixels)
    download: bool = False            # let torchvision download the dataset
    train_size: int = 0               # use only the first N training samples (0 = all; imagenet: N spread evenly over the sorted files)
    test_size: int = 0                # use only the first N test samples (0 = all; imagenet: as train_size)
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
    autoaugment_first: bool = False   # AutoAugment before crop + flip (SAM code), not after (AMP code)
    autoaugment_policy: str = "torchvision"  # torchvision's policy | sam: the SAM code's own (RGB only)
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
    weight_decay_in_loss: bool = False  # instead add ½·weight_decay·‖θ‖² to the loss of every pass (SAM code)
    label_smoothing: float = 0.0      # ε of cross-entropy's label smoothing (targets 1−ε+ε/K, ε/K), every pass
    schedule: str = "step"            # step (×lr_decay at milestones) | cosine
    milestones: list = field(default_factory=lambda: [100, 150])  # epochs of the step schedule
    lr_decay: float = 0.1             # factor of the step schedule
    lr_updates_per_epoch: int = 1     # how often within an epoch the LR changes (1 = at epoch ends)
    clip_norm: float = 50.0           # clip the gradient to this global norm in every pass (0 = off)
    drop_last: bool = False           # drop the last partial batch of an epoch (SAM code) instead of keeping it
    # AMP paper's Table A baselines (runner/methods.py); each composes with every optimizer
    label_smoothing_style: str = "torch"  # torch: targets 1−ε+ε/K, ε/K | amp: 1−ε, ε/(K−1) (AMP code)
    flooding: float = 0.0             # flood level b: the batch loss L becomes |L − b| + b (0 = off)
    mixup_alpha: float = 0.0          # MixUp: per-sample λ ~ Beta(mixup_alpha, mixup_beta) (0 = off)
    mixup_beta: typing.Optional[float] = None  # MixUp's second Beta parameter (None = mixup_alpha)
    adv_epsilon: float = 0.0          # adversarial training: L∞ PGD radius on the normalised inputs, in 1/255 (0 = off)
    adv_step: float = 1.0             # PGD step size, in 1/255
    adv_iter: int = 1                 # PGD steps
    rmp_epsilon: float = 0.0          # RMP: weight noise U(±√(ε/numel)) per tensor, fresh each step (0 = off)
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
    asam_all_params: bool = False     # ASAM's T on every parameter (davda54/sam), not only weights (ASAM code)
    sam_m: int = 0                    # m-sharpness: ε̂ per sub-batch of m examples, gradients averaged (0 = batch)
    sam_shared_draws: bool = False    # SAM/ASAM: perturbed pass replays the clean pass's random draws (dropout, shake-shake gates; SAM code)
    bn_update: str = "auto"           # BN running stats: auto (the paper's) | all passes | clean pass
    # runtime
    seed: int = 0                     # seeds init, shuffling, augmentation, noise
    device: str = "auto"              # auto | cpu | cuda
    precision: str = "fp32"           # fp32 | bf16 (autocast) | fp16 (autocast + per-pass loss scaling)
    channels_last: bool = False       # NHWC memory layout (faster convolutions on GPU)
    compile: bool = False             # torch.compile the model
    workers: int = 4                  # CPU worker processes: AutoAugment; imagenet: JPEG decoding (at most the CPU count)
    eval_every: int = 1               # evaluate every k epochs (and after the last)
    eval_batch_size: int = 1000       # test batch size
    out_dir: str = "runs"             # parent folder of run folders
    name: str = ""                    # run folder name (default DATASET_MODEL_OPTIMIZER_sSEED; -1, -2, ... if taken)
    resume: str = ""                  # run folder to continue
    on_existing: str = "new"          # out_dir/name exists: new (a new folder name-1, ...) | resume (continue it if its settings are these)
    progress_every: float = 30.0      # seconds between progress lines when stdout is not a terminal (0 = none)
    tensorboard: bool = False         # also write the epoch metrics as TensorBoard event files into the run folder
    # the paper's number this config reproduces (for the log and report.py)
    paper_ref: str = ""               # "source, table, row"
    paper_error: typing.Optional[float] = None   # % test error
    paper_spread: typing.Optional[float] = None  # ± of the paper's number
    paper_nll: typing.Optional[float] = None     # the paper's test NLL (AMP Table A: its criterion's test loss)


CHOICES = {
    "dataset": ("cifar10", "cifar100", "svhn", "fashionmnist", "synthetic", "imagenet"),
    "pad_mode": ("constant", "reflect"),
    "cutout_style": ("amp", "rwp"),
    "autoaugment_policy": ("torchvision", "sam"),
    "optimizer": ("sgd", "amp", "rwp", "sam", "asam"),
    "schedule": ("step", "cosine"),
    "amp_ball": ("tensor", "global"),
    "label_smoothing_style": ("torch", "amp"),
    "bn_update": ("auto", "all", "clean"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("fp32", "bf16", "fp16"),
    "on_existing": ("new", "resume"),
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
    ("rho", 0, None, True), ("adaptive_eta", 0, None, True), ("sam_m", 0, None, True),
    ("flooding", 0, None, True), ("mixup_alpha", 0, None, True), ("mixup_beta", 0, None, False),
    ("adv_epsilon", 0, None, True), ("adv_step", 0, None, True), ("adv_iter", 0, None, True), ("rmp_epsilon", 0, None, True),
    ("label_smoothing", 0, 1, True), ("workers", 0, None, True),
    ("eval_every", 1, None, True), ("image_size", 8, None, True), ("eval_batch_size", 1, None, True),
    ("seed", 0, 2 ** 32 - 1, True), ("progress_every", 0, None, True),
]
FIELDS = {f.name: f for f in dataclasses.fields(Config)}
# Fields that may differ when resuming a run: they do not change what is computed (device,
# channels_last and compile change the floating-point rounding: bit-exact resumes need the same).
RESUME_MAY_CHANGE = {"device", "workers", "resume", "eval_batch_size", "compile", "channels_last",
                     "data_dir", "download", "on_existing", "progress_every", "tensorboard"}
INT_MAX = 2 ** 31 - 1  # no integer setting goes beyond this (sizes, counts, epochs)
# Fields a flag may change without changing the setting a config's paper number belongs to.
PAPER_SETTING_KEPT = RESUME_MAY_CHANGE | {"seed", "name", "out_dir", "precision", "eval_every"}


DESCRIPTION = "Train a model with SGD, AMP, RWP, SAM or ASAM and log its test error next to the paper's."
EPILOG = """A finished (or stopped) run:
  python main.py --evaluate RUN_DIR [--device auto|cpu|cuda]
      prints the test loss and error of RUN_DIR's last checkpoint on the run's test set; writes nothing."""


class UsageError(Exception):
    """Invalid input; the message is one line naming the problem and the valid choices."""


def shown(value, limit: int = 80) -> str:
    """A short repr of `value` for an error message: nested lists cut by reprlib (never expanded
    whole: a YAML alias bomb's value has billions of items), then cut to `limit` characters."""
    import reprlib
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxstring = 3, 8, limit
    r.maxlong = r.maxother = limit
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."




def _kind(name):
    """'bool' | 'int' | 'float' | 'str' | 'list' | 'optfloat' for a Config field."""
    t = str(FIELDS[name].type)
    return {"bool": "bool", "int": "int", "float": "float", "str": "str", "list": "list"}.get(
        t, "optfloat" if "float" in t else t)


def _number(text):
    """A YAML string that is a number (PyYAML reads `5e-4` and `1e3` as strings): float, else None."""
    try:
        return float(text) if isinstance(text, str) else None
    except ValueError:
        return None


def _coerce(name, value):
    """Type-check a YAML value for field `name`; ints are accepted where floats are, and so are
    strings that are numbers (`5e-4`: YAML 1.1 wants `5.0e-4`) where a float is expected."""
    kind = _kind(name)
    item = float if name in ("mean", "std") else int
    if kind in ("float", "optfloat") and _number(value) is not None:
        value = _number(value)
    elif kind == "list" and item is float and isinstance(value, list):
        value = [v if _number(v) is None else _number(v) for v in value]
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "optfloat": value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)),
        "str": isinstance(value, str),
        "list": isinstance(value, list) and all(
            isinstance(v, (int, item)) and not isinstance(v, bool) for v in value),
    }[kind]
    if not ok:
        want = {"optfloat": "a number or null", "int": "an integer", "float": "a number", "bool": "true or false",
                "str": "a string", "list": f"a list of {'numbers' if item is float else 'integers'}"}[kind]
        raise UsageError(f"{name}: expected {want}, got {shown(value)}")
    if kind in ("float",) or (kind == "optfloat" and value is not None):
        return float(value)
    return value


def _validate(cfg: Config, new: bool = True):
    """UsageError for a value that cannot run. `new` False: a config saved in a checkpoint, which may
    hold values earlier versions accepted and ignored (padding flags with imagenet, ...): kept."""
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
    _check_float32(cfg)
    if cfg.label_smoothing >= 1:
        raise UsageError(f"label_smoothing: {cfg.label_smoothing} is out of range (must be ≥ 0 and < 1: at 1 every "
                         f"target is uniform and nothing is learned)")
    for name, f in FIELDS.items():
        v = getattr(cfg, name)
        values = v if isinstance(v, list) else [v]
        if name != "seed" and any(type(x) is int and abs(x) > INT_MAX for x in values):
            raise UsageError(f"{name}: {shown(v)} is out of range (at most {INT_MAX})")
    from data_utils import DATASETS as _DATASETS
    if cfg.autoaugment and cfg.autoaugment_policy == "sam" and _DATASETS[cfg.dataset].channels != 3:
        raise UsageError(f"autoaugment_policy: the SAM code's policy takes RGB images; {cfg.dataset} has 1 channel")
    from runner import methods
    methods.validate(cfg, UsageError)
    if cfg.sam_m and cfg.precision == "fp16":  # its per-pass unscaling would rescale the running sum
        raise UsageError("sam_m: m-sharpness does not work with precision fp16 (use bf16 or fp32)")
    if any(m < 0 for m in cfg.milestones) or cfg.milestones != sorted(cfg.milestones):
        raise UsageError(f"milestones: {shown(cfg.milestones)} must be non-negative epochs in increasing order")
    from data_utils import DATASETS
    channels = DATASETS[cfg.dataset].channels
    for name in ("mean", "std"):
        v = getattr(cfg, name)
        if v and len(v) != channels:
            raise UsageError(f"{name}: {cfg.dataset} has {channels} channel(s), got {len(v)} values")
    size = DATASETS[cfg.dataset].size
    padding = [k for k in ("crop_padding", "pad_mode", "pad_fill") if getattr(cfg, k) != FIELDS[k].default]
    if new and cfg.dataset == "imagenet" and padding:  # (values it would silently ignore; a saved run's
        raise UsageError(f"{padding[0]}: not used by imagenet (its crops are RandomResizedCrop, without "  # are kept)
                         f"padding); leave it at its default, {FIELDS[padding[0]].default!r}")
    if new and cfg.image_size > 1024:
        raise UsageError(f"image_size: {cfg.image_size} is out of range (must be ≥ 8 and ≤ 1024)")
    if new and cfg.dataset != "imagenet" and cfg.reduced_decode:
        raise UsageError(f"reduced_decode: only for imagenet (folder datasets); {cfg.dataset} is not decoded from files")
    if new and cfg.dataset != "imagenet" and cfg.image_size != FIELDS["image_size"].default:
        raise UsageError(f"image_size: only for imagenet (folder datasets); {cfg.dataset} has "
                         f"{DATASETS[cfg.dataset].size}-pixel images")
    if cfg.augment and cfg.pad_mode == "reflect" and cfg.crop_padding >= size and cfg.dataset != "imagenet":
        raise UsageError(f"crop_padding: reflect padding must be smaller than the {size}-pixel image, "
                         f"got {cfg.crop_padding}")
    if cfg.augment and cfg.crop_padding > size and cfg.dataset != "imagenet":
        raise UsageError(f"crop_padding: at most the image size ({size} pixels), got {cfg.crop_padding}")
    if not all(math.isfinite(v) for v in cfg.mean + cfg.std):
        raise UsageError(f"{'mean' if not all(map(math.isfinite, cfg.mean)) else 'std'}: values must be finite numbers")
    if cfg.dataset == "imagenet" and (cfg.cutout or cfg.autoaugment):
        raise UsageError(f"{'cutout' if cfg.cutout else 'autoaugment'}: not available for imagenet "
                         "(its augmentation is RandomResizedCrop + flip, as in the official script)")
    if cfg.std and min(cfg.std) <= 0:
        raise UsageError(f"std: values must be > 0, got {shown(cfg.std)}")
    if cfg.cutout and cfg.cutout_size > size:
        raise UsageError(f"cutout_size: at most the image size ({size} pixels), got {cfg.cutout_size}")
    import models
    import torch
    try:  # on the meta device: checks name and arguments without allocating anything
        with torch.device("meta"):
            models.build_model(cfg.model, DATASETS[cfg.dataset].num_classes, channels, dropout=cfg.dropout)
    except ValueError as e:
        raise UsageError(f"model: {e}") from None
    if cfg.name and (os.sep in cfg.name or cfg.name in (".", "..") or cfg.name.startswith(".")):
        raise UsageError(f"name: {cfg.name!r} must be a plain folder name (not starting with '.')")
    if len(cfg.name.encode()) > 240:
        raise UsageError(f"name: {cfg.name[:40]!r}... is too long ({len(cfg.name.encode())} bytes; at most 240)")


FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: weights and optimizer state are float32 in every precision
NOT_IN_TRAINING = {"progress_every", "paper_error", "paper_spread", "paper_nll"}  # float settings that never reach a tensor


def _check_float32(cfg: Config):
    """UsageError for a float setting that does not fit float32, which training computes in (torch
    cannot turn `--lr 1e308` into a step's scalar: a traceback, not a divergence), and for a step
    schedule that would raise the learning rate beyond it (lr × lr_decay^milestones)."""
    for name in FIELDS:
        v = getattr(cfg, name)
        if _kind(name) in ("float", "optfloat", "list") and name not in NOT_IN_TRAINING:
            values = v if isinstance(v, list) else [v]  # (not finite: refused below with its own message)
            if any(isinstance(x, float) and math.isfinite(x) and abs(x) > FLOAT32_MAX for x in values):
                raise UsageError(f"{name}: {shown(v)} does not fit float32, the precision of the weights and "
                                 f"the optimizer (at most {FLOAT32_MAX:.4g})")
    reached = sum(m <= cfg.epochs for m in cfg.milestones) if cfg.schedule == "step" else 0
    if cfg.lr_decay > 1 and reached and math.log(cfg.lr) + reached * math.log(cfg.lr_decay) > math.log(FLOAT32_MAX):
        raise UsageError(f"lr_decay: {cfg.lr_decay} at {reached} milestone(s) raises lr {cfg.lr} beyond float32 "
                         f"(at most {FLOAT32_MAX:.4g})")


def check_launch(cfg: Config, explicit: set):
    """What depends on how the run is launched (process count, data folder), checked for a new run
    and for a resumed one alike."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.optimizer == "rwp" and world > 1 and world % 2 and not cfg.arwp:
        raise UsageError(f"torchrun: parallel RWP splits ranks into clean and perturbed halves and needs an "
                         f"even number of processes, got {world}; use --nproc_per_node {world - 1} or {world + 1}")
    if "data_dir" in explicit and cfg.dataset == "fashionmnist" and not cfg.download and not os.path.isdir(cfg.data_dir):
        # (when data_dir is not given, a missing folder falls back to the Debian package's files)
        raise UsageError(f"data_dir: folder {cfg.data_dir!r} does not exist (leave data_dir out to read "
                         "the Debian package's /usr/share/datasets/fashion-mnist)")


MAX_YAML_VALUES = 10_000  # values a config may hold once its aliases are expanded (a real one: < 300)


def _expanded_size(root, limit):
    """How many values the YAML node graph `root` stands for once every alias (*name) is expanded,
    counted without expanding (each node once, iteratively); more than `limit`, or a node that
    contains itself, counts as limit + 1."""
    import yaml
    size, busy = {}, set()
    stack = [root]
    while stack:
        node = stack[-1]
        if id(node) in size:
            stack.pop()
            continue
        kids = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else (
            node.value if isinstance(node, yaml.SequenceNode) else [])
        todo = [k for k in kids if id(k) not in size]
        if todo and id(node) not in busy:
            busy.add(id(node))
            stack.extend(todo)
        elif todo:  # a child still open: it contains this node (`&a [*a]`)
            return limit + 1
        else:
            size[id(node)] = min(limit + 1, 1 + sum(size[id(k)] for k in kids))
            stack.pop()
    return size[id(root)]


def _unique_key_loader():
    """yaml.SafeLoader that refuses a mapping with a key given twice (PyYAML keeps the last) and a
    document whose aliases expand to more than MAX_YAML_VALUES values (an alias bomb)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_document(self, node):
            if _expanded_size(node, MAX_YAML_VALUES) > MAX_YAML_VALUES:
                raise UsageError(f"config: it expands to more than {MAX_YAML_VALUES:,} values through YAML "
                                 f"aliases (*name) or refers to itself; a config holds a few dozen")
            return super().construct_document(node)

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise UsageError(f"config: key {key!r} is given twice (line {key_node.start_mark.line + 1}); "
                                     f"keep one")
                seen.add(key)
            return super().construct_mapping(node, deep)
    return Loader


def _read_text(path):
    """The text of a config file (a pipe such as /dev/stdin too): UTF-8, or UTF-16 with its BOM."""
    if os.path.isdir(path):
        raise UsageError(f"config: {path!r} is a folder, not a YAML file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise UsageError(f"config: {path!r} does not exist") from None
    except OSError as e:
        raise UsageError(f"config: cannot read {path!r} ({e.strerror})") from None
    try:
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return raw.decode("utf-16")
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"config: {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                         f"save it as UTF-8") from None


def _load_yaml(path):
    import yaml
    text = _read_text(path)
    try:
        data = yaml.load(text, Loader=_unique_key_loader())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UsageError(f"config: {path} is not valid YAML{at}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"config: {path} must be a mapping of Config fields, got {type(data).__name__}")
    for key in data:
        if key == "resume":
            raise UsageError(f"config: {path} sets 'resume', which is a command-line flag only "
                             "(python main.py --resume RUN_FOLDER)")
        if key not in FIELDS:
            hint = difflib.get_close_matches(str(key), FIELDS, n=1)
            raise UsageError(f"config: unknown key {key!r} in {path}"
                             + (f" (did you mean {hint[0]!r}?)" if hint else "") + "; see README 'Configuration'")
    return data


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors raise UsageError (the caller prints its one line, exit 2)
    instead of printing usage and exiting; the parser of every command of this project."""

    def error(self, message):
        raise UsageError(message)


class _Parser(Parser):
    """main.py's: an unknown flag gets the nearest Config field as a hint."""

    def error(self, message):
        if "unrecognized arguments" in message:
            flag = message.split(":", 1)[1].split()[0]
            hint = difflib.get_close_matches(flag.split("=")[0], [f"--{n}" for n in FIELDS], n=1)
            message += f" (did you mean {hint[0]}?)" if hint else "; see python main.py --help"
        super().error(message)


def _optional_float(text):
    if text.lower() in ("none", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r} (a number or none)") from None


def field_comments():
    """{field: its one-line comment in the Config source above}: the one description of each
    setting, shown by `main.py --help`."""
    import inspect
    import io
    import tokenize
    try:
        source = inspect.getsource(Config)
    except (OSError, TypeError):  # no source (frozen install): --help shows defaults only
        return {}
    comments, line_field = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        row = tok.start[0]
        if tok.type == tokenize.NAME and row not in line_field:
            line_field[row] = tok.string
        elif tok.type == tokenize.COMMENT and line_field.get(row) in FIELDS:
            comments[line_field[row]] = tok.string.lstrip("#").strip()
    return comments


def _help(name, default, comments):
    shown = " ".join(map(str, default)) if isinstance(default, list) else default
    text = comments.get(name, "") + (f" (default: {shown})" if shown not in ("", None) or _kind(name) == "optfloat" else "")
    return text.strip().replace("%", "%%")


def _parser():
    p = _Parser(prog="main.py", description=DESCRIPTION, allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--config", help="YAML file of Config fields (overrides the defaults)")
    comments = field_comments()
    for name, f in FIELDS.items():
        kind = _kind(name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(dest=name, default=argparse.SUPPRESS, help=_help(name, default, comments))
        if kind == "bool":
            p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, **kw)
        elif kind == "list":
            p.add_argument(f"--{name}", type=float if name in ("mean", "std") else int, nargs="*", **kw)
        elif kind == "optfloat":
            p.add_argument(f"--{name}", type=_optional_float, metavar="FLOAT|none", **kw)
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
    from_file = Config(**values)
    values.update(args)
    cfg = Config(**values)
    _validate(cfg)
    # a flag that changes the setting (model, epochs, data size, ...) voids the config's paper number
    changed = [f"--{k}" for k in FIELDS if k in args and k not in PAPER_SETTING_KEPT
               and getattr(cfg, k) != getattr(from_file, k)]  # (in field order: the same text on resume)
    if changed and cfg.paper_error is not None and not any(k.startswith("paper_") for k in args):
        cfg.paper_ref = f"{cfg.paper_ref} [not comparable: {', '.join(changed)} changed the setting]"
        cfg.paper_error = cfg.paper_spread = cfg.paper_nll = None
    return cfg, set(values)
