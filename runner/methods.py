"""The AMP paper's Table A baselines as settings of the one training closure (every optimizer).

Zheng, Zhang & Mao, CVPR 2021 (arXiv 2010.04925), Table A compares ERM and AMP with Dropout (a
model setting, `dropout`), label smoothing, Flooding, MixUp, adversarial training and RMP. Their
code: hiyouga/AMP-Regularizer at commit 768b374, `trainer.py`, `loss_func.py`, `attacks.py`.
With K classes, a batch of B samples, logits z_i and p_i = softmax(z_i):

  label smoothing ε   targets q: `torch` style (PyTorch's): q_y = 1−ε+ε/K, q_k = ε/K;
                      `amp` style (loss_func.py): q_y = 1−ε, q_k = ε/(K−1).   ℓ_i = −Σ_k q_k log p_ik
  MixUp (α₁, α₂)      λ_i ~ Beta(α₁, α₂) per sample, π a random permutation of the batch:
                      x̃_i = λ_i·x_i + (1−λ_i)·x_π(i),  ℓ_i = λ_i·ℓ(z_i, y_i) + (1−λ_i)·ℓ(z_i, y_π(i))
                      (targets mixed as vectors; the AMP code never smooths them, we do if both are set)
  batch loss          L = (1/B)·Σ_i ℓ_i;  Flooding b > 0:  L ← |L − b| + b
  adversarial (PGD)   L∞ ball of radius ε = adv_epsilon/255 around the normalised input x, step
                      a = adv_step/255, T = adv_iter steps (attacks.py, mode 'train'):
                      x⁰ = x + U(−ε, ε);  xᵗ⁺¹ = x + clip_[−ε,ε](xᵗ + a·sign(∇ₓL(xᵗ)) − x)
                      at the clean weights θ with the model in eval mode (BN running statistics, no
                      dropout, nothing updated); the step then trains on x^T only (with MixUp
                      too, x^T is what is mixed). Under precision fp16 the attack's loss is not
                      scaled (only the sign of ∇ₓ is used; entries that underflow do not move).
  RMP ε               ξ_p ~ U(−b_p, b_p) elementwise, b_p = √(ε / numel(p)) for every parameter
                      tensor p (trainer.py `_reset_perturbation_rmp`, all layer scales 1); the gradient
                      at θ + ξ is applied at θ (weights restored exactly from a copy).

The draws are made once per optimizer step, when the closure is built (`prepare`): every pass of
that step (AMP's ascent and descent, SAM's two, RWP's) sees the same mixed or adversarial batch
and the same RMP noise, on top of the optimizer's own perturbation. Draws use the global torch
RNG of the device (as dropout does; checkpoints hold it); nothing here syncs with the host.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Criterion:
    """The training criterion: smoothed cross-entropy (either convention), MixUp's mixed targets,
    Flooding on the batch mean. `test_sum` is the same criterion on test batches of `group` samples
    (the AMP code evaluates its training criterion on test batches of the training batch size)."""

    def __init__(self, num_classes, smoothing=0.0, style="torch", flooding=0.0):
        self.num_classes, self.smoothing, self.style, self.flooding = num_classes, smoothing, style, flooding
        k, s = num_classes, smoothing
        # ℓ = −[(q_y − q_o)·log p_y + q_o·Σ_k log p_k]  with q_y, q_o the true and other targets
        self.q_true, self.q_other = (1 - s, s / (k - 1)) if style == "amp" else (1 - s + s / k, s / k)

    @property
    def plain(self):
        """True when the criterion is PyTorch's (smoothed) cross-entropy without flooding."""
        return self.style == "torch" and self.flooding == 0

    def per_sample(self, outputs, y):
        """ℓ_i of every sample (smoothed by the configured convention)."""
        if self.style == "torch":
            return F.cross_entropy(outputs, y, label_smoothing=self.smoothing, reduction="none")
        logp = F.log_softmax(outputs, dim=1)
        nll = -logp.gather(1, y.view(-1, 1)).squeeze(1)
        if self.smoothing == 0:
            return nll
        return (self.q_true - self.q_other) * nll - self.q_other * logp.sum(1)

    def flood(self, loss):
        """|L − b| + b for b > 0 (sign of the gradient flips below b)."""
        return (loss - self.flooding).abs() + self.flooding if self.flooding > 0 else loss

    def __call__(self, outputs, y, lam=None, y2=None):
        """The batch loss L (flooded); MixUp when `lam` (per-sample λ) and `y2` (= y[π]) are given."""
        if lam is None and self.style == "torch":
            loss = F.cross_entropy(outputs, y, label_smoothing=self.smoothing)
        elif lam is None:
            loss = self.per_sample(outputs, y).mean()
        else:
            loss = (lam * self.per_sample(outputs, y) + (1 - lam) * self.per_sample(outputs, y2)).mean()
        return self.flood(loss)

    def test_sum(self, outputs, y, group):
        """Σ over consecutive groups of `group` samples of |group|·flood(mean ℓ of the group)."""
        losses = self.per_sample(outputs if outputs.dtype == torch.float64 else outputs.float(), y).double()
        if self.flooding == 0:
            return losses.sum()
        n = len(y)
        index = torch.arange(n, device=y.device) // group
        groups = -(-n // group)
        sums = losses.new_zeros(groups).index_add_(0, index, losses)
        counts = losses.new_zeros(groups).index_add_(0, index, torch.ones_like(losses))
        return (self.flood(sums / counts) * counts).sum()


def pgd_linf(model, criterion, x, y, epsilon, step, iters, autocast=None):
    """Adversarial inputs by L∞ PGD (module docstring): random start in the ε-ball, `iters` signed
    gradient steps of size `step`, each projected back onto the ball; the model in eval mode during
    the attack (its train/eval mode restored after); only ∇ₓ is computed (no parameter gradients)."""
    was_training = model.training
    model.eval()
    x_adv = (x + torch.empty_like(x).uniform_(-epsilon, epsilon)).detach()
    try:
        with torch.enable_grad():
            for _ in range(iters):
                x_adv.requires_grad_(True)
                if autocast is not None:
                    with autocast:
                        loss = criterion(model(x_adv), y)
                else:
                    loss = criterion(model(x_adv), y)
                loss.backward(inputs=[x_adv])  # ∇ₓ only (not autograd.grad: module hooks such as
                # torch.utils.flop_counter's refuse it)
                x_adv = x + (x_adv.detach() + step * x_adv.grad.sign() - x).clamp_(-epsilon, epsilon)
    finally:
        model.train(was_training)
    return x_adv.detach()


def mix(x, y, lam, perm):
    """MixUp of a batch: (λ_i·x_i + (1−λ_i)·x_π(i), y_π) for per-sample λ and permutation π."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    lam_x = lam.to(x.dtype).view(shape)
    return lam_x * x + (1 - lam_x) * x[perm], y[perm]


class Regularizers:
    """Per-step transforms of the closure. `mixup` = (α₁, α₂) or None; `adversarial` = (ε, step,
    iters) in normalised-input units or None; `rmp_epsilon` None = off (0.0 runs the noise path with
    zero noise). `model` is the module the attack runs (not a DDP or compiled wrapper); `params`
    the tensors RMP perturbs."""

    def __init__(self, criterion, model=None, params=(), mixup=None, adversarial=None, rmp_epsilon=None,
                 autocast=None):
        self.criterion, self.model, self.params = criterion, model, list(params)
        self.mixup, self.adversarial, self.rmp_epsilon, self.autocast = mixup, adversarial, rmp_epsilon, autocast
        self._noise = self._backup = None
        if rmp_epsilon is not None:
            self._bounds = [math.sqrt(rmp_epsilon / p.numel()) for p in self.params]

    def draw_mix(self, n, device):
        """(λ per sample ~ Beta(α₁, α₂), permutation π) for a batch of n."""
        a1, a2 = (torch.tensor(float(a), device=device) for a in self.mixup)
        lam = torch.distributions.Beta(a1, a2, validate_args=False).sample((n,))
        return lam, torch.randperm(n, device=device)

    def prepare(self, batches):
        """Once per step: [(x, y, λ, y_π)] (λ, y_π None without MixUp) with adversarial and mixed
        inputs; fresh RMP noise."""
        out = []
        for x, y in batches:
            if self.adversarial is not None:
                x = pgd_linf(self.model, self.criterion, x, y, *self.adversarial, autocast=self.autocast)
            lam = y2 = None
            if self.mixup is not None:
                lam, perm = self.draw_mix(len(y), y.device)
                x, y2 = mix(x, y, lam, perm)
            out.append((x, y, lam, y2))
        if self.rmp_epsilon is not None:
            if self._noise is None:
                self._noise = [torch.empty_like(p) for p in self.params]
                self._backup = [torch.empty_like(p) for p in self.params]
            for n, b in zip(self._noise, self._bounds):  # ξ_p ~ U(−b_p, b_p)
                n.uniform_(-b, b)
        return out

    @torch.no_grad()
    def perturb(self):
        """RMP: θ' ← θ' + ξ (θ' = the weights the optimizer set for this pass), a copy kept."""
        if self.rmp_epsilon is not None:
            torch._foreach_copy_(self._backup, self.params)
            torch._foreach_add_(self.params, self._noise)

    @torch.no_grad()
    def restore(self):
        """RMP: θ' back exactly from the copy."""
        if self.rmp_epsilon is not None:
            torch._foreach_copy_(self.params, self._backup)


def build_regularizers(cfg, model, params, num_classes, autocast=None):
    """Regularizers for a Config, or None when the closure's plain cross-entropy is all it needs."""
    criterion = Criterion(num_classes, cfg.label_smoothing, cfg.label_smoothing_style, cfg.flooding)
    mixup = (cfg.mixup_alpha, cfg.mixup_beta if cfg.mixup_beta is not None else cfg.mixup_alpha) \
        if cfg.mixup_alpha > 0 else None
    adversarial = (cfg.adv_epsilon / 255, cfg.adv_step / 255, cfg.adv_iter) if cfg.adv_epsilon > 0 else None
    rmp = cfg.rmp_epsilon if cfg.rmp_epsilon > 0 else None
    if criterion.plain and mixup is None and adversarial is None and rmp is None:
        return None
    return Regularizers(criterion, model, params, mixup, adversarial, rmp, autocast)


def validate(cfg, error):
    """`error(message)` for settings that would be silently ignored (ranges are Config's RANGES)."""
    if cfg.mixup_beta is not None and cfg.mixup_alpha == 0:
        raise error("mixup_beta: only with MixUp (set mixup_alpha > 0)")
    if cfg.label_smoothing_style != "torch" and cfg.label_smoothing == 0:
        raise error("label_smoothing_style: only with label_smoothing > 0")
    if cfg.adv_epsilon > 0 and cfg.adv_iter > 0 and cfg.adv_step == 0:
        raise error("adv_step: must be > 0 when adv_epsilon and adv_iter are (PGD would not move)")
