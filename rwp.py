r"""RWP: random weight perturbation, with the ARWP / m-ARWP noise options.

Papers: Li et al., "Efficient Generalization Improvement Guided by Random Weight Perturbation",
arXiv 2211.11489 (RWP); Li et al., "Revisiting Random Weight Perturbation for Efficiently Improving
Generalization", TMLR 2024, arXiv 2404.00357 (m-RWP, ARWP, m-ARWP).
Official code: github.com/nblt/RWP (train_rwp_parallel.py), github.com/nblt/mARWP (train_marwp.py,
train_mrwp_parallel.py, train_rwp_cos.py, utils.ARWP).

Objective (α = ``alpha``):   L(θ) = α·E_ε[L(θ+ε)] + (1−α)·L(θ).   One step t:

    z ~ N(0, I)                                     fresh every step (own torch.Generator)
    ε_{p,i} = σ_{p,i} · z_{p,i}                     per parameter tensor p, per row i
    σ_{p,i} = σ_t·‖W_{p,i}‖                         p with ≥2 dims, row i = output filter (dim 0)
    σ_p     = σ_t·(‖p‖ + 1e-16)                     p with ≤1 dim (BN weight/bias, biases)
    g  = α·∇L_{B1}(θ+ε) + (1−α)·∇L_{B0}(θ)         B1, B0: two mini-batches (or one, see modes)
    θ ← base_step(θ, g)                             θ restored exactly before the step

    σ_t = γ                                          (gamma_final None)
    σ_t = γ + (γ_final − γ)·(1 − cos(π·t/T))/2       (gamma_final set; T = total_steps, t = steps done)

ARWP noise shaping (``arwp=True``), with g1 the gradient of the perturbed pass:

    s_p ← β·s_p + g1_p²                             no (1−β) factor; s_p = 0 before the first step
    F_{p,i} = Σ_{row i} s_p                         ≤1-dim p: per element, F_{p,j} = s_{p,j}
    σ_{p,i} ← σ_{p,i} / sqrt(1 + η·F_{p,i})         η = arwp_eta, β = arwp_beta

Names of the papers' variants in this API:
    RWP     alpha=0.5, gamma=0.01, two_batches=True (or parallel=True under torchrun)
    m-RWP   the same objective, gamma=0.015 (the TMLR paper's σ, λ=alpha=0.5)
    ARWP    arwp=True, alpha=1 (one gradient per step, at θ+ε), gamma=0.001, gamma_final=0.011
    m-ARWP  arwp=True, alpha=0.5, gamma=0.015, two_batches=True

Modes (chosen at construction; the runner reads ``batches_per_step`` and ``rank_group``):
    sequential, one batch  (two_batches=False, the constructor default: drop-in like AMP/SAM)
        closure() is called twice on the same batch: first at θ+ε, then at θ.
    sequential, two batches (two_batches=True; what the runner and the official code use)
        closure(batch=1) at θ+ε, then closure(batch=0) at θ; ``batches_per_step == 2``, so an
        "epoch" of N/B optimizer steps reads the data twice and keeps SGD's number of steps.
    single pass  (alpha == 1 or alpha == 0, sequential): only the perturbed (α=1, ARWP) or only
        the clean (α=0, plain base optimizer) pass runs; ``batches_per_step == 1``.
    parallel  (parallel=True under torch.distributed, even world size N, model wrapped in
        DistributedDataParallel): odd ranks compute closure(loss_weight=2α) at θ+ε, even ranks
        closure(loss_weight=2(1−α)) at θ; DDP's gradient average is exactly α·g1 + (1−α)·g0.
        ``batches_per_step == 1``, ``rank_group == (rank % 2, 2)``: the two rank groups read the
        data independently, so the terms see different batches. Odd N raises ValueError. With one
        process (not initialised, or world size 1) parallel=True falls back to the sequential
        two-batch mode with a warning (the official scripts, launched as their recipes do, run one
        process as rank 0, a clean rank: plain SGD, silently; see below).
    A closure returns (outputs, loss) or the loss alone; step returns that value of the clean pass (at θ),
    detached. Where a
    process runs no clean pass (α=1; perturbed ranks in parallel mode) it returns the perturbed
    pass's value; ``returns_clean`` says which.

BatchNorm running statistics (``bn_update``, needs ``model=`` for 'clean'):
    'clean'  only the pass at θ changes them: BN buffers are backed up before the perturbed pass and
             copied back exactly after it (official: the clean rank's buffers win under DDP;
             train_marwp.py sets BN momentum to 0 in the perturbed pass).
    'all'    every forward pass updates them (official ARWP, whose only pass is perturbed).
    'auto'   (default) 'clean' when a model is given and a clean pass exists, else 'all'. With
             model=None the optimizer cannot see the BN buffers, so 'auto' means 'all' and an
             explicit 'clean' raises ValueError.

Noise stream: at step t, process rank r seeds its generator (on the parameters' device) with
``noise_seed(seed, r, t)`` and fills one standard-normal vector per parameter dtype (parameters in
param_groups order, all elements of each tensor in its logical row-major order). The noise is thus a
pure function of (seed, rank, t): ``state_dict`` stores the step count t (plus the base optimizer's
state and the ARWP accumulators) and that fixes the generator state, so a resumed run draws exactly
the noise of an uninterrupted one on every rank, although under torchrun only rank 0 writes the
checkpoint. Each perturbed rank draws different noise (the official RWP code drew the same noise on
every perturbed rank).

Verified in the official code (behaviour, not code, carried over):
  * Noise: ≥2-D tensors N(0, (γ‖W_i‖)²) per element with ‖W_i‖ the norm of the whole row
    W.view(out, -1); 1-D tensors N(0, (γ(‖p‖+1e-16))²); every parameter is perturbed, the weights
    go back before ``optimizer.step()``; weight decay acts in the base step at θ only.
  * Parallel RWP (nblt/RWP train_rwp_parallel.py): rank % 2 == 1 perturbs and scales its loss by
    2α, the other ranks scale the clean loss by 2(1−α), DDP averages. One GPU = plain SGD (not here)
    where the one process is rank 0: train_rwp_parallel.py under its launcher, train_rwp_imagenet.py
    with its recipe's flags (--multiprocessing-distributed --world-size 1 --rank 0). Run without
    --multiprocessing-distributed, train_rwp_imagenet.py keeps --rank -1 and (−1) % 2 == 1 makes its
    one process a perturbed rank: every step the perturbed gradient alone, weighted 2α.
  * Epoch accounting: both official scripts double ``epochs`` and step CosineAnnealingLR(T_max =
    2·epochs) once per loader pass, where a loader pass is half a nominal epoch of optimizer steps
    (DistributedSampler halves the data per rank; train_marwp.py consumes two loader batches per
    step): the optimizer makes SGD's number of steps, the LR changes every half epoch
    (lr_updates_per_epoch 2), data passes are 2× SGD's.
  * ARWP (mARWP utils.ARWP, train_rwp_cos.py): one forward/backward per step at θ+ε, base step with
    that gradient; accumulator s ← β·s + g² from that perturbed gradient (first step: s = g², i.e.
    s_0 = 0 and no shaping); F = s.view(out, -1).sum(1), which for a 1-D tensor is per element;
    σ_t from CosineInc: σ(t) = 0.001·(1 + 10·(1−cos(πt/T))/2), t = optimizer steps taken, T = epochs ×
    steps per epoch, i.e. 0.001 → 0.011; BN statistics from the perturbed pass; LR cosine per step.
  * m-ARWP (train_marwp.py): clean batch then perturbed batch, g = λ·g1 + (1−λ)·g0, the accumulator
    takes the unscaled perturbed gradient g1; scripts use σ 0.015, λ 0.5, η 0.1, β 0.99 and a constant
    σ (its optional --incstd schedule starts from the weight-decay value, not reproduced).
  Not reproduced: restoring by subtraction, one ``.item()`` per 1-D tensor, the ε of 1e-16 added to σ
  (instead of ‖p‖) for ≥2-D tensors in utils.ARWP, which would make γ=0 inexact.

Two-phase API for custom loops: ``perturb()`` (θ ← θ+ε), backward at θ+ε, ``restore()`` (θ ← θ
exactly, BN buffers back, perturbed gradient recorded), then the clean backward (if any) and
``base_step()`` (mix and base optimizer step). ``step(closure)`` is built on it.
"""
import math
import warnings

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

