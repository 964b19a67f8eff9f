"""Training: the optimizer from the Config, the LR schedule, the closure, and the one loop."""
from __future__ import annotations

import dataclasses
import math
import os
import time

from runner.config import Config, UsageError
from runner.records import atomic_write, write_error
from runner.signals import STOP


class Diverged(Exception):
    """The training loss became NaN or inf."""


class SaveFailed(Exception):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous one is intact."""


def init_distributed(cfg: Config):
    """Under torchrun (WORLD_SIZE > 1): the process group, NCCL on CUDA and gloo on CPU."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        device = resolve_device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def build_optimizer(cfg: Config, model, world_size: int, no_sync=None):
    """The optimizer named by cfg; perturbation optimizers wrap SGD with cfg's base settings.
    `model` is the unwrapped module (BN buffers); `no_sync` the DDP wrapper's no_sync, if any."""
    base = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                weight_decay=0.0 if cfg.weight_decay_in_loss else cfg.weight_decay)  # else in the loss
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "asam" and cfg.asam_all_params:  # T = |w|+η on every parameter (davda54/sam)
        params = [{"params": params, "adaptive_all": True}]
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
               eta=cfg.adaptive_eta, model=model, no_sync=no_sync, shared_draws=cfg.sam_shared_draws, **bn, **base)


def lr_factor(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """LR multiplier after `step` optimizer steps; changes lr_updates_per_epoch times an epoch."""
    k = cfg.lr_updates_per_epoch
    epoch = math.floor(step * k / steps_per_epoch) / k  # fractional epoch, quantised
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(epoch, cfg.epochs) / cfg.epochs))
    return cfg.lr_decay ** sum(epoch >= m for m in cfg.milestones)


def resolve_device(cfg: Config, local_rank: int = 0):
    """torch.device for cfg.device ('auto': CUDA when visible); on CUDA also cudnn.benchmark."""
    import torch
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device: cuda requested but no CUDA GPU is visible; use --device cpu")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    return device


def build_augment(cfg: Config, info):
    """data_utils.Augment for cfg on dataset `info` (DATASETS entry)."""
    import data_utils
    mean, std = tuple(cfg.mean) or info.mean, tuple(cfg.std) or info.std
    return data_utils.Augment(
        mean, std, crop=cfg.augment, padding=cfg.crop_padding, pad_mode=cfg.pad_mode,
        fill=cfg.pad_fill, flip=cfg.augment and cfg.flip,
        cutout_size=cfg.cutout_size if cfg.cutout else 0, cutout_prob=cfg.cutout_prob,
        cutout_style=cfg.cutout_style)


def build_net(cfg: Config, info, device, world_size: int = 1):
    """(model, net, no_sync): the module, and what the closure calls — the module under DDP when
    world_size > 1, then torch.compile when cfg.compile. Weights stay the module's parameters, so
    the optimizers perturb and restore the tensors the compiled graph reads."""
    import torch
    import models
    model = models.build_model(cfg.model, info.num_classes, info.channels, dropout=cfg.dropout).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    no_sync = getattr(net, "no_sync", None)  # SAM's first pass skips the all-reduce
    if cfg.compile:
        net = torch.compile(net)
    return model, net, no_sync


def autocast_for(cfg: Config, device):
    """The autocast context of cfg.precision (bf16 or fp16), or None for fp32."""
    import torch
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else None


