"""Pre-activation ResNet for CIFAR, faithful to AMP's official models/preresnet.py.

Quirks kept from the official code (they change parameter counts and the function):
- every conv inside a block and every shortcut conv carries a bias (the stem conv does not);
- a block pre-activates its input (BN → ReLU) once and feeds that pre-activated tensor to both
  the residual branch and the shortcut (identity or 1×1 conv);
- dropout sits before the last conv of each block and before the final linear layer.
"""
import torch.nn as nn

from .common import GlobalAvgPool, amp_init_, conv1x1, conv3x3

_BLOCKS = {18: (False, [2, 2, 2, 2]), 34: (False, [3, 4, 6, 3]), 50: (True, [3, 4, 6, 3]),
           101: (True, [3, 4, 23, 3]), 152: (True, [3, 8, 36, 3])}
DEPTHS = tuple(_BLOCKS)


class PreActUnit(nn.Module):
    """Basic block (3×3, 3×3) or bottleneck (1×1, 3×3, 1×1 with expansion 4); stride on the first conv."""

    def __init__(self, cin, planes, stride, dropout, bottleneck):
        super().__init__()
        cout = planes * (4 if bottleneck else 1)
        self.preact = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        if bottleneck:
            body = [conv1x1(cin, planes, stride, bias=True), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
                    conv3x3(planes, planes, bias=True), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
                    nn.Dropout(dropout), conv1x1(planes, cout, bias=True)]
        else:
            body = [conv3x3(cin, planes, stride, bias=True), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
                    nn.Dropout(dropout), conv3x3(planes, cout, bias=True)]
        self.residual = nn.Sequential(*body)
        self.shortcut = (conv1x1(cin, cout, stride, bias=True) if stride != 1 or cin != cout
                         else nn.Identity())

    def forward(self, x):
        x = self.preact(x)  # official: the shortcut also sees the pre-activated input
        return self.residual(x) + self.shortcut(x)


class PreActResNet(nn.Module):
    def __init__(self, depth, num_classes, in_channels=3, dropout=0.0):
        super().__init__()
        bottleneck, counts = _BLOCKS[depth]
        expansion = 4 if bottleneck else 1
        self.conv1 = conv3x3(in_channels, 64)
        layers, cin = [], 64
        for planes, n, stride in zip((64, 128, 256, 512), counts, (1, 2, 2, 2)):
            for i in range(n):
                layers.append(PreActUnit(cin, planes, stride if i == 0 else 1, dropout, bottleneck))
                cin = planes * expansion
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True), GlobalAvgPool(),
                                        nn.Dropout(dropout), nn.Linear(cin, num_classes))
        amp_init_(self)

    def forward(self, x):
        return self.classifier(self.layers(self.conv1(x)))
