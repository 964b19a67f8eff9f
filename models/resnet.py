"""CIFAR ResNet-18 as in RWP's official models/resnet.py (nblt/RWP).

The usual CIFAR variant (3×3 stem, no max-pool, post-activation basic blocks, 1×1 conv + BN
projection shortcuts, global average pooling). It is the same network as kuangliu/pytorch-cifar's
ResNet18 (same layers, same 11,173,962 parameters), so the registry's `resnet18` is an alias of
`rwp_resnet18`. No dropout; PyTorch's default initialisation, as in the official code.
"""
import torch.nn as nn
import torch.nn.functional as F

from .common import conv1x1, conv3x3, no_dropout


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.residual = nn.Sequential(conv3x3(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                      conv3x3(cout, cout), nn.BatchNorm2d(cout))
        self.shortcut = (nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        return F.relu(self.residual(x) + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes, in_channels=3, dropout=0.0):
        super().__init__()
        no_dropout("rwp_resnet18", dropout)
        layers, cin = [conv3x3(in_channels, 64), nn.BatchNorm2d(64), nn.ReLU(inplace=True)], 64
        for cout, stride in zip((64, 128, 256, 512), (1, 2, 2, 2)):
            for i in range(2):  # ResNet-18: two blocks per stage
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))
