"""Pieces shared by the model families: global pooling, conv shorthands, official initialisations."""
import torch.nn as nn
import torch.nn.functional as F


class GlobalAvgPool(nn.Module):
    """(N, C, H, W) -> (N, C): average over the whole feature map.

    This is `F.avg_pool2d(x, k)` with k = the map's size, i.e. exactly the official
    `AvgPool2d(4)` / `AvgPool2d(8)` at 32×32 inputs (where the map is 4×4 / 8×8), and it also
    works at 28×28 (Fashion-MNIST), where the official fixed kernel would not fit."""

    def forward(self, x):
        return F.avg_pool2d(x, x.shape[-2:]).flatten(1)


def conv3x3(cin, cout, stride=1, bias=False):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


def conv1x1(cin, cout, stride=1, bias=False):
    return nn.Conv2d(cin, cout, 1, stride=stride, padding=0, bias=bias)


def amp_init_(model):
    """The initialisation shared by every AMP family (hiyouga/AMP-Regularizer models/*.py):
    conv weights Kaiming normal (fan_out, ReLU), BN weight 1 / bias 0, linear bias 0.
    Conv biases and linear weights keep PyTorch's default initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def no_dropout(name, dropout):
    """Families whose official code has no configurable dropout reject a non-zero value."""
    if dropout != 0:
        raise ValueError(f"dropout: {name} has no configurable dropout (official architecture); "
                         f"use dropout=0, got {dropout}")
