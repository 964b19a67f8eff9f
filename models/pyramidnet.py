"""PyramidNet for CIFAR, faithful to AMP's official models/pyramidnet.py.

Widths grow by alpha / (3n) per unit (n units per group; n = (depth-2)/6 for basic units,
(depth-2)/9 for bottleneck units, expansion 4), rounded with Python's round() from the running
float sum exactly as the official code does. A unit is BN → conv → BN → ReLU → ... → BN with no
ReLU after the first BN and none after the addition; the shortcut is the input (2×2 average pool
with ceil_mode when the unit strides) zero-padded along channels to the unit's output width.
The stem is conv3×3 → BN; the head BN → ReLU → global average pool → dropout → linear.
AMP's initialisation (common.amp_init_). The official names: 110 = basic, 164 = bottleneck.
"""
import torch.nn as nn
import torch.nn.functional as F

from .common import GlobalAvgPool, amp_init_, conv1x1, conv3x3

VARIANTS = ((110, 48), (110, 84), (110, 270), (164, 48), (164, 270))  # AMP's official list
BOTTLENECK = {110: False, 164: True}


class PyramidUnit(nn.Module):
    def __init__(self, cin, planes, stride, dropout, bottleneck):
        super().__init__()
        cout = planes * (4 if bottleneck else 1)
        if bottleneck:
            body = [nn.BatchNorm2d(cin), conv1x1(cin, planes), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
                    conv3x3(planes, planes, stride), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
                    nn.Dropout(dropout), conv1x1(planes, cout), nn.BatchNorm2d(cout)]
        else:
            body = [nn.BatchNorm2d(cin), conv3x3(cin, planes, stride), nn.BatchNorm2d(planes),
                    nn.ReLU(inplace=True), nn.Dropout(dropout), conv3x3(planes, cout), nn.BatchNorm2d(cout)]
        self.residual = nn.Sequential(*body)
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True) if stride != 1 else nn.Identity()
        self.extra_channels = cout - cin  # >= 0: widths only grow

    def forward(self, x):
        shortcut = self.pool(x)
        if self.extra_channels:  # append zero channels (a Python int: no tensor test)
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        return self.residual(x) + shortcut


class PyramidNet(nn.Module):
    def __init__(self, depth, alpha, num_classes, in_channels=3, dropout=0.0):
        super().__init__()
        bottleneck = BOTTLENECK[depth]
        n = (depth - 2) // (9 if bottleneck else 6)
        expansion = 4 if bottleneck else 1
        add_rate = alpha / (3.0 * n)
        self.stem = nn.Sequential(conv3x3(in_channels, 16), nn.BatchNorm2d(16))
        layers, cin, width = [], 16, 16.0
        for stride in (1, 2, 2):
            for i in range(n):
                width += add_rate  # the official running float sum, rounded per unit
                layers.append(PyramidUnit(cin, int(round(width)), stride if i == 0 else 1, dropout, bottleneck))
                cin = int(round(width)) * expansion
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), GlobalAvgPool(),
                                        nn.Dropout(dropout), nn.Linear(cin, num_classes))
        amp_init_(self)

    def forward(self, x):
        return self.classifier(self.layers(self.stem(x)))