_MASK64 = (1 << 64) - 1
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _splitmix64(x):
    """One round of the SplitMix64 mixer (Steele et al. 2014) on a Python int."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_seed(seed, rank, step):
    """Generator seed (63 bits) for the noise of optimizer step ``step`` on process ``rank``."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (rank & _MASK64))
    h = _splitmix64(h ^ (step & _MASK64))
    return h >> 1


def _dist_rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RWP(torch.optim.Optimizer):
    """Random weight perturbation around a base optimizer (see the module docstring for the math).

    Args:
        params: parameters or param groups (a group may set its own ``gamma`` / ``gamma_final``).
        lr: learning rate of the base optimizer.
        gamma: noise scale γ (σ_t at t=0), ≥ 0; γ=0 gives the base optimizer's update on the mix.
        alpha: weight α of the perturbed term, in [0, 1]; 1 = perturbed gradient only, 0 = base.
        base_optimizer: optimizer class wrapped, built as ``base_optimizer(param_groups, lr=lr, **kwargs)``
            (None = torch.optim.SGD); davda54/sam's order, the class in lr's place, works too.
        two_batches: True = perturbed term on closure(batch=1), clean on closure(batch=0)
            (``batches_per_step`` 2; the official behaviour); False (default) = both on closure().
        parallel: split the two terms over even/odd ranks under torch.distributed (see the module
            docstring).
        bn_update: 'auto' | 'clean' | 'all' (see the module docstring).
        model: the nn.Module whose BatchNorm buffers the 'clean' policy protects.
        seed: noise seed (int); the stream is ``noise_seed(seed, rank, step)``.
        arwp: shape the noise with the ARWP accumulator; arwp_eta η ≥ 0, arwp_beta β in [0, 1].
        gamma_final: None = constant γ; else σ_t follows a cosine from gamma to gamma_final over
            ``total_steps`` optimizer steps (then stays there). ``total_steps`` may also be set as
            an attribute after construction, before the first step (a loop that learns its steps
            per epoch from ``batches_per_step`` builds the optimizer first); missing, the first
            step raises ValueError.
        **kwargs: passed to the base optimizer (momentum, nesterov, weight_decay, ...).

    Attributes for a training loop: ``batches_per_step`` (1 or 2), ``rank_group`` ((group, groups)),
    ``loss_weight`` (what this rank's closure is given), ``returns_clean`` (step returns the pass at
    θ), ``parallel`` (parallel mode active), ``bn_update`` (resolved policy), ``step_count``.
    """

    def __init__(self, params, lr=None, /, gamma=0.01, alpha=0.5, base_optimizer=None, *,
                 two_batches=False, parallel=False, bn_update="auto", model=None, seed=0,
                 arwp=False, arwp_eta=0.1, arwp_beta=0.99, gamma_final=None, total_steps=None,
                 **kwargs):
        lr, base_optimizer = _lr_and_base("RWP", lr, base_optimizer, kwargs)
        _check_range("gamma", gamma, 0.0, math.inf, "a float >= 0")
        _check_range("alpha", alpha, 0.0, 1.0, "a float in [0, 1]")
        _check_range("arwp_eta", arwp_eta, 0.0, math.inf, "a float >= 0")
        _check_range("arwp_beta", arwp_beta, 0.0, 1.0, "a float in [0, 1]")
        if gamma_final is not None:
            _check_range("gamma_final", gamma_final, 0.0, math.inf, "null or a float >= 0")
        if total_steps is not None:
            _check_total_steps(total_steps)
        if bn_update not in ("auto", "all", "clean"):
            raise ValueError(f"bn_update must be one of 'auto', 'all', 'clean', got {bn_update!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")

        defaults = dict(lr=lr, gamma=gamma, gamma_final=gamma_final, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, lr=lr, **kwargs)
        self.param_groups = self.base_optimizer.param_groups  # shared: schedulers drive the base
        self.defaults.update(self.base_optimizer.defaults)

        self.alpha = float(alpha)
        self.arwp = bool(arwp)
        self.arwp_eta = float(arwp_eta)
        self.arwp_beta = float(arwp_beta)
        self.total_steps = total_steps
        self.seed = seed
        self.step_count = 0  # optimizer steps taken (t); fixes the noise stream and σ_t

        self.rank, world = _dist_rank_world()
        self.parallel = bool(parallel) and world > 1
        if parallel and world == 1:
            warnings.warn("RWP(parallel=True) in a single process: running the perturbed and clean "
                          "passes one after the other on two batches (batches_per_step=2)",
                          stacklevel=2)
            two_batches = True
        if self.parallel:
            if world % 2:
                raise ValueError(f"parallel=True needs an even number of processes (half compute "
                                 f"the clean term, half the perturbed one), got world size {world}")
            if self.arwp:
                raise ValueError("arwp=True needs each rank's own perturbed gradient for its "
                                 "accumulator, which DDP averages away: use parallel=False")
            self.perturbed_pass = self.rank % 2 == 1
            self.clean_pass = not self.perturbed_pass
            self.loss_weight = 2 * self.alpha if self.perturbed_pass else 2 * (1 - self.alpha)
            self.rank_group = (self.rank % 2, 2)
            self.batches_per_step = 1
            any_clean_pass = True
        else:
            self.perturbed_pass = self.alpha > 0
            self.clean_pass = self.alpha < 1
            self.loss_weight = 1.0
            self.rank_group = (0, 1)
            both = self.perturbed_pass and self.clean_pass
            self.batches_per_step = 2 if (two_batches and both) else 1
            any_clean_pass = self.clean_pass
        self.returns_clean = self.clean_pass
        self._mixes = not self.parallel and self.perturbed_pass and self.clean_pass

        if bn_update == "clean" and model is None:
            raise ValueError("bn_update='clean' needs model= (the module whose BatchNorm buffers "
                             "are protected); pass model or use bn_update='all'")
        if bn_update == "clean" and not any_clean_pass:
            raise ValueError("bn_update='clean' with alpha=1 would freeze BatchNorm statistics (no "
                             "pass at the unperturbed weights); use bn_update='all' or 'auto'")
        if bn_update == "auto":
            bn_update = "clean" if (model is not None and any_clean_pass) else "all"
        self.bn_update = bn_update
        self._bn_modules = ([m for m in model.modules() if isinstance(m, _BatchNorm)]
                            if model is not None else [])

        devices = {p.device for p in self._params()}
        if len(devices) != 1:
            raise ValueError(f"RWP needs all parameters on one device, got {sorted(map(str, devices))}")
        self.generator = torch.Generator(device=devices.pop())

        self._scratch = None     # per-step buffers (never in state_dict)
        self._stashed = None     # which parameters had a perturbed gradient stashed
        self._bn_backup = None
        self._perturbed = False  # between perturb() and restore()

    # ---------------------------------------------------------------- helpers
    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    def _sigmas(self):
        """σ_t of every parameter (Python floats: no tensor, no sync)."""
        out = []
        for group in self.param_groups:
            gamma, final = group["gamma"], group["gamma_final"]
            sigma = gamma
            if final is not None:
                _check_total_steps(self.total_steps)
                t = min(self.step_count, self.total_steps)
                sigma = gamma + (final - gamma) * (1 - math.cos(math.pi * t / self.total_steps)) / 2
            out.extend([sigma] * len(group["params"]))
        return out

    def _get_scratch(self, params):
        key = [(id(p), p.device, p.dtype, p.shape) for p in params]
        if self._scratch is None or self._scratch["key"] != key:
            order = {}  # dtype -> parameter indices, in order of first appearance
            for i, p in enumerate(params):
                order.setdefault(p.dtype, []).append(i)
            flats, views = [], [None] * len(params)
            for dtype, idx in order.items():
                flat = torch.empty(sum(params[i].numel() for i in idx), dtype=dtype,
                                   device=params[idx[0]].device)
                offset = 0
                for i in idx:
                    n = params[i].numel()
                    views[i] = flat[offset:offset + n].view(params[i].shape)
                    offset += n
                flats.append(flat)
            self._scratch = dict(key=key, flats=flats, views=views,
                                 backup=[torch.empty_like(p) for p in params])
        return self._scratch

    def _bn_buffers(self):
        return [b for m in self._bn_modules for b in (getattr(m, n, None) for n in _BN_BUFFERS)
                if b is not None]

    def _accumulator(self, p):
        state = self.state[p]
        if "arwp_s" not in state:
            state["arwp_s"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["arwp_s"]

    def _noise_std(self, params):
        """σ_{p,i} as tensors broadcastable to each p (rows of ≥2-D tensors, scalars otherwise)."""
        sigmas = self._sigmas()
        stds = [None] * len(params)
        low = [i for i, p in enumerate(params) if p.dim() < 2]
        if low:
            norms = torch._foreach_norm([params[i] for i in low])      # ‖p‖
            torch._foreach_add_(norms, 1e-16)                           # ‖p‖ + 1e-16
            torch._foreach_mul_(norms, [sigmas[i] for i in low])        # σ_t(‖p‖ + 1e-16)
            for i, n in zip(low, norms):
                stds[i] = n
        for i, p in enumerate(params):
            if p.dim() >= 2:                                            # σ_t‖W_i‖, shape (out, 1, ...)
                dims = tuple(range(1, p.dim()))
                stds[i] = torch.linalg.vector_norm(p, dim=dims, keepdim=True).mul_(sigmas[i])
        if self.arwp:
            fisher = []                                                 # F_{p,i} = Σ_row s
            for p in params:
                s = self._accumulator(p)
                fisher.append(s.sum(dim=tuple(range(1, s.dim())), keepdim=True) if s.dim() >= 2
                              else s.clone())
            torch._foreach_mul_(fisher, self.arwp_eta)
            torch._foreach_add_(fisher, 1.0)
            torch._foreach_sqrt_(fisher)                                # sqrt(1 + η F)
            stds = torch._foreach_div(stds, fisher)
        return stds

    # ---------------------------------------------------------------- two-phase API
    @torch.no_grad()
    def perturb(self):
        """θ ← θ + ε with fresh noise; backs up θ (and BN buffers under bn_update='clean')."""
        if self._perturbed:
            raise RuntimeError("RWP.perturb() called twice without restore()")
        params = self._params()
        scratch = self._get_scratch(params)
        if self.bn_update == "clean":
            buffers = self._bn_buffers()
            if self._bn_backup is None or len(self._bn_backup) != len(buffers) or any(
                    a.shape != b.shape or a.device != b.device for a, b in zip(self._bn_backup, buffers)):
                self._bn_backup = [torch.empty_like(b) for b in buffers]
            if buffers:
                torch._foreach_copy_(self._bn_backup, buffers)
        torch._foreach_copy_(scratch["backup"], params)                 # θ̄ ← θ
        self.generator.manual_seed(noise_seed(self.seed, self.rank, self.step_count))
        for flat in scratch["flats"]:
            flat.normal_(generator=self.generator)                     # z ~ N(0, I)
        torch._foreach_mul_(scratch["views"], self._noise_std(params))  # ε = σ ⊙ z
        torch._foreach_add_(params, scratch["views"])                   # θ ← θ + ε
        self._perturbed = True

    @torch.no_grad()
    def restore(self):
        """θ ← θ̄ exactly and BN buffers back; records the perturbed gradient g1 (ARWP accumulator,
        and the stash mixed by base_step() when a clean pass follows)."""
        if not self._perturbed:
            raise RuntimeError("RWP.restore() called without perturb()")
        self._perturbed = False
        params = self._params()
        scratch = self._scratch
        torch._foreach_copy_(params, scratch["backup"])                 # θ ← θ̄
        if self.bn_update == "clean" and self._bn_backup:
            torch._foreach_copy_(self._bn_buffers(), self._bn_backup)
        have = [p.grad is not None for p in params]
        grads = [p.grad for p in params if p.grad is not None]
        if self.arwp and grads:                                         # s ← β s + g1²
            acc = [self._accumulator(p) for p in params if p.grad is not None]
            torch._foreach_mul_(acc, self.arwp_beta)
            torch._foreach_addcmul_(acc, grads, grads)
        if self._mixes:                                                 # stash g1 (noise buffer reused)
            if grads:
                torch._foreach_copy_([v for v, h in zip(scratch["views"], have) if h], grads)
            self._stashed = have

    @torch.no_grad()
    def base_step(self):
        """g ← α·g1 + (1−α)·g0 when a perturbed gradient is stashed, then the base optimizer step."""
        if self._stashed is not None:
            both_g, both_s, clean_only = [], [], []
            for p, stash, had in zip(self._params(), self._scratch["views"], self._stashed):
                if had and p.grad is not None:
                    both_g.append(p.grad)
                    both_s.append(stash)
                elif had:                                               # unused in the clean pass
                    p.grad = stash.mul(self.alpha)
                elif p.grad is not None:                                # unused in the perturbed pass
                    clean_only.append(p.grad)
            if both_g:
                torch._foreach_lerp_(both_g, both_s, self.alpha)        # g0 + α(g1 − g0)
            if clean_only:
                torch._foreach_mul_(clean_only, 1 - self.alpha)
            self._stashed = None
        self.base_optimizer.step()
        self.step_count += 1

    @torch.no_grad()
    def step(self, closure=None):
        """One RWP step. ``closure(batch=0, loss_weight=1.0)`` zeroes the gradients, runs forward
        and backward on (loss·loss_weight) and returns (outputs, loss) or the loss alone."""
        if closure is None:
            raise ValueError("RWP.step needs a closure (or use perturb()/restore()/base_step())")
        closure = torch.enable_grad()(closure)
        if self.parallel:
            if self.perturbed_pass:
                self.perturb()
                try:
                    result = closure(loss_weight=self.loss_weight)     # 2α·L_B(θ+ε)
                finally:
                    self.restore()
            else:
                result = closure(loss_weight=self.loss_weight)         # 2(1−α)·L_B(θ)
            self.base_step()
            return _detached(result)
        two = self.batches_per_step == 2
        result = None
        if self.perturbed_pass:
            self.perturb()
            try:
                result = closure(batch=1) if two else closure()         # ∇L_{B1}(θ+ε)
            finally:
                self.restore()                                          # θ back even on error
        if self.clean_pass:
            result = closure(batch=0) if two else closure()             # ∇L_{B0}(θ)
        self.base_step()
        return _detached(result)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self):
        """Base optimizer state (momentum), ARWP accumulators, step count and noise seed."""
        state = super().state_dict()
        state["base_optimizer"] = self.base_optimizer.state_dict()
        state["rwp"] = {"step_count": self.step_count, "seed": self.seed}
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        try:
            base = state_dict.pop("base_optimizer")
            extra = state_dict.pop("rwp")
        except KeyError as err:
            raise ValueError(f"not an RWP optimizer state_dict (missing {err})") from None
        self.base_optimizer.load_state_dict(base)
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups  # share the groups again
        self.step_count = int(extra["step_count"])
        self.seed = int(extra["seed"])
        self._scratch = None
        self._stashed = None


