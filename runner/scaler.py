"""fp16 loss scaling for optimizers that run several forward/backward passes in one step.

torch.amp.GradScaler unscales once per step and cannot reach the passes that AMP, RWP and SAM run
inside `optimizer.step(closure)`, so this scaler works per pass, in the closure:

    backward(S · loss);   g ← g / S;   inf ← inf ∨ (any g non-finite);   g ← 0 if inf

A perturbation computed from an overflowed pass is therefore zero, so the perturbed weights (and
the BatchNorm statistics of the next pass) stay finite. The parameter update — the base optimizer's
`step`, or the plain optimizer's — is skipped when any pass of the step overflowed (the perturbed
weights are restored from the optimizer's backup as always, so weights and momentum stay exactly
as they were; step counters advance, like the LR schedule, and ARWP's accumulator, updated from
the zeroed gradients, decays by β on such a step), and then

    S ← S · 1/2 on overflow;   S ← S · 2 after 2000 steps in a row without one

(GradScaler's defaults and its update kernel). Deciding to skip reads the flag on the host: one
synchronisation per step, as GradScaler.step. Under torchrun the flag is all-reduced first, so every
rank skips the same steps and keeps the same scale.
"""
from __future__ import annotations

import types

import torch


class LossScaler:
    def __init__(self, optimizer, params, *, init_scale=2.0 ** 16, growth_factor=2.0,
                 backoff_factor=0.5, growth_interval=2000, distributed=False):
        device = params[0].device
        self.params, self.distributed = params, distributed
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.scale = torch.full((), init_scale, dtype=torch.float32, device=device)
        self.growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.skipped = 0  # steps skipped since the counter was last read (see pop_skipped)
        # the object whose step() changes the weights: the wrapped base optimizer, or the optimizer
        # (bound to it, so an LR scheduler created later can wrap it like any optimizer's step)
        target = getattr(optimizer, "base_optimizer", optimizer)
        real_step = target.step
        target.step = types.MethodType(lambda _, closure=None: self._step(real_step, closure), target)

    def backward(self, loss: torch.Tensor):
        """∇(S·loss), then the gradients unscaled in place, overflow recorded, and zeroed if any."""
        (loss.float() * self.scale).backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        found = torch.zeros_like(self.found_inf)
        inv_scale = self.scale.double().reciprocal().float()
        for dtype in {g.dtype for g in grads}:
            torch._amp_foreach_non_finite_check_and_unscale_(
                [g for g in grads if g.dtype == dtype], found, inv_scale)
        overflow = found > 0
        for g in grads:  # no host sync: a 0-d mask
            g.masked_fill_(overflow, 0.0)
        self.found_inf.add_(found)

    def _step(self, real_step, closure=None):
        result = None
        if closure is not None:  # a plain optimizer's step(closure): run the passes first
            with torch.enable_grad():
                result = closure()
        if self.distributed:
            import torch.distributed as dist
            dist.all_reduce(self.found_inf, op=dist.ReduceOp.MAX)
        if self.found_inf.item() == 0:  # the one host sync of a step
            real_step()
        else:
            self.skipped += 1
        torch._amp_update_scale_(self.scale, self.growth_tracker, self.found_inf, self.growth_factor,
                                 self.backoff_factor, self.growth_interval)
        self.found_inf.zero_()
        return result

    def pop_skipped(self) -> int:
        n, self.skipped = self.skipped, 0
        return n

    def state_dict(self):
        return {"scale": self.scale.detach().cpu(), "growth_tracker": self.growth_tracker.detach().cpu()}

    def load_state_dict(self, state):
        self.scale.copy_(state["scale"])
        self.growth_tracker.copy_(state["growth_tracker"])
