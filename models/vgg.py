"""VGG for 32×32 inputs: AMP's `vgg{11,13,16,19}` and RWP's `rwp_vgg{16,19}[_bn]`.

AMP (hiyouga/AMP-Regularizer models/vgg.py): every conv has a bias and is followed by
**BatchNorm** → ReLU → Dropout(dropout) — AMP's VGG always has BN; `vgg{d}_nobn` is the same net
without BN. Five max-pools take 32×32 to 1×1; the classifier is 512 → 4096 → 4096 → classes with
ReLU and Dropout(dropout) after each hidden layer. AMP's initialisation (common.amp_init_).

RWP (nblt/RWP models/vgg.py, ported from torchvision): conv (bias) → [BN] → ReLU, no conv
dropout; the classifier is Dropout(0.5) → 512 → ReLU → Dropout(0.5) → 512 → ReLU → classes, with
the dropout rate fixed at torchvision's 0.5 (so `dropout` must be 0). Conv weights normal with std
sqrt(2 / (9·out_channels)) (= Kaiming normal, fan_out), conv biases 0, the rest PyTorch defaults.

The last max-pool is an adaptive 1×1 max-pool: identical to MaxPool2d(2) on the 2×2 map of a
32×32 input, and it keeps 28×28 inputs (whose map is already 1×1 there) working.
"""
import torch.nn as nn

from .common import amp_init_, conv3x3, no_dropout

# Convs per stage; the stage widths are 64, 128, 256, 512, 512 for every depth.
STAGES = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


def _features(depth, in_channels, batch_norm, dropout):
    """dropout=None: no dropout layers (RWP); a float: Dropout(dropout) after every ReLU (AMP)."""
    layers, cin = [], in_channels
    for stage, (width, n) in enumerate(zip((64, 128, 256, 512, 512), STAGES[depth])):
        for _ in range(n):
            layers.append(conv3x3(cin, width, bias=True))
            layers += [nn.BatchNorm2d(width)] if batch_norm else []
            layers.append(nn.ReLU(inplace=True))
            layers += [nn.Dropout(dropout)] if dropout is not None else []
            cin = width
        layers.append(nn.MaxPool2d(2, 2) if stage < 4 else nn.AdaptiveMaxPool2d(1))
    return layers + [nn.Flatten()]


class VGG(nn.Module):
    def __init__(self, features, classifier):
        super().__init__()
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(*classifier)

    def forward(self, x):
        return self.classifier(self.features(x))


def amp_vgg(depth, num_classes, in_channels=3, dropout=0.0, batch_norm=True):
    model = VGG(_features(depth, in_channels, batch_norm, dropout),
                [nn.Linear(512, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
                 nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(dropout),
                 nn.Linear(4096, num_classes)])
    amp_init_(model)
    return model


def rwp_vgg(depth, num_classes, in_channels=3, dropout=0.0, batch_norm=False):
    no_dropout("rwp_vgg (its classifier dropout is fixed at 0.5)", dropout)
    model = VGG(_features(depth, in_channels, batch_norm, None),
                [nn.Dropout(0.5), nn.Linear(512, 512), nn.ReLU(inplace=True),
                 nn.Dropout(0.5), nn.Linear(512, 512), nn.ReLU(inplace=True),
                 nn.Linear(512, num_classes)])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model
