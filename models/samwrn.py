"""The SAM paper's CIFAR / Fashion-MNIST models: `sam_wrn{depth}_{width}` and `sam_shakeshake26_2x96d`.

Ported from google-research/sam at commit dae9904c4cf3a57a304f7b04cecffe371679c702 (flax):
sam_jax/models/wide_resnet.py (`WideResnet`, after the AutoAugment code's wrn.py),
sam_jax/models/wide_resnet_shakeshake.py (`WideResnetShakeShake`) and sam_jax/models/utils.py
(activation, initialisers, shake-shake); sam_jax/models/load_model.py names them
`WideResnet28x10` (blocks_per_group 4, channel_multiplier 10) and `WideResnet28x6_ShakeShake`
(blocks_per_group 4, channel_multiplier 6: 16·6 = 96 channels, "Shake-Shake 26 2×96d").

`SamWideResNet` (WRN-d-k, n = (d-4)/6 blocks per group, widths 16k, 32k, 64k):
- block: BN → ReLU → conv3×3 (the group's stride, on the FIRST conv) → BN → ReLU → conv3×3;
  in the first block of the first group the BN → ReLU comes before the branch point, so the
  shortcut gets the activated input; elsewhere the shortcut gets the raw input;
- shortcut: identity; where the channels change, average pooling with the stride and zero
  channels appended (no 1×1 conv; `_output_add`); no extra skip between groups (the flag
  `use_additional_skip_connections` defaults to False);
- head: BN → ReLU → global average pool → dense (with bias).
`ShakeShakeWRN`: conv3×3 → BN (no ReLU) → 3 groups of blocks → ReLU → global pool → dense.
Block: two branches ReLU → conv3×3 (stride) → BN → ReLU → conv3×3 → BN, mixed per sample by
shake-shake; the shortcut, where the channels change, is Gastaldi's: two 1×1 convs to half the
channels each, one on x subsampled with the stride, one on x shifted by one pixel (down and right,
zero filled) and subsampled, concatenated, then BN (no ReLU).

Shake-shake (utils.shake_shake_train / shake_shake_eval): in training a per-sample gate
α ~ U(0,1) mixes the forward pass, out = α·a + (1−α)·b, and an independent β ~ U(0,1) the
backward pass (∂out/∂a = β, ∂out/∂b = 1−β); in evaluation out = (a + b)/2.

Initialisation (utils.py): conv kernels Kaiming normal, fan_out, gain 2 (std √(2/fan_out));
dense kernel U(−1/√classes, 1/√classes), dense bias 0; BN scale 1, bias 0. No conv biases.
BatchNorm: flax momentum 0.9 = PyTorch momentum 0.1 (PyTorch's default), ε 1e-5.
Convolutions pad as TensorFlow's 'SAME': a stride-2 3×3 conv on an even map pads one pixel at the
bottom/right only (PyTorch's symmetric padding=1 would shift the sampling grid by one pixel).

Remaining differences (documented, not reproducible in PyTorch's layers): flax BN keeps the biased
batch variance in its running average, PyTorch the unbiased one (a factor n/(n−1), n = batch·H·W
≥ 12,544 here, so < 1e-4 relative). In the SAM code both SAM passes of one step share the
step's random key, so shake-shake draws the same forward gates in both passes, and the first
(ascent) pass uses them for the backward pass too (`true_gradient=True`, added at commit c2b0a5f).
Here every forward pass draws fresh gates (α, β) from torch's RNG unless SAM runs with
`shared_draws=True` (`--sam_shared_draws`): then the perturbed pass replays the clean pass's draws and
the clean pass sets `ShakeShakeBlock.true_gradient`, as the SAM code does.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import amp_init_

from .common import GlobalAvgPool


def sam_init_(model):
    """google-research/sam sam_jax/models/utils.py: conv Kaiming normal (fan_out, gain 2), dense
    U(±1/√num_outputs) with zero bias, BN 1/0: the AMP families' init, but for the dense weights."""
    amp_init_(model)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.out_features)
            nn.init.uniform_(m.weight, -bound, bound)


class SameConv2d(nn.Conv2d):
    """Conv without bias, padded like TensorFlow's 'SAME': total padding
    max((⌈H/s⌉−1)·s + k − H, 0), the smaller half before, the larger after."""

    def __init__(self, cin, cout, kernel, stride=1):
        same = stride == 1 and kernel % 2 == 1  # then 'SAME' is the symmetric padding k // 2
        super().__init__(cin, cout, kernel, stride=stride, padding=kernel // 2 if same else 0, bias=False)
        self.tf_pad = not same

    def forward(self, x):
        if not self.tf_pad:
            return super().forward(x)
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, None, self.stride)


def _bn_relu(c):
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(inplace=False))


def _output_add(block_x, orig_x):
    """wide_resnet.py `_output_add`: where the channels differ, average-pool the shortcut with the
    stride and append zero channels."""
    if block_x.shape[1] != orig_x.shape[1]:
        stride = orig_x.shape[-1] // block_x.shape[-1]
        if stride > 1:
            orig_x = F.avg_pool2d(orig_x, stride, stride)
        orig_x = F.pad(orig_x, (0, 0, 0, 0, 0, block_x.shape[1] - orig_x.shape[1]))
    return block_x + orig_x


