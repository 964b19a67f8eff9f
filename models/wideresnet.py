"""Wide ResNets: AMP's `wrn{depth}_{width}` and RWP's deeper `rwp_wrn{depth}_{width}`.

`WideResNet` follows AMP's official models/wide_resnet.py:
- a block is BN → ReLU → conv3×3 → dropout → BN → ReLU → conv3×3, with the **stride on the
  second conv**; the shortcut (identity, or a 1×1 conv with the stride) takes the raw block input;
- the final BN has PyTorch momentum 0.9 (running stats move 90 % towards each batch);
- AMP's initialisation (see common.amp_init_).

`RWPWideResNet` follows RWP's official models/wide_resnet.py (nblt/RWP): each of the 3 groups is
one downsample unit **plus** (depth-4)/6 pre-activated basic units, i.e. one unit more per group
than a standard WRN of the same name (rwp_wrn28_10 has 46.2M parameters, wrn28_10 36.5M).
The downsample unit pre-activates its input once for both branches, stride on its first conv.
Init: conv Kaiming normal (fan_in), BN 1/0, the final linear layer all zeros.
"""
import torch.nn as nn

from .common import GlobalAvgPool, amp_init_, conv1x1, conv3x3


def _units_per_group(depth):
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"depth: a wide ResNet needs depth = 6n+4 with n >= 1, got {depth}")
    return (depth - 4) // 6


class WideBasic(nn.Module):
    def __init__(self, cin, cout, stride, dropout):
        super().__init__()
        self.residual = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True), conv3x3(cin, cout), nn.Dropout(dropout),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True), conv3x3(cout, cout, stride))  # stride: 2nd conv
        self.shortcut = conv1x1(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return self.residual(x) + self.shortcut(x)


class WideResNet(nn.Module):
    def __init__(self, depth, width, num_classes, in_channels=3, dropout=0.0):
        super().__init__()
        n = _units_per_group(depth)
        widths = (16 * width, 32 * width, 64 * width)
        self.conv1 = conv3x3(in_channels, 16)
        layers, cin = [], 16
        for cout, stride in zip(widths, (1, 2, 2)):
            for i in range(n):
                layers.append(WideBasic(cin, cout, stride if i == 0 else 1, dropout))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.BatchNorm2d(cin, momentum=0.9), nn.ReLU(inplace=True),
                                        GlobalAvgPool(), nn.Dropout(dropout), nn.Linear(cin, num_classes))
        amp_init_(self)

    def forward(self, x):
        return self.classifier(self.layers(self.conv1(x)))


def _rwp_body(cin, cout, stride, dropout):
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), conv3x3(cin, cout, stride),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.Dropout(dropout), conv3x3(cout, cout))


class RWPBasicUnit(nn.Module):
    def __init__(self, channels, dropout):
        super().__init__()
        self.residual = _rwp_body(channels, channels, 1, dropout)

    def forward(self, x):
        return x + self.residual(x)


class RWPDownsampleUnit(nn.Module):
    def __init__(self, cin, cout, stride, dropout):
        super().__init__()
        self.preact = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self.residual = _rwp_body(cin, cout, stride, dropout)[2:]  # its BN → ReLU is self.preact
        self.shortcut = conv1x1(cin, cout, stride)

    def forward(self, x):
        x = self.preact(x)  # shared by both branches
        return self.residual(x) + self.shortcut(x)


class RWPWideResNet(nn.Module):
    def __init__(self, depth, width, num_classes, in_channels=3, dropout=0.0):
        super().__init__()
        n = _units_per_group(depth)
        widths = (16 * width, 32 * width, 64 * width)
        layers, cin = [conv3x3(in_channels, 16)], 16
        for cout, stride in zip(widths, (1, 2, 2)):
            layers.append(RWPDownsampleUnit(cin, cout, stride, dropout))
            layers.extend(RWPBasicUnit(cout, dropout) for _ in range(n))
            cin = cout
        layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True), GlobalAvgPool(), nn.Linear(cin, num_classes)]
        self.f = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):  # official: the classifier starts at zero
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.f(x)
