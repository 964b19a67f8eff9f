"""AMP: adversarial model perturbation as a PyTorch optimizer.

Zheng, Zhang & Mao, "Regularizing Neural Networks via Adversarial Model Perturbation",
CVPR 2021 (arXiv 2010.04925); official code: github.com/hiyouga/AMP-Regularizer.

AMP minimises L_AMP(θ) = max_{‖Δ‖≤ε} L_B(θ + Δ) on each mini-batch B. One step, with
N = inner_iter, ζ = inner_lr, ε = epsilon:

    pass 0:            g_0 = ∇L_B(θ)                        (clean; its outputs/loss are returned)
    Δ_0 = 0
    for n = 1..N:      Δ_n = Π_ε(Δ_{n-1} + ζ·g_{n-1})      (un-normalised gradient ascent)
                       g_n = ∇L_B(θ + Δ_n)                  (pass n, same batch B)
    θ ← base_step(θ, g_N)                                   (θ restored exactly first)

so a step costs N+1 forward/backward passes (N = 0 is the plain base optimizer). Π_ε:

    ball='tensor' (default, the official code): every parameter tensor p on its own ball,
                  Δ_p ← Δ_p · min(1, ε / (‖Δ_p‖₂ + 1e-12))
    ball='global' (the paper's wording):         one ball over all parameters,
                  Δ   ← Δ   · min(1, ε / (‖Δ‖₂ + 1e-12))

Faithful details of the official code kept here: every parameter that has a gradient is
perturbed (weights, biases, BN affine); the ascent uses the raw gradient the closure leaves
(clipped there if the closure clips; the official closure clips to norm 50 in every pass);
weight decay acts only in the base step; BatchNorm running statistics are updated by every
pass (bn_update='all'). bn_update='clean' instead keeps only the clean pass's update: the
running stats of every norm layer in ``model`` are backed up before the first perturbed pass
and copied back afterwards. With model=None only 'all' is possible (buffers are untouched).

Unlike the official code, θ is restored by copying from a persistent backup (bit-exact, never
by subtraction), state_dict() carries the base optimizer's momentum, and nothing in a step
copies a value to the host (the clip factor is a clamp, norms come from torch._foreach_norm),
so a step never synchronises with the GPU. Parameters whose .grad is None are skipped.

Closure form (the seed API; the closure zeroes the gradients itself):

    optimizer = AMP(model.parameters(), lr=0.1, epsilon=0.5, momentum=0.9)
    def closure():
        optimizer.zero_grad()
        outputs = model(inputs); loss = loss_fn(outputs, targets); loss.backward()
        return outputs, loss
    outputs, loss = optimizer.step(closure)      # detached outputs/loss of the clean pass
    # a closure that returns only the loss works too: loss = optimizer.step(closure)

Two-phase form (custom loops, DDP: all-reduce happens inside backward, so Δ is the same on
every rank); step(closure) is exactly this:

    loss_fn(model(x), y).backward()              # g_0 = ∇L(θ)
    for n in range(N):
        optimizer.perturb()                      # θ ← θ + Δ_{n+1}, from the current .grad
        optimizer.zero_grad(); loss_fn(model(x), y).backward()   # g_{n+1}
    optimizer.restore()                          # θ back from the backup (and BN, if 'clean')
    optimizer.base_step()                        # base update with the last gradient

Precision: fp32 and bf16 autocast (fp32 master weights, fp32 gradients, perturbation math in
the parameters' dtype) work as they are. fp16 needs the gradients unscaled after every pass, not
once per step as torch.amp.GradScaler does (the ascent would see scaled or inf gradients); the
runner's runner/scaler.py does that in the closure and skips the base step on overflow.
"""
import math
import numbers

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["AMP"]

BALLS = ("tensor", "global")
BN_UPDATES = ("all", "clean")
_TINY = 1e-12  # the official code's guard in ε / (‖Δ‖ + 1e-12)