def _lr_and_base(name, lr, base_optimizer, kwargs):
    """(lr, base optimizer class) from ``OPT(params, lr, ...)``, ``OPT(params, lr=...)`` or the
    davda54/sam habit ``OPT(params, torch.optim.SGD, lr=...)`` (the base optimizer class in lr's place)."""
    if isinstance(lr, type):
        if base_optimizer is not None:
            raise TypeError(f"{name}: two base optimizers given ({lr.__name__} in lr's place and base_optimizer=)")
        lr, base_optimizer = kwargs.pop("lr", None), lr
    elif "lr" in kwargs:
        if lr is not None:
            raise TypeError(f"{name}: got multiple values for argument 'lr'")
        lr = kwargs.pop("lr")
    if lr is None:
        raise TypeError(f"{name}: missing required argument 'lr' (the base optimizer's learning rate)")
    if isinstance(lr, (int, float)) and not math.isfinite(lr):  # (torch.optim.SGD itself takes nan and inf)
        raise ValueError(f"{name}: lr must be a finite number, got {lr!r}")
    base_optimizer = torch.optim.SGD if base_optimizer is None else base_optimizer
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        got = (f"an instance of {type(base_optimizer).__name__}" if isinstance(base_optimizer, torch.optim.Optimizer)
               else repr(base_optimizer)[:80])
        raise ValueError(f"{name}: base_optimizer must be a torch.optim.Optimizer subclass (the class, "
                         f"e.g. torch.optim.SGD), got {got}")
    return lr, base_optimizer


def _check_total_steps(total_steps):
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1 when gamma_final is set (the length of "
                         f"the gamma schedule in optimizer steps), got {total_steps!r}")


def _check_range(name, value, low, high, allowed):
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and low <= value <= high)
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _detached(value):
    """The closure's (outputs, loss), detached: the caller gets values, not the autograd graph."""
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value.detach() if isinstance(value, torch.Tensor) else value