class SamWideBlock(nn.Module):
    def __init__(self, cin, cout, stride, activate_before_residual):
        super().__init__()
        self.activate_before_residual = activate_before_residual
        self.init_bn = _bn_relu(cin)
        self.conv1 = SameConv2d(cin, cout, 3, stride)
        self.bn_2 = _bn_relu(cout)
        self.conv2 = SameConv2d(cout, cout, 3)

    def forward(self, x):
        if self.activate_before_residual:  # first block of the model: shortcut sees BN-ReLU(x)
            x = self.init_bn(x)
            block_x = x
        else:
            block_x = self.init_bn(x)
        block_x = self.conv2(self.bn_2(self.conv1(block_x)))
        return _output_add(block_x, x)


class SamWideResNet(nn.Module):
    def __init__(self, depth, width, num_classes, in_channels=3, dropout=0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth: a wide ResNet needs depth = 6n+4 with n >= 1, got {depth}")
        if dropout != 0:
            raise ValueError(f"dropout: sam_wrn has no dropout (the SAM code's WideResnet); use 0, got {dropout}")
        n = (depth - 4) // 6
        self.init_conv = SameConv2d(in_channels, 16, 3)
        blocks, cin = [], 16
        for g, (cout, stride) in enumerate(zip((16 * width, 32 * width, 64 * width), (1, 2, 2))):
            for i in range(n):
                blocks.append(SamWideBlock(cin, cout, stride if i == 0 else 1, g == 0 and i == 0))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(_bn_relu(cin), GlobalAvgPool(), nn.Linear(cin, num_classes))
        sam_init_(self)

    def forward(self, x):
        return self.head(self.blocks(self.init_conv(x)))


def shake_shake(a, b, training, true_gradient=False):
    """Per-sample mix of the two branches: value α·a + (1−α)·b, gradient β (to a) and 1−β (to b),
    α, β ~ U(0,1) independent (training); with `true_gradient` the gradient is α and 1−α (β is still
    drawn, so the draws that follow do not depend on it); (a + b)/2 in evaluation."""
    if not training:
        return (a + b) * 0.5
    shape = (a.shape[0], 1, 1, 1)
    alpha = torch.rand(shape, device=a.device, dtype=a.dtype)  # forward gate
    beta = torch.rand(shape, device=a.device, dtype=a.dtype)  # backward gate
    if true_gradient:
        return b + alpha * (a - b)
    backward = b + beta * (a - b)
    return backward + ((alpha - beta) * (a - b)).detach()  # value: b + α (a − b)


class ShakeShortcut(nn.Module):
    """Gastaldi's shortcut where the channels change; identity otherwise."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        self.identity = cin == cout
        if not self.identity:
            self.conv_h1 = SameConv2d(cin, cout // 2, 1)
            self.conv_h2 = SameConv2d(cin, cout // 2, 1)
            self.bn_residual = nn.BatchNorm2d(cout)

    def forward(self, x):
        if self.identity:
            return x
        s = self.stride
        h1 = self.conv_h1(x[:, :, ::s, ::s])
        h2 = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))  # one pixel down and right, zero filled
        h2 = self.conv_h2(h2[:, :, ::s, ::s])
        return self.bn_residual(torch.cat([h1, h2], 1))


class ShakeShakeBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()

        def branch():
            return nn.Sequential(nn.ReLU(inplace=False), SameConv2d(cin, cout, 3, stride), _bn_relu(cout),
                                 SameConv2d(cout, cout, 3), nn.BatchNorm2d(cout))
        self.branch_a, self.branch_b = branch(), branch()
        self.shortcut = ShakeShortcut(cin, cout, stride)
        self.true_gradient = False  # set by SAM(shared_draws=True) during its ascent pass

    def forward(self, x):
        return self.shortcut(x) + shake_shake(self.branch_a(x), self.branch_b(x), self.training,
                                              self.true_gradient)


class ShakeShakeWRN(nn.Module):
    """WideResnetShakeShake(blocks_per_group, channel_multiplier); 26 2×96d = (4, 6)."""

    def __init__(self, blocks_per_group, channel_multiplier, num_classes, in_channels=3, dropout=0.0):
        super().__init__()
        if dropout != 0:
            raise ValueError(f"dropout: the shake-shake model has no dropout (SAM code); use 0, got {dropout}")
        layers, cin = [SameConv2d(in_channels, 16, 3), nn.BatchNorm2d(16)], 16
        for cout, stride in zip((16 * channel_multiplier, 32 * channel_multiplier, 64 * channel_multiplier),
                                (1, 2, 2)):
            for i in range(blocks_per_group):
                layers.append(ShakeShakeBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        layers += [nn.ReLU(inplace=False), GlobalAvgPool(), nn.Linear(cin, num_classes)]
        self.f = nn.Sequential(*layers)
        sam_init_(self)

    def forward(self, x):
        return self.f(x)