def _check_nonneg(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
        raise ValueError(f"AMP: {name} must be a number >= 0 and finite, got {value!r}")


def _same_tensors(a, b):
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class _Backup:
    """Persistent copies of a list of tensors, reallocated only when the list changes."""

    def __init__(self):
        self.sources, self.groups = [], []

    def save(self, tensors):
        moved = any(s[0].device != d[0].device or s[0].dtype != d[0].dtype for s, d in self.groups)
        if moved or not _same_tensors(tensors, self.sources):
            self.sources = list(tensors)
            # one fused foreach call per (device, dtype): BN buffers mix float and int64
            by_kind = {}
            for t in tensors:
                srcs, dsts = by_kind.setdefault((t.device, t.dtype), ([], []))
                srcs.append(t)
                dsts.append(torch.empty_like(t))
            self.groups = list(by_kind.values())
        for srcs, dsts in self.groups:
            torch._foreach_copy_(dsts, srcs)  # backup ← current values

    def load(self):
        for srcs, dsts in self.groups:
            torch._foreach_copy_(srcs, dsts)  # current values ← backup, bit-exact


class AMP(torch.optim.Optimizer):
    """Adversarial model perturbation wrapped around a base optimizer (see module docstring).

    Args:
        params: iterable of parameters or param-group dicts (groups may override
            ``epsilon`` and ``inner_lr``).
        lr: learning rate of the base (outer) optimizer.
        epsilon: radius ε of the perturbation ball, >= 0 (0 = the base optimizer).
        inner_lr: step size ζ of the inner gradient ascent, >= 0.
        inner_iter: number N of ascent steps, int >= 0; a step costs N+1 passes.
        base_optimizer: optimizer class for the outer step (None = torch.optim.SGD); davda54/sam's
            order, the class in lr's place, works too: ``AMP(params, torch.optim.SGD, lr=0.1, epsilon=0.5)``.
        ball: 'tensor' (one ball per parameter tensor, official) or 'global' (one ball).
        bn_update: 'all' (running stats updated by every pass, official) or 'clean'
            (only the clean pass; needs ``model``).
        model: the nn.Module whose norm-layer buffers bn_update='clean' protects.
        **kwargs: passed to ``base_optimizer`` (momentum, nesterov, weight_decay, ...).
    """

    batches_per_step = 1  # one mini-batch per step: every pass sees the same batch

    def __init__(self, params, lr=None, /, epsilon=None, inner_lr=1, inner_iter=1, base_optimizer=None,
                 *, ball="tensor", bn_update="all", model=None, **kwargs):
        lr, base_optimizer = _lr_and_base("AMP", lr, base_optimizer, kwargs)
        if epsilon is None:
            raise TypeError("AMP: missing required argument 'epsilon' (the radius of the perturbation ball)")
        _check_nonneg("epsilon", epsilon)
        _check_nonneg("inner_lr", inner_lr)
        if isinstance(inner_iter, bool) or not isinstance(inner_iter, int) or inner_iter < 0:
            raise ValueError(f"AMP: inner_iter must be an int >= 0, got {inner_iter!r}")
        if ball not in BALLS:
            raise ValueError(f"AMP: ball must be one of {'|'.join(BALLS)}, got {ball!r}")
        if bn_update not in BN_UPDATES:
            raise ValueError(f"AMP: bn_update must be one of {'|'.join(BN_UPDATES)}, got {bn_update!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"AMP: model must be an nn.Module or None, got {type(model).__name__}")
        if bn_update == "clean" and model is None:
            raise ValueError("AMP: bn_update='clean' needs model=<the nn.Module> to find its BatchNorm buffers")

        super().__init__(params, dict(lr=lr, epsilon=epsilon, inner_lr=inner_lr, **kwargs))
        for group in self.param_groups:
            _check_nonneg("epsilon", group["epsilon"])
            _check_nonneg("inner_lr", group["inner_lr"])
        self.base_optimizer = base_optimizer(self.param_groups, lr=lr, **kwargs)
        self._link_base()
        self.defaults = {**self.base_optimizer.defaults, **self.defaults}
        self.inner_iter = inner_iter
        self.ball = ball
        self.bn_update = bn_update
        self.model = model
        self._norm_layers = [m for m in model.modules() if isinstance(m, _NormBase)] if model is not None else []
        self._theta = _Backup()    # θ, persistent storage
        self._bn = _Backup()       # BN buffers after the clean pass (bn_update='clean')
        self._delta = None         # per-step scratch while θ is perturbed: [(ε, ζ, params, Δ)]

    def _link_base(self):
        # one set of groups and state: an LR scheduler on AMP drives the base optimizer
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def add_param_group(self, param_group):
        base = getattr(self, "base_optimizer", None)
        if base is None:  # during __init__
            return super().add_param_group(param_group)
        param_group.setdefault("epsilon", self.defaults["epsilon"])
        param_group.setdefault("inner_lr", self.defaults["inner_lr"])
        _check_nonneg("epsilon", param_group["epsilon"])
        _check_nonneg("inner_lr", param_group["inner_lr"])
        base.add_param_group(param_group)

    def state_dict(self):
        """The base optimizer's state (momentum buffers) and groups; AMP keeps no cross-step state."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.base_optimizer.load_state_dict(state_dict)
        self._link_base()  # load_state_dict builds new group dicts

    # ---- two-phase API ------------------------------------------------------------------
    @property
    def perturbed(self):
        """True between perturb() and restore()."""
        return self._delta is not None

    @torch.no_grad()
    def perturb(self):
        """One ascent step from the current .grad: θ + Δ_{n-1} → θ + Δ_n, Δ_n = Π_ε(Δ_{n-1} + ζ·g).

        The first call after a clean backward pass (n = 1) backs θ up (and, with
        bn_update='clean', the BN buffers); later calls continue from Δ_{n-1}.
        """
        first = self._delta is None
        if first:
            # segments of parameters sharing (ε, ζ): one foreach call each (normally just one)
            segments = {}
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    segments.setdefault((group["epsilon"], group["inner_lr"]), []).extend(params)
            if self.ball == "global" and len({eps for eps, _ in segments}) > 1:
                raise ValueError("AMP: ball='global' needs one epsilon for all param groups, "
                                 f"got {sorted({eps for eps, _ in segments})}")
            self._theta.save([p for ps in segments.values() for p in ps])          # θ̂ ← θ
            if self.bn_update == "clean":
                self._bn.save([b for m in self._norm_layers for b in m.buffers(recurse=False)])
            self._delta = [(eps, zeta, params, torch._foreach_mul([p.grad for p in params], zeta))
                           for (eps, zeta), params in segments.items()]              # Δ ← 0 + ζ·g
        else:
            for _, zeta, params, delta in self._delta:
                grads = [p.grad for p in params]
                if any(g is None for g in grads):  # lost its gradient in this pass: Δ_p unchanged
                    delta, grads = [d for d, g in zip(delta, grads) if g is not None], [g for g in grads if g is not None]
                if grads:
                    torch._foreach_add_(delta, grads, alpha=zeta)                    # Δ ← Δ + ζ·g
        self._project()
        if not first:
            self._theta.load()                                                       # θ + Δ_{n-1} → θ
        for _, _, params, delta in self._delta:
            torch._foreach_add_(params, delta)                                       # θ → θ + Δ_n

    def _project(self):
        """Δ ← Π_ε(Δ), without copying anything to the host."""
        if not self._delta:
            return
        if self.ball == "tensor":
            for eps, _, _, delta in self._delta:
                norms = torch.stack(torch._foreach_norm(delta))                      # ‖Δ_p‖
                scale = (eps / norms.add_(_TINY)).clamp_(max=1.0)                    # min(1, ε/(‖Δ_p‖+1e-12))
                torch._foreach_mul_(delta, list(scale.unbind(0)))                    # Δ_p ← Δ_p·scale_p
        else:
            eps = self._delta[0][0]
            norms = [n for *_, delta in self._delta for n in torch._foreach_norm(delta)]
            total = torch.linalg.vector_norm(torch.stack(norms))                     # ‖Δ‖ over all tensors
            scale = (eps / total.add_(_TINY)).clamp_(max=1.0)                        # min(1, ε/(‖Δ‖+1e-12))
            for *_, delta in self._delta:
                torch._foreach_mul_(delta, scale)                                    # Δ ← Δ·scale

    @torch.no_grad()
    def restore(self):
        """θ + Δ → θ by copying the backup (bit-exact); BN buffers too with bn_update='clean'."""
        if self._delta is None:
            return
        self._theta.load()                                                           # θ ← θ̂
        if self.bn_update == "clean":
            self._bn.load()
        self._delta = None

    def base_step(self):
        """The outer update θ ← base_step(θ, .grad); restores θ first if still perturbed."""
        self.restore()
        self.base_optimizer.step()

    # ---- closure API ----------------------------------------------------------------------
    def step(self, closure=None):
        """N+1 forward/backward passes, then the base step. Returns what the clean pass's closure
        returned, detached: (outputs, loss), or the loss of a closure that returns only the loss."""
        if closure is None:
            raise ValueError("AMP: step() needs a closure that zeroes grads, runs forward+backward "
                             "and returns (outputs, loss)")
        closure = torch.enable_grad()(closure)
        clean = _detach(closure())                 # pass 0 at θ: g_0
        try:
            for _ in range(self.inner_iter):
                self.perturb()                     # θ + Δ_n from g_{n-1}
                closure()                          # pass n: g_n = ∇L(θ + Δ_n)
        except BaseException:
            self.restore()                         # never leave θ perturbed behind an error
            raise
        self.base_step()                           # restore θ, then θ ← base_step(θ, g_N)
        return clean


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


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(v.detach() if isinstance(v, torch.Tensor) else v for v in value)
    return value