def make_closure(optimizer, net, params, batches, *, autocast=None, clip_norm=0.0, scaler=None,
                 label_smoothing=0.0, l2=0.0, part_size=0, regularizers=None):
    """The closure every optimizer steps with: closure(batch=0, loss_weight=1.0) zeroes the grads,
    computes L = CE_ε(net(x_b), y_b) (label smoothing ε; under `autocast`), back-propagates
    w·(L + ½·l2·‖θ‖²) (as S·w·(...), unscaled after, when an fp16 `scaler` is given; the L2 term
    over `params`, the SAM code's weight decay), clips ‖g‖₂ ≤ clip_norm over `params`, and returns
    (outputs, L.detach()) — the logged loss is the cross-entropy alone.

    With `part_size` m > 0 and a batch of B > m examples the closure has `parts` = ⌈B/m⌉ and
    `closure(part=i)` is SAM's m-sharpness form: no zeroing, the gradient of (n_i/B)·(L_i + ½·l2·‖θ‖²)
    on examples [i·m, (i+1)·m) is added to .grad, the clip applies after the last part only.

    `regularizers` (runner.methods.Regularizers): its criterion replaces the cross-entropy, its
    adversarial and MixUp inputs (made here, once per step) replace the batches, and its RMP noise
    is added to the weights around forward and backward of every pass."""
    import contextlib
    import torch

    n = len(batches[0][1])
    # (x, y, λ, y_π) per batch: MixUp's per-sample λ and permuted targets, else None
    batches = regularizers.prepare(batches) if regularizers is not None else [(x, y, None, None) for x, y in batches]
    parts = -(-n // part_size) if 0 < part_size < n else 1

    def closure(batch=0, loss_weight=1.0, part=None):
        x, y, *mix = batches[batch]
        if part is None:
            optimizer.zero_grad(set_to_none=True)
        else:  # m-sharpness: sub-batch `part`, weighted by its share of the batch
            cut = slice(part * part_size, (part + 1) * part_size)
            x, y, mix = x[cut], y[cut], [None if t is None else t[cut] for t in mix]
            loss_weight = loss_weight * len(y) / n
        if regularizers is not None:
            regularizers.perturb()  # RMP: θ' + ξ
        with autocast if autocast is not None else contextlib.nullcontext():
            outputs = net(x)
            if regularizers is not None:
                loss = regularizers.criterion(outputs, y, *mix)
            else:
                loss = torch.nn.functional.cross_entropy(outputs, y, label_smoothing=label_smoothing)
        total = loss
        if l2 > 0:  # ½·λ·‖θ‖², in fp32, on every parameter (BN and biases included, as the SAM code)
            total = loss + 0.5 * l2 * torch.stack([p.float().square().sum() for p in params]).sum()
        weighted = total * loss_weight if loss_weight != 1.0 else total
        if scaler is None:
            weighted.backward()
        else:
            scaler.backward(weighted)
        if clip_norm > 0 and (part is None or part == parts - 1):
            torch.nn.utils.clip_grad_norm_(params, clip_norm, foreach=True)
        if regularizers is not None:
            regularizers.restore()  # RMP: θ' exactly
        return outputs, loss.detach()
    closure.parts = parts
    return closure


def test_totals(net, batches, device, channels_last=False, autocast=None, num_classes=10, criterion=None, group=0):
    """(Σ cross-entropy, top-1 wrong, n, top-5 wrong) as a float64 tensor of `net` (in eval mode)
    over `batches` (this process's shard of the test set); top-5 is top-min(5, classes). The
    evaluation of training and of `main.py --evaluate`. With a `criterion` (runner.methods.Criterion)
    a 5th total: its test_sum over groups of `group` samples (the training criterion's test loss)."""
    import torch
    totals = torch.zeros(4 if criterion is None else 5, device=device, dtype=torch.float64)
    k = min(5, num_classes)
    with torch.no_grad():
        for x, y in batches:
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if autocast is not None:
                with autocast:
                    out = net(x)
            else:
                out = net(x)
            totals[0] += torch.nn.functional.cross_entropy(out.float(), y, reduction="sum").double()
            totals[1] += (out.argmax(1) != y).sum()
            totals[2] += len(y)
            totals[3] += (out.topk(k, 1).indices != y.view(-1, 1)).all(1).sum()  # y not in the top k
            if criterion is not None:
                totals[4] += criterion.test_sum(out, y, group)
    return totals


def _check_partial(partial, world, steps_per_epoch):
    """A mid-epoch record from a checkpoint must be well formed and fit this run."""
    if partial is None:
        return
    number = (int, float)
    if not (isinstance(partial, dict) and {"step", "ranks", "skipped", "lr", "time_s"} <= partial.keys()
            and isinstance(partial["step"], int) and partial["step"] > 0 and isinstance(partial["ranks"], list)
            and all(isinstance(r, list) and len(r) == 4 and all(isinstance(v, number) for v in r)
                    for r in partial["ranks"])):
        raise UsageError("resume: the checkpoint's mid-epoch record is malformed; it is corrupt or not ours")
    if len(partial["ranks"]) != world:
        raise UsageError(f"resume: the checkpoint was saved mid-epoch by {len(partial['ranks'])} process(es); "
                         f"resume it with the same number of processes")
    if partial["step"] >= steps_per_epoch:
        raise UsageError(f"resume: the checkpoint was saved after step {partial['step']} of an epoch, but an "
                         f"epoch now has {steps_per_epoch} steps (other data or batch size?)")


class Trainer:
    """Data, model, optimizer and the one training loop for every optimizer."""

    def __init__(self, cfg: Config, run_dir: str, ckpt=None):
        import torch
        import torch.distributed as dist
        import data_utils
        self.cfg, self.run_dir, self.torch, self.session_start = cfg, run_dir, torch, time.time()
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(cfg, self.local_rank)
        init_distributed(cfg)
        torch.manual_seed(cfg.seed)

        # data
        info = data_utils.DATASETS[cfg.dataset]
        self.folder = None  # folder datasets (imagenet) are streamed from files, see data_folder.py
        self.notes = []  # lines for the run's log (main.py prints them after the start line)
        if cfg.dataset == "imagenet":
            import data_folder
            self.folder = data_folder.FolderData.shared(cfg.data_dir, cfg.train_size, cfg.test_size)
            if ckpt is not None:
                self.notes += check_data(cfg.data_dir, ckpt.get("data"), self.folder.fingerprint)
            self.data_source = os.path.abspath(cfg.data_dir)
            info = dataclasses.replace(info, num_classes=self.folder.num_classes, size=cfg.image_size)
            n_test = len(self.folder.val[1])
        else:
            first = cfg.download and self.world > 1  # rank 0 downloads; the others then read its files
            if first and self.rank != 0:
                dist.barrier()
            xtr, ytr, self.data_source = data_utils.load_dataset(cfg.dataset, cfg.data_dir, True, cfg.download,
                                                                 cfg.train_size, cfg.seed, with_source=True)
            xte, yte = data_utils.load_dataset(cfg.dataset, cfg.data_dir, False, cfg.download, cfg.test_size, cfg.seed)
            if first and self.rank == 0:
                dist.barrier()
            n_test = len(xte)
            for name, asked, have in (("train_size", cfg.train_size, len(xtr)), ("test_size", cfg.test_size, n_test)):
                if asked > have:
                    raise UsageError(f"{name}: {asked} is more than the {have} samples of {cfg.dataset}'s "
                                     f"{name[:-5]} set (0 = all)")
        self.info = info
        self.aug = build_augment(cfg, info)
        if n_test < self.world:
            raise UsageError(f"test_size: {n_test} test sample(s) cannot be split across {self.world} processes")
        if self.folder is None:
            self.test_x, self.test_y = xte.to(self.device), yte.to(self.device)

        # model
        self.model, self.net, no_sync = build_net(cfg, info, self.device, self.world)
        self.optimizer = build_optimizer(cfg, self.model, self.world, no_sync)
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # clipped in the closure
        from runner.methods import Criterion, build_regularizers
        self.criterion = Criterion(info.num_classes, cfg.label_smoothing, cfg.label_smoothing_style, cfg.flooding)
        self.regularizers = build_regularizers(cfg, self.model, self.params, info.num_classes,
                                               autocast_for(cfg, self.device))

        # one loader per batch a step consumes; under torchrun, ranks split into groups
        per_step = getattr(self.optimizer, "batches_per_step", 1)
        group, groups = getattr(self.optimizer, "rank_group", (0, 1))
        if self.world % groups:
            raise UsageError(f"torchrun: {cfg.optimizer} needs a world size divisible by {groups}, got {self.world}")
        policy = data_utils.autoaugment_policy(cfg.dataset, cfg.pad_fill, info.channels,
                                               cfg.autoaugment_policy) if cfg.autoaugment else None
        if self.folder is not None:
            import data_folder
            self.loaders = [data_folder.FolderTrainLoader(
                self.folder, cfg.batch_size, cfg.image_size, self.aug, device=self.device, seed=cfg.seed,
                stream=group * per_step + i, shard=self.rank // groups, num_shards=self.world // groups,
                workers=cfg.workers, random_crop=cfg.augment, flip=cfg.augment and cfg.flip,
                reduced_decode=cfg.reduced_decode) for i in range(per_step)]
        else:
            self.loaders = [data_utils.TrainLoader(
                xtr, ytr, cfg.batch_size, self.aug, device=self.device, seed=cfg.seed,
                stream=group * per_step + i, shard=self.rank // groups, num_shards=self.world // groups,
                drop_last=cfg.drop_last,
                autoaugment=policy, policy_first=cfg.autoaugment_first, workers=cfg.workers) for i in range(per_step)]
        self.steps_per_epoch = len(self.loaders[0])
        if self.steps_per_epoch == 0:
            raise UsageError(f"train_size: {self.loaders[0].num_samples} training sample(s) per process make "
                             f"no batch of 2 or more; use more data")
        if hasattr(self.optimizer, "total_steps"):  # step-indexed schedules inside the optimizer
            self.optimizer.total_steps = cfg.epochs * self.steps_per_epoch
        self.scaler = None
        if cfg.precision == "fp16":
            from runner.scaler import LossScaler
            self.scaler = LossScaler(self.optimizer, self.params, distributed=self.world > 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(cfg, s, self.steps_per_epoch))
        self.autocast = autocast_for(cfg, self.device)
        self.start_epoch, self.history, self.resume_partial, self.partial, self.stop_signal = 0, [], None, None, 0
        self.wall_before = float(ckpt.get("wall_time_s", 0.0)) if ckpt is not None else 0.0
        if ckpt is not None:
            self._restore(ckpt)

    # -- checkpoints
    def _rng_state(self):
        torch = self.torch
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def state(self, epoch, partial=None):
        """Everything to continue after `epoch` epochs (and `partial`: steps of the next one)."""
        return {"format": "flat-minima-runner/1", "epoch": epoch, "config": dataclasses.asdict(self.cfg),
                "wall_time_s": self.wall_time(), "world_size": self.world,
                **({"partial": partial} if partial else {}),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": self._rng_state(),
                "history": self.history, **({"scaler": self.scaler.state_dict()} if self.scaler else {}),
                **({"data": self.folder.fingerprint} if self.folder is not None else {})}

    def wall_time(self):
        """Seconds since this run first started, over every session (up to each one's last save)."""
        return self.wall_before + time.time() - self.session_start

    def _restore(self, ckpt):
        torch = self.torch
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None:
                self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            detail = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]  # torch: "Error(s) in ...:"
            raise UsageError(f"resume: checkpoint does not fit this model/optimizer ({detail[:200]})") from None
        try:
            torch.set_rng_state(ckpt["rng"]["cpu"])
            if "cuda" in ckpt["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        except (RuntimeError, TypeError) as e:
            raise UsageError(f"resume: the checkpoint's RNG state is invalid ({str(e).splitlines()[0]})") from None
        self.start_epoch, self.history = ckpt["epoch"], list(ckpt["history"])
        self.resume_partial = partial = ckpt.get("partial")
        _check_partial(partial, self.world, self.steps_per_epoch)

    def save_checkpoint(self, epoch, partial=None):
        """Write checkpoint.pt atomically; SaveFailed (one line: which file, how much space it
        needed) when the disk is full or failing; the previous checkpoint then stays intact."""
        state = self.state(epoch, partial)
        path = os.path.join(self.run_dir, "checkpoint.pt")
        try:
            atomic_write(path, lambda f: self.torch.save(state, f))
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
            needed = sum(t.numel() * t.element_size() for t in _tensors(state))
            raise SaveFailed(write_error(path, e, needed)) from None

    @property
    def rwp_mode(self):
        """'parallel' or 'sequential' for RWP (how the two gradients were computed), else None."""
        if self.cfg.optimizer != "rwp":
            return None
        return "parallel" if getattr(self.optimizer, "parallel", False) else "sequential"

    # -- one epoch
    def closure_for(self, batches):
        cfg = self.cfg
        return make_closure(self.optimizer, self.net, self.params, batches, autocast=self.autocast,
                            clip_norm=cfg.clip_norm, scaler=self.scaler, label_smoothing=cfg.label_smoothing,
                            l2=cfg.weight_decay if cfg.weight_decay_in_loss else 0.0,
                            part_size=cfg.sam_m if cfg.optimizer in ("sam", "asam") else 0,
                            regularizers=self.regularizers)

    def agree(self, bad_step=None):
        """(signal number or 0, first non-finite step or -1), the same on every rank: under torchrun
        the MAX of the ranks' pending signals and the MIN of their non-finite steps (one tiny
        all-reduce), so all ranks stop, or raise Diverged, at the same step."""
        torch = self.torch
        bad = -1 if bad_step is None else bad_step
        if self.world == 1:
            return STOP.requested, int(bad.item()) if torch.is_tensor(bad) else bad
        import torch.distributed as dist
        big = float(1 << 40)
        bad = torch.as_tensor(bad, device=self.device, dtype=torch.float64)
        t = torch.stack([torch.tensor(float(STOP.requested), device=self.device, dtype=torch.float64),
                         torch.where(bad >= 0, big - bad, torch.zeros_like(bad))])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        signum, b = t.tolist()
        return int(signum), int(big - b) if b > 0 else -1

    def train_epoch(self, epoch, progress, partial=None):
        """One epoch (from step partial['step'] of a checkpoint saved mid-epoch, if given). Returns
        (train loss, train error %, images), or None when stopped mid-epoch, with self.partial set
        to what a checkpoint needs to finish the epoch later exactly as if never stopped."""
        torch = self.torch
        self.model.train()
        for loader in self.loaders:
            loader.set_epoch(epoch)
        if partial and self.folder is not None and self.rank == 0:  # replacements before the stop
            self.loaders[0].bad_images = int(partial.get("bad_images", 0))
        start = partial["step"] if partial else 0
        loss0, wrong0, seen, images = partial["ranks"][self.rank] if partial else (0.0, 0, 0, 0)
        loss_sum = torch.tensor(loss0, device=self.device, dtype=torch.float64)
        wrong = torch.tensor(int(wrong0), device=self.device, dtype=torch.int64)
        seen, images = int(seen), int(images)
        bad_step = torch.full((), -1, device=self.device, dtype=torch.int64)  # first non-finite step
        if self.scaler is not None and partial:
            self.scaler.skipped = partial["skipped"]
        if self.folder is not None:  # folder loaders start at any batch without decoding the ones before
            iterators = [loader.iter_from(start) for loader in self.loaders]
        else:
            iterators = [iter(loader) for loader in self.loaders]
            for _ in range(start):  # skip the batches of the steps already done (the loaders' draws
                for it in iterators:  # depend on seed, epoch and step only, not on the global RNG)
                    next(it)
        self.partial = None
        for step, batches in enumerate(zip(*iterators), start=start):
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
            if step == start and getattr(progress, "wants_loss", False):  # a loss from the first step on
                progress.set_postfix(loss=f"{loss_sum.item() / seen:.3f}")  # (one host sync per epoch)
            progress.update(1)
            sync = (step + 1) % 50 == 0  # one host sync per log interval
            # one process: a signal stops after this step; torchrun: the ranks agree at sync points
            if sync or (self.world == 1 and STOP.requested):
                signum, bad = self.agree(bad_step)
                if bad >= 0:
                    raise Diverged(f"loss became non-finite at epoch {epoch + 1}, step {bad + 1}")
                if sync:
                    progress.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", refresh=False)
                if signum and step + 1 < self.steps_per_epoch:
                    STOP.escalate = False  # agreed: let every rank save and leave together
                    self.stop_signal = signum
                    self.partial = self._partial(step + 1, loss_sum, wrong, seen, images)
                    return None
        signum, bad = self.agree(bad_step)
        if bad >= 0:
            raise Diverged(f"loss became non-finite at epoch {epoch + 1}, step {bad + 1}")
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

    def _partial(self, step, loss_sum, wrong, seen, images):
        """Mid-epoch state: steps done and every rank's running sums (loss, wrong, seen, images)."""
        torch = self.torch
        mine = torch.stack([loss_sum, wrong.double(), torch.tensor(float(seen), device=self.device, dtype=torch.float64),
                            torch.tensor(float(images), device=self.device, dtype=torch.float64)])
        parts = [mine]
        if self.world > 1:
            import torch.distributed as dist
            parts = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(parts, mine)
        return dict(step=step, ranks=[p.tolist() for p in parts],
                    skipped=self.scaler.skipped if self.scaler is not None else 0,
                    **({"bad_images": self.bad_images()} if self.folder is not None else {}))

    def evaluate(self):
        """(test loss, top-1 error %, top-5 error %) of the model at θ on the whole test set, each
        sample counted once (rank r of W takes samples r, r + W, ...); folder data: unreadable images
        are left out and counted in self.bad_test_images. The test loss is the NLL (plain
        cross-entropy); self.test_criterion_loss is the training criterion (smoothing, flooding per
        batch of batch_size samples) on the same samples, the test loss the AMP code reported."""
        import data_utils
        if self.world > 1:  # every rank evaluates rank 0's BN statistics
            import torch.distributed as dist
            for b in self.model.buffers():
                dist.broadcast(b, 0)
        self.model.eval()
        if self.folder is not None:
            batches = self.folder.test_batches(self.cfg.eval_batch_size, self.cfg.image_size, self.aug,
                                               device=self.device, shard=self.rank, num_shards=self.world,
                                               workers=self.cfg.workers)
        else:
            batches = data_utils.test_batches(self.test_x, self.test_y, self.cfg.eval_batch_size, self.aug,
                                              device=self.device, shard=self.rank, num_shards=self.world)
        # under torchrun the module itself, not DDP, whose forward would broadcast buffers: a collective
        # that a rank with no batch left (its images all unreadable) would never join
        net = self.net if self.world == 1 else self.model
        torch, error = self.torch, ""
        try:
            totals = test_totals(net, batches, self.device, self.cfg.channels_last, self.autocast, self.info.num_classes,
                                 criterion=self.criterion, group=self.cfg.batch_size)
        except data_utils.DataError as e:  # a run of unreadable files: under torchrun every rank stops
            if self.world == 1:
                raise
            error, totals = f"rank {self.rank}: {e}", torch.zeros(5, device=self.device, dtype=torch.float64)
        extra = ([self.folder.bad_test_images] if self.folder is not None else []) + (
            [float(bool(error))] if self.world > 1 else [])
        totals = torch.cat([totals, totals.new_tensor(extra)])  # unreadable images left out; a rank failed
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(totals)
        loss, wrong, n, wrong5, criterion_loss, *extra = totals.tolist()
        if self.world > 1 and extra.pop() > 0:
            messages = [""] * self.world
            dist.all_gather_object(messages, error)
            agreed = data_utils.DataError(next(m for m in messages if m))
            agreed.agreed = True  # every rank raises it: rank 0 reports it
            raise agreed
        self.bad_test_images = int(extra[0]) if extra else None
        if n == 0:
            raise data_utils.DataError(f"{self.cfg.dataset}: no readable test image"
                                       + (f" ({int(extra[0])} unreadable)" if extra else ""))
        self.test_criterion_loss = criterion_loss / n  # the training criterion on the test set
        return loss / n, 100.0 * wrong / n, 100.0 * wrong5 / n

    def bad_images(self):
        """Unreadable images replaced in this epoch, over all ranks and loaders (folder data; else None)."""
        if self.folder is None:
            return None
        torch = self.torch
        t = torch.tensor(float(sum(loader.bad_images for loader in self.loaders)), dtype=torch.float64,
                         device=self.device)
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(t)
        return int(t.item())


def check_data(data_dir, was, now, resume=True) -> list:
    """A folder-dataset run's checkpoint against the data found now (data_folder fingerprints):
    UsageError when the classes or the validation files differ (the labels or the test set would
    not be the run's); for a resume, notes when only the training files differ (e.g. unreadable
    ones deleted) or when the checkpoint records no data (written by an earlier version)."""
    import data_folder
    if was is None:
        return [f"note: the checkpoint records no data (an earlier version wrote it); {data_dir} is the "
                "run's data from now on"] if resume else []
    bad = data_folder.data_mismatch(was, now, ("classes", "val"))
    if bad:
        raise UsageError(f"data_dir: {data_dir} is not the data this run was trained on ({', '.join(bad)}); "
                         + ("resume with the data it started with" if resume else "--evaluate uses the run's own test set"))
    changed = data_folder.data_mismatch(was, now, ("train",)) if resume else []
    return [f"note: the training files in {data_dir} differ from the ones this run started with "
            f"({', '.join(changed)}); continuing with them"] if changed else []


def _tensors(obj):
    """Every tensor inside nested dicts, lists and tuples."""
    import torch
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
