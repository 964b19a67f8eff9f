"""Model registry: `build_model(name, num_classes, in_channels, dropout)` and `model_names()`.

One file per family holds plain nn.Modules; this file maps names to them. Every model takes
`in_channels` (1 for Fashion-MNIST, 3 for CIFAR/SVHN) and works at 28×28 and 32×32 inputs
(tv_resnet18/50, torchvision's ImageNet ResNets, at ImageNet sizes too).
Names of the form `wrn{depth}_{width}` / `rwp_wrn{depth}_{width}` / `sam_wrn{depth}_{width}` are accepted for any
depth = 6n+4 (n >= 1) and width >= 1; `model_names()` lists the common ones.
`python -m models` prints the parameter table of docs/models.md.
"""
import re
from functools import partial

from . import preactresnet, pyramidnet, resnet, samwrn, torchvision_resnet, vgg, wideresnet

_AMP = "hiyouga/AMP-Regularizer models/"
_RWP = "nblt/RWP models/"
_SAM = "google-research/sam@dae9904 sam_jax/models/"
_WRN = re.compile(r"(rwp_|sam_)?wrn([1-9][0-9]*)_([1-9][0-9]*)")


def _wrn_builder(name):
    """`wrn{depth}_{width}` (AMP's WRN), `rwp_wrn{depth}_{width}` (RWP's) or `sam_wrn{depth}_{width}`
    (the SAM paper's) -> builder; else None."""
    match = _WRN.fullmatch(name)
    if match is None or int(match[2]) < 10 or (int(match[2]) - 4) % 6:
        return None
    family = {None: wideresnet.WideResNet, "rwp_": wideresnet.RWPWideResNet,
              "sam_": samwrn.SamWideResNet}[match[1]]
    return partial(family, int(match[2]), int(match[3]))


# name -> (builder(num_classes, in_channels=, dropout=), where it comes from); the table's order.
_REGISTRY = {}
for _d in preactresnet.DEPTHS:
    _REGISTRY[f"preactresnet{_d}"] = (partial(preactresnet.PreActResNet, _d),
                                      f"{_AMP}preresnet.py `preactresnet{_d}`")
for _name, _src in (("wrn16_4", "AMP's WRN builder"), ("wrn16_8", "AMP's WRN builder"),
                    ("wrn28_2", f"{_AMP}wide_resnet.py `wrn28_2`"),
                    ("wrn28_10", f"{_AMP}wide_resnet.py `wrn28_10`"),
                    ("rwp_wrn16_8", f"{_RWP}wide_resnet.py `WideResNet16x8` (= davda54/sam@3c3afdb "
                                    "example/model/wide_res_net.py `WideResNet(16, 8)`)"),
                    ("rwp_wrn28_10", f"{_RWP}wide_resnet.py `WideResNet28x10`")):
    _REGISTRY[_name] = (_wrn_builder(_name), _src)
_REGISTRY["sam_wrn28_10"] = (_wrn_builder("sam_wrn28_10"), f"{_SAM}wide_resnet.py `WideResnet28x10`")
_REGISTRY["sam_shakeshake26_2x96d"] = (partial(samwrn.ShakeShakeWRN, 4, 6),
                                       f"{_SAM}wide_resnet_shakeshake.py `WideResnet28x6_ShakeShake`")
for _bn, _suffix in ((True, ""), (False, "_nobn")):
    for _d in vgg.STAGES:
        _REGISTRY[f"vgg{_d}{_suffix}"] = (partial(vgg.amp_vgg, _d, batch_norm=_bn),
                                          f"{_AMP}vgg.py `vgg{_d}` (has BN)" if _bn else f"AMP's vgg{_d} without BN")
for _d, _a in pyramidnet.VARIANTS:
    _REGISTRY[f"pyramidnet{_d}_{_a}"] = (partial(pyramidnet.PyramidNet, _d, _a),
                                         f"{_AMP}pyramidnet.py `pyramidnet{_d}_{_a}`")
_REGISTRY["rwp_resnet18"] = (resnet.ResNet18, f"{_RWP}resnet.py `resnet18`")
_REGISTRY["resnet18"] = (resnet.ResNet18, "alias of rwp_resnet18 (= kuangliu CIFAR ResNet-18)")
for _d in (16, 19):
    for _bn in (False, True):
        _REGISTRY[f"rwp_vgg{_d}{'_bn' if _bn else ''}"] = (
            partial(vgg.rwp_vgg, _d, batch_norm=_bn), f"{_RWP}vgg.py `VGG{_d}{'BN' if _bn else ''}`")


for _d in (18, 50):  # the official RWP ImageNet script's models (torchvision.models)
    _REGISTRY[f"tv_resnet{_d}"] = (partial(torchvision_resnet.tv_resnet, _d),
                                   f"torchvision.models `resnet{_d}` (nblt/RWP train_rwp_imagenet.py)")


def model_names():
    """The registered names (wrn{depth}_{width} / rwp_wrn{depth}_{width} accept more)."""
    return list(_REGISTRY)


def build_model(name, num_classes, in_channels=3, dropout=0.0):
    """Build model `name` with `num_classes` outputs for `in_channels`-channel images.

    `dropout` is the rate of the family's official dropout layers (AMP families and RWP's WRN);
    families with no configurable dropout (resnet18/rwp_resnet18, rwp_vgg*) reject a non-zero one.
    Raises ValueError naming the valid choices."""
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    builder = _REGISTRY[name][0] if name in _REGISTRY else _wrn_builder(str(name))
    if builder is None:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(_REGISTRY)}; also "
                         "wrn{depth}_{width}, rwp_wrn{depth}_{width} and sam_wrn{depth}_{width} for any depth = 6n+4 (n >= 1)")
    return builder(num_classes, in_channels=in_channels, dropout=dropout)


def count_parameters(model):
    """(number of parameters, number of parameter tensors)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), len(params)


def markdown_table():
    """The parameter table of docs/models.md (3-channel input), built on the meta device (no memory)."""
    import torch

    rows = ["| model | params (10 classes) | params (100 classes) | tensors | source |",
            "|---|---:|---:|---:|---|"]
    for name in _REGISTRY:
        with torch.device("meta"):
            (p10, tensors), (p100, _) = (count_parameters(build_model(name, c)) for c in (10, 100))
        rows.append(f"| `{name}` | {p10:,} | {p100:,} | {tensors} | {_REGISTRY[name][1]} |")
    return "\n".join(rows)
