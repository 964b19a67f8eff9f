r"""SAM and ASAM: sharpness-aware minimisation as a wrapper around a base optimizer.

SAM (Foret, Kleiner, Mobahi, Neyshabur; ICLR 2021; arXiv 2010.01412) minimises
max_{‖ε‖₂≤ρ} L_B(θ+ε) on each mini-batch B with one first-order ascent step:

    g   = ∇L_B(θ)                                   # clean pass (outputs/loss returned)
    ε̂   = ρ · g / (‖g‖₂ + δ)                         # ONE global norm over all parameters
    θ   ← base_step(∇L_B(θ + ε̂))                     # same batch B, weights restored first

ASAM (Kwon, Kim, Park, Choi; ICML 2021; arXiv 2102.11600) makes the ball adaptive with the
element-wise operator T = |w| + η:

    ε̂   = ρ · T² g / (‖T g‖₂ + δ)

T = |w| + η for "weight" parameters and T = 1 for every other parameter (biases, BN shifts),
exactly as the official code (SamsungLabs/ASAM, asam.py) decides it: by whether the parameter's
name contains "weight" (so BatchNorm weights ARE scaled). The names come from ``model``; with
no ``model`` the rule falls back to "tensors with ≥ 2 dims are weights". A parameter group with
``adaptive_all=True`` scales every parameter by T; with ``eta=0`` that is davda54/sam's ASAM
(sam.py at 3c3afdb: T = |p| for every p).

m-sharpness (SAM paper, Section 4.1): ε̂ computed per sub-batch of m examples and the perturbed
gradients averaged; see ``step(closure, parts=K)``. In the SAM code this is what data parallelism
does (each accelerator perturbs with its own sub-batch gradient; google-research/sam at dae9904,
sam_jax/training_utils/flax_training.py, ``sync_perturbations`` False by default). BatchNorm running
statistics then get one update per step, the sub-batches' results averaged, as the accelerators'
running averages are averaged there (``step``'s docstring).

Random draws (``shared_draws=True``): the SAM code runs both passes of a step under one PRNG key, so
the perturbed pass sees the clean pass's dropout masks and Shake-Shake forward gates, and its ascent
pass asks Shake-Shake for the true gradient (backward through the forward gate; google-research/sam
at dae9904, flax_training.py ``forward_and_loss(m, true_gradient=True)``, models/utils.py
``shake_shake_train``). Here: torch's RNG state (CPU and the parameters' CUDA devices) is saved before
each clean pass and put back before its perturbed pass, and modules with a ``true_gradient``
attribute (models.samwrn.ShakeShakeBlock) have it set during the clean pass. Off (default): every pass
draws afresh.

δ = 1e-12 keeps the step free of host syncs (no branch on ‖g‖ = 0) and makes ρ = 0 give ε̂ = 0
exactly, so ρ = 0 reproduces the base optimizer bit for bit (parameters always; BatchNorm
buffers too under ``bn_update='clean'``, while ``'all'`` lets them see both passes).

Faithful details (google-research/sam, sam_jax/training_utils/flax_training.py):
- BatchNorm: the official step keeps the model state of the *clean* pass and drops the state
  of the perturbed pass, so ``bn_update='clean'`` is the faithful default (running stats are
  backed up before the perturbed pass and restored exactly afterwards). ``'all'`` lets both
  passes update them (what most PyTorch ports do without saying so).
- Data parallel: each replica perturbs with its own sub-batch gradient (``sync_perturbations``
  defaults to False); only the second gradient is averaged. Here: the clean pass runs inside
  ``no_sync()`` (a DDP model's, or a factory passed as ``no_sync=``).
- Base optimizer: momentum 0.9 with Nesterov; gradient clipped to global norm 5 *after* the
  second pass. SAM's and ASAM's ε̂ are invariant to a rescaling of g, so a closure that also
  clips the clean pass's gradient gives the same ε̂.
Weight decay: the official code adds ½·λ‖θ‖² to the loss, so the decay enters ε̂, is evaluated at
θ+ε̂ and is clipped with the gradient; with a PyTorch base optimizer (``weight_decay=``) it is
applied at θ in the base step only, as in the PyTorch SAM/ASAM code (davda54/sam, SamsungLabs/ASAM).
The runner offers both (``weight_decay_in_loss``; its closure adds the term).

Unlike common ports: weights come back by copy from a persistent backup (never by subtraction
or ``p.data =``); ``state_dict()`` is the base optimizer's (momentum survives a checkpoint);
an LR scheduler on the wrapper drives the base optimizer; no host sync inside ``step``.
"""
import contextlib
import math

