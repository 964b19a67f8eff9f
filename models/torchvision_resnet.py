"""torchvision's ImageNet ResNets, as the official RWP ImageNet script builds them
(nblt/RWP train_rwp_imagenet.py: `models.__dict__[args.arch]()` from torchvision.models).

Same modules and initialisation as torchvision (zero-init of the last BN is off there by default);
`num_classes` sets the classifier. A stem for other than 3 input channels (28×28 grey tests) replaces
conv1 only. There is no configurable dropout, as in torchvision."""
import torch.nn as nn

from .common import no_dropout


def tv_resnet(depth, num_classes, in_channels=3, dropout=0.0):
    """torchvision.models.resnet{depth}(num_classes=num_classes), random weights (no download)."""
    from torchvision import models
    no_dropout(f"tv_resnet{depth}", dropout)
    model = getattr(models, f"resnet{depth}")(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    return model