import torch
from torch.nn.modules.batchnorm import _NormBase

BN_UPDATES = ("all", "clean")
_DELTA = 1e-12  # δ in ρ·g/(‖g‖+δ)


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation (``adaptive=False``) or ASAM (``adaptive=True``).

    Args:
        params: parameters or parameter groups (groups may set their own ``rho``/``adaptive``/``eta``).
        lr: learning rate of the base optimizer.
        rho: radius ρ ≥ 0 of the perturbation ball (SAM paper: 0.05 CIFAR-10, 0.1 CIFAR-100;
            ASAM paper: 0.5 / 1.0).
        base_optimizer: ``torch.optim.Optimizer`` subclass doing the update; gets ``lr`` and ``**kwargs``
            (None = torch.optim.SGD). davda54/sam's order, the class in lr's place, works too:
            ``SAM(params, torch.optim.SGD, lr=0.1, rho=0.05, momentum=0.9)``.
        adaptive: ASAM's adaptive ball T = |w| + η.
        eta: η ≥ 0 of ASAM (official 0.01).
        bn_update: ``'clean'`` (only the clean pass changes BatchNorm running stats; the official
            behaviour) or ``'all'``; ``None`` = ``'clean'`` when ``model`` is given, else ``'all'``
            (with no model there are no buffers to restore).
        model: the ``nn.Module`` being trained (plain or DDP-wrapped): source of BN buffers, of
            the parameter names ASAM needs, and of ``no_sync`` when it has one.
        no_sync: optional factory of a context manager in which the clean pass runs without
            gradient all-reduce (e.g. ``ddp_model.no_sync``). Default: ``model.no_sync`` if the
            model has it, else none.
        shared_draws: the perturbed pass replays the clean pass's random draws and Shake-Shake's
            clean pass takes the true gradient, as the SAM code (module docstring); default off.
        **kwargs: passed to ``base_optimizer`` (momentum, nesterov, weight_decay, ...).

    ``outputs, loss = opt.step(closure)`` returns what the clean pass's closure returned, detached:
    (outputs, loss), or the loss alone for a closure that returns only the loss (``loss = opt.step(closure)``).
    Two-phase form for custom loops: ``perturb()`` (ε̂ from the current ``.grad``) →
    backward at θ+ε̂ → ``restore()`` → ``base_step()``; ``first_step``/``second_step`` are the
    same in the naming of davda54/sam.
    """

    def __init__(self, params, lr=None, /, rho=0.05, base_optimizer=None, *, adaptive=False,
                 eta=0.01, bn_update=None, model=None, no_sync=None, shared_draws=False, **kwargs):
        lr, base_optimizer = _lr_and_base("SAM", lr, base_optimizer, kwargs)
        _check_nonneg("rho", rho)
        _check_nonneg("eta", eta)
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be True or False, got {adaptive!r}")
        if not isinstance(shared_draws, bool):
            raise ValueError(f"shared_draws must be True or False, got {shared_draws!r}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise ValueError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        if bn_update is None:
            bn_update = "all" if model is None else "clean"
        if bn_update not in BN_UPDATES:
            raise ValueError(f"bn_update must be one of {', '.join(BN_UPDATES)}, got {bn_update!r}")
        if bn_update == "clean" and model is None:
            raise ValueError("bn_update='clean' needs model= (the module whose BatchNorm buffers to restore)")
        if no_sync is None and model is not None and callable(getattr(model, "no_sync", None)):
            no_sync = model.no_sync
        if no_sync is not None and not callable(no_sync):
            raise ValueError(f"no_sync must be a callable returning a context manager, got {no_sync!r}")

        super().__init__(params, dict(lr=lr, rho=rho, adaptive=adaptive, eta=eta))
        self.base_optimizer = base_optimizer(self.param_groups, lr=lr, **kwargs)
        self.param_groups = self.base_optimizer.param_groups  # shared: schedulers drive the base
        self.state = self.base_optimizer.state  # state_dict() = the base optimizer's (momentum)
        self.defaults.update(self.base_optimizer.defaults)

        self.bn_update = bn_update
        self._no_sync = no_sync
        # Parameters ASAM scales by T = |w|+η: official rule, "weight" in the parameter's name.
        self._names = {} if model is None else {p: n for n, p in model.named_parameters()}
        self._bn_buffers = [] if model is None else [
            b for m in model.modules() if isinstance(m, _NormBase) for b in m.buffers(recurse=False)]
        self._backup = {}  # p → persistent copy of θ (scratch, never in state_dict)
        self._bn_backup = None  # persistent copies of BN buffers (scratch)
        self.shared_draws = shared_draws
        self._true_gradient = [] if model is None else [m for m in model.modules() if hasattr(m, "true_gradient")]
        self._perturbed = None  # list of params moved by perturb(), None when at θ

    def add_param_group(self, param_group):
        base = getattr(self, "base_optimizer", None)
        if base is None:  # during Optimizer.__init__
            return super().add_param_group(param_group)
        for key in ("rho", "adaptive", "eta"):
            param_group.setdefault(key, self.defaults[key])
        _check_nonneg("rho", param_group["rho"])
        _check_nonneg("eta", param_group["eta"])
        base.add_param_group(param_group)

    def _is_weight(self, p):
        name = self._names.get(p)
        if name is None:
            return p.dim() >= 2
        return "weight" in name.rsplit(".", 1)[-1]

    @torch.no_grad()
    def perturb(self):
        """θ ← θ + ε̂ from the gradients now in ``.grad`` (the clean pass); backs up θ (and BN
        buffers under bn_update='clean'). Parameters whose grad is None are left alone."""
        if self._perturbed is not None:
            raise RuntimeError("perturb() called twice without restore()")
        if self.bn_update == "clean" and self._bn_buffers:  # running stats as after the clean pass
            if self._bn_backup is None:
                self._bn_backup = [torch.empty_like(b) for b in self._bn_buffers]
            torch._foreach_copy_(self._bn_backup, self._bn_buffers)
        # Per group: (ρ, T-scaled params, T, T g, T=1 params).
        parts, norm_terms = [], []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            ws, ones = [], []  # T = |w|+η / T = 1
            for p in ps:
                (ws if group["adaptive"] and (group.get("adaptive_all") or self._is_weight(p)) else ones).append(p)
            t, tg = [], []
            if ws:
                t = torch._foreach_abs(ws)
                torch._foreach_add_(t, group["eta"])  # T = |w| + η
                tg = torch._foreach_mul(t, [p.grad for p in ws])  # T g
                norm_terms += torch._foreach_norm(tg)
            if ones:
                norm_terms += torch._foreach_norm([p.grad for p in ones])  # T = 1
            parts.append((group["rho"], ws, t, tg, ones))
        if not parts:
            self._perturbed = []
            return
        # ‖T g‖ over all parameters, accumulated in at least fp32 on the first parameter's device.
        device = norm_terms[0].device
        dtype = torch.float64 if any(n.dtype == torch.float64 for n in norm_terms) else torch.float32
        norm = torch.linalg.vector_norm(torch.stack([n.to(device, dtype) for n in norm_terms]))
        inv = 1.0 / (norm + _DELTA)  # 1 / (‖T g‖ + δ), one global norm

        perturbed = []
        for rho, ws, t, tg, ones in parts:
            scale = inv * rho  # ρ / (‖T g‖ + δ)
            if ws:
                torch._foreach_mul_(tg, t)  # T² g
                torch._foreach_mul_(tg, scale.to(ws[0].device))
                self._move(ws, tg)
            if ones:
                eps = torch._foreach_mul([p.grad for p in ones], scale.to(ones[0].device))  # ρ g/‖·‖
                self._move(ones, eps)
            perturbed += ws + ones
        self._perturbed = perturbed

    def _move(self, params, eps):
        """Back up θ into persistent buffers, then θ ← θ + ε̂."""
        backup = []
        for p in params:
            b = self._backup.get(p)
            if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
                b = self._backup[p] = torch.empty_like(p, memory_format=torch.preserve_format)
            backup.append(b)
        torch._foreach_copy_(backup, params)
        torch._foreach_add_(params, eps)  # θ + ε̂

    @torch.no_grad()
    def restore(self):
        """θ ← backup exactly (and BN buffers under bn_update='clean')."""
        if self._perturbed is None:
            raise RuntimeError("restore() called without perturb()")
        if self._perturbed:
            torch._foreach_copy_(self._perturbed, [self._backup[p] for p in self._perturbed])
        if self.bn_update == "clean" and self._bn_buffers:
            torch._foreach_copy_(self._bn_buffers, self._bn_backup)
        self._perturbed = None

    def base_step(self):
        """The base optimizer's update at θ with the gradients now in ``.grad``."""
        self.base_optimizer.step()

    def first_step(self, zero_grad=False):
        """davda54/sam naming: ``perturb()`` (then zero the grads if asked)."""
        self.perturb()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def second_step(self, zero_grad=False):
        """davda54/sam naming: ``restore()`` then ``base_step()``."""
        self.restore()
        self.base_step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure=None, parts=None):
        """One SAM/ASAM step. ``closure()`` zeroes the grads, runs forward + backward and returns
        (outputs, loss) or the loss alone; it is called twice on the same batch. Returns the clean call's result, detached.

        m-sharpness (``parts`` = K > 1, or a ``closure.parts`` attribute): the batch is K sub-batches
        of m examples and ``closure(part=i)`` must ADD the gradient of (n_i/B)·L_i (sub-batch i of
        n_i of the B examples) to ``.grad`` without zeroing it, and return (outputs_i, L_i). Then

            g   = Σ_i ∇[(n_i/B) L_i](θ + ε̂_i),    ε̂_i = ρ·T²g_i/‖T g_i‖  from g_i = ∇L_i(θ)

        (each ε̂_i from its own sub-batch, as each accelerator of the SAM code does), then the base
        step with g. Returns (outputs of all clean passes concatenated, Σ (n_i/B) L_i).
        BatchNorm running statistics (with ``model=``) get ONE update per step, as in the SAM code:
        every sub-batch's passes start from the step's statistics r₀ and leave r_i (under
        bn_update='clean': r_i = (1−μ)·r₀ + μ·s_i from sub-batch i's batch statistics s_i), and the
        step ends with r = Σ_i (n_i/B)·r_i = (1−μ)·r₀ + μ·mean_i s_i — what each accelerator's own
        running average, averaged over the accelerators as the SAM code's evaluation and checkpoint
        do (``pmean`` / mean of the model state), holds; not K updates in sequence (momentum 1−(1−μ)^K).
        Integer buffers (``num_batches_tracked``) count one update.
        K = 1 is the plain step above, exactly."""
        if closure is None:
            raise ValueError("closure is required: SAM needs two forward-backward passes "
                             "(or use perturb()/restore()/base_step())")
        parts = getattr(closure, "parts", 1) if parts is None else parts
        if parts > 1:
            return self._step_parts(closure, parts)
        sync_off = self._no_sync() if self._no_sync is not None else contextlib.nullcontext()
        draws = self._save_draws()
        with torch.enable_grad(), sync_off, self._ascent_pass():  # clean pass at θ: this rank's own gradient
            result = closure()
        self.perturb()
        self._replay_draws(draws)
        with torch.enable_grad():  # perturbed pass at θ + ε̂ (all-reduced under DDP)
            closure()
        self.restore()
        self.base_step()
        return _detached(result)

    def _step_parts(self, closure, parts):
        """m-sharpness: per sub-batch i, clean pass → ε̂_i → perturbed pass added to the running sum
        (kept in persistent buffers while the next clean pass uses .grad) → restore; then base step."""
        params = [p for group in self.param_groups for p in group["params"]]
        acc = None  # Σ_{j<i} of the perturbed passes' gradients, per parameter with a gradient
        results = []
        bn = _BnAverage(self._bn_buffers, self._bn_scratch()) if self._bn_buffers else None
        for i in range(parts):
            last = i == parts - 1
            if bn is not None and i > 0:
                bn.start_part()  # BN buffers back to the step's r₀
            self.zero_grad(set_to_none=True)
            sync_off = self._no_sync() if self._no_sync is not None else contextlib.nullcontext()
            draws = self._save_draws()
            with torch.enable_grad(), sync_off, self._ascent_pass():  # clean pass on sub-batch i: g_i at θ
                results.append(_detached(closure(part=i)))
            self.perturb()  # θ + ε̂_i
            self._replay_draws(draws)
            with torch.no_grad():
                ps = [p for p in params if p.grad is not None]
                if acc is None:
                    torch._foreach_zero_([p.grad for p in ps])
                else:
                    torch._foreach_copy_([p.grad for p in ps], [acc[p] for p in ps])  # .grad = Σ_{j<i}
            sync = contextlib.nullcontext() if last or self._no_sync is None else self._no_sync()
            with torch.enable_grad(), sync:  # perturbed pass: .grad += ∇[(n_i/B) L_i](θ + ε̂_i)
                closure(part=i)
            self.restore()
            if bn is not None:
                bn.add(len(results[-1][0]))  # r_i, weighted by the sub-batch's size n_i
            if not last:
                with torch.no_grad():
                    ps = [p for p in params if p.grad is not None]
                    if acc is None:
                        acc = self._acc_buffers(ps)
                    torch._foreach_copy_([acc[p] for p in ps], [p.grad for p in ps])
        if bn is not None:
            bn.finish()  # r = Σ (n_i/B) r_i
        self.base_step()
        outputs = torch.cat([r[0] for r in results])
        sizes = [len(r[0]) for r in results]
        loss = sum(r[1].float() * (n / len(outputs)) for r, n in zip(results, sizes))
        return outputs, loss

    def _acc_buffers(self, ps):
        """Persistent buffers for the running sum of m-sharpness (scratch, never in state_dict)."""
        if not hasattr(self, "_acc"):
            self._acc = {}
        for p in ps:
            b = self._acc.get(p)
            if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device:
                self._acc[p] = torch.empty_like(p, memory_format=torch.preserve_format)
        return self._acc

    def _save_draws(self):
        """With shared_draws: the RNG states (CPU, and each CUDA device holding parameters) before a
        clean pass; else None. (Host-side generator state: no device sync.)"""
        if not self.shared_draws:
            return None
        devices = sorted({p.device.index or 0 for g in self.param_groups for p in g["params"] if p.is_cuda})
        return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in devices]

    def _replay_draws(self, draws):
        """The perturbed pass draws what the clean pass drew (the SAM code's one key per step)."""
        if draws is not None:
            torch.set_rng_state(draws[0])
            for d, state in draws[1]:
                torch.cuda.set_rng_state(state, d)

    @contextlib.contextmanager
    def _ascent_pass(self):
        """With shared_draws: modules' ``true_gradient`` on during the clean (ascent) pass."""
        modules = self._true_gradient if self.shared_draws else []
        for m in modules:
            m.true_gradient = True
        try:
            yield
        finally:
            for m in modules:
                m.true_gradient = False

    def _bn_scratch(self):
        """Persistent (r₀ copy, weighted sum) buffers for the BN average of m-sharpness (scratch)."""
        if getattr(self, "_bn_avg", None) is None:
            self._bn_avg = ([torch.empty_like(b) for b in self._bn_buffers],
                            [torch.empty_like(b) for b in self._bn_buffers if b.is_floating_point()])
        return self._bn_avg

    def state_dict(self):
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state


class _BnAverage:
    """One m-sharpness step's BatchNorm statistics: r₀ saved at the start, each sub-batch's result r_i
    added with weight n_i (floating buffers; integer ones keep the last sub-batch's value, r₀ + its
    count), and r = Σ n_i·r_i / Σ n_i written back at the end. No host sync (weights are Python ints)."""

    def __init__(self, buffers, scratch):
        self.buffers, (self.start, self.sums) = buffers, scratch
        self.floats = [b for b in buffers if b.is_floating_point()]
        self.total = 0
        with torch.no_grad():
            torch._foreach_copy_(self.start, buffers)
            torch._foreach_zero_(self.sums)

    @torch.no_grad()
    def start_part(self):
        torch._foreach_copy_(self.buffers, self.start)

    @torch.no_grad()
    def add(self, n):
        if self.floats:
            torch._foreach_add_(self.sums, self.floats, alpha=n)
        self.total += n

    @torch.no_grad()
    def finish(self):
        if self.floats:
            torch._foreach_div_(self.sums, float(self.total))
            torch._foreach_copy_(self.floats, self.sums)


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


def _check_nonneg(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _detached(value):
    """The closure's (outputs, loss), detached: the caller gets values, not the autograd graph."""
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value.detach() if isinstance(value, torch.Tensor) else value
