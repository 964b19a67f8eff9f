"""models/: the registry, forward shapes at 28×28 and 32×32, the official parameter counts
(counted from hiyouga/AMP-Regularizer @ 87e689f and nblt/RWP @ cb0acb0 models/), the quirks of the
official code, dropout handling, and docs/models.md."""
import os

import pytest
import torch
import torch.nn as nn

import models
from models import build_model, count_parameters, model_names
from models.common import GlobalAvgPool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Counted from the official models/ (hiyouga/AMP-Regularizer @ 87e689f, nblt/RWP @ cb0acb0):
# params (10 classes), params (100 classes), parameter tensors.
OFFICIAL = {
    "preactresnet18": (11_176_906, 11_223_076, 75),
    "preactresnet34": (21_288_778, 21_334_948, 139),
    "wrn28_10": (36_479_194, 36_536_884, 80),
    "wrn28_2": (1_467_610, 1_479_220, 80),
    "vgg16": (33_646_666, 34_015_396, 58),
    "pyramidnet164_270": (27_216_021, 27_319_071, 601),
    "pyramidnet110_48": (1_772_706, 1_778_556, 439),
    "rwp_resnet18": (11_173_962, 11_220_132, 62),
    "resnet18": (11_173_962, 11_220_132, 62),
    "rwp_vgg16_bn": (15_253_578, 15_299_748, 58),
    "rwp_wrn16_8": (17_158_106, 17_204_276, 62),
    "rwp_wrn28_10": (46_160_474, 46_218_164, 98),
    # google-research/sam sam_jax/models/wide_resnet.py WideResnet28x10, counted from the flax code
    "sam_wrn28_10": (36_220_634, 36_278_324, 77),
    # ... wide_resnet_shakeshake.py WideResnet28x6_ShakeShake (test_sam_models.py counts it layer by layer)
    "sam_shakeshake26_2x96d": (26_192_922, 26_227_572, 161),
    # torchvision's ResNets: 11,689,512 / 25,557,032 parameters at 1000 classes (torchvision docs)
    "tv_resnet18": (11_181_642, 11_227_812, 62),
    "tv_resnet50": (23_528_522, 23_712_932, 161),
}


def test_torchvision_resnets_have_torchvisions_imagenet_counts():
    assert meta_counts("tv_resnet18", 1000) == (11_689_512, 62)
    assert meta_counts("tv_resnet50", 1000) == (25_557_032, 161)
# Families whose official code has a `dropout` rate, one small member each.
WITH_DROPOUT = ("preactresnet18", "wrn16_4", "vgg11", "vgg11_nobn", "pyramidnet110_48", "rwp_wrn16_8")
WITHOUT_DROPOUT = ("resnet18", "rwp_resnet18", "rwp_vgg16", "rwp_vgg16_bn", "tv_resnet18")


def meta_counts(name, num_classes, **kwargs):
    with torch.device("meta"):  # shapes only: no memory, no real initialisation
        return count_parameters(build_model(name, num_classes, **kwargs))


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_parameter_counts(name):
    p10, p100, tensors = OFFICIAL[name]
    assert meta_counts(name, 10) == (p10, tensors)
    assert meta_counts(name, 100) == (p100, tensors)


# one intra-op thread: these many small kernels gain little from two, and on a busy 2-core
# machine OpenMP's spinning threads made this file several times slower
pytestmark = pytest.mark.usefixtures("one_thread")


def forward_check(model, shape, num_classes):
    with torch.no_grad():
        for train in (True, False):  # train mode needs batch 2: VGG's BN sees 1×1 maps at 28×28
            model.train(train)
            out = model(torch.randn(2, *shape))
            assert out.shape == (2, num_classes)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", model_names())
def test_forward_at_28x28_gray_and_32x32_rgb(name):
    """Every model builds and runs (train and eval) at 28×28×1. At 32×32×3 too, up to 25M
    parameters; the bigger ones (preactresnet101/152, wrn28_10, rwp_wrn28_10, AMP's VGGs,
    pyramidnet*_270) share their 32×32 code path with a smaller member of their family run here
    (VGG's with rwp_vgg*), and their 3-channel counts are pinned by the table tests."""
    torch.manual_seed(0)
    model = build_model(name, 10, in_channels=1)
    forward_check(model, (1, 28, 28), 10)
    if count_parameters(model)[0] <= 25_000_000:
        forward_check(build_model(name, 100), (3, 32, 32), 100)


def test_backward_reaches_every_parameter():
    model = build_model("pyramidnet110_48", 10, in_channels=1)
    model(torch.randn(2, 1, 28, 28)).square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_model_names_and_unknown_name():
    names = model_names()
    assert len(names) == len(set(names))
    for expected in ("preactresnet18", "preactresnet152", "wrn16_8", "wrn28_10", "vgg16", "vgg16_nobn",
                     "pyramidnet110_84", "pyramidnet164_48", "resnet18", "rwp_vgg16_bn", "rwp_wrn28_10"):
        assert expected in names
    with pytest.raises(ValueError) as info:
        build_model("resnet1000", 10)
    message = str(info.value)
    assert "unknown model 'resnet1000'" in message and "wrn{depth}_{width}" in message and "6n+4" in message
    assert all(name in message for name in names)
    for bad in ("wrn27_10", "wrn4_2", "wrn28_0", "rwp_wrn15_8", "wrn28-10", "VGG16", "pyramidnet110_50"):
        with pytest.raises(ValueError, match="unknown model"):
            build_model(bad, 10)


def test_wrn_pattern_accepts_any_valid_depth_and_width():
    # 6n+4 = 40, n = 6: stem 1 + 18 blocks × 6 + 3 shortcut convs + head 4.
    assert meta_counts("wrn40_2", 10)[1] == 1 + 18 * 6 + 3 + 4
    # RWP's variant has n+1 units per group: stem 1 + 3 downsample units × 7 + 3n basic × 6 + head 4.
    assert meta_counts("rwp_wrn22_4", 10)[1] == 1 + 3 * 7 + 9 * 6 + 4


@pytest.mark.parametrize("num_classes, in_channels, dropout", [(0, 3, 0.0), (10, 0, 0.0), (10, 3, 1.0),
                                                               (10, 3, -0.1), (10.0, 3, 0.0)])
def test_bad_arguments(num_classes, in_channels, dropout):
    with pytest.raises(ValueError):
        build_model("wrn16_4", num_classes, in_channels=in_channels, dropout=dropout)


def test_in_channels_only_changes_the_stem():
    p3, t3 = meta_counts("preactresnet18", 10)
    p1, t1 = meta_counts("preactresnet18", 10, in_channels=1)
    assert (p3 - p1, t3) == (2 * 64 * 9, t1)


@pytest.mark.parametrize("name", WITH_DROPOUT)
def test_dropout_is_honoured(name):
    with torch.device("meta"):
        rates = {m.p for m in build_model(name, 10, dropout=0.3).modules() if isinstance(m, nn.Dropout)}
    assert rates == {0.3}


def test_dropout_changes_training_outputs_only():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = build_model("wrn16_4", 10, dropout=0.3)
    nn.init.normal_(model.classifier[-1].weight)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # train mode: two different masks
        model.eval()
        assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", WITHOUT_DROPOUT)
def test_dropout_rejected_where_the_official_model_has_none(name):
    with pytest.raises(ValueError, match="dropout"):
        build_model(name, 10, dropout=0.1)


def test_rwp_vgg_keeps_its_fixed_classifier_dropout():
    with torch.device("meta"):
        model = build_model("rwp_vgg16_bn", 10)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]


def test_resnet18_is_an_alias_of_rwp_resnet18():
    torch.manual_seed(0)
    a = build_model("resnet18", 10)
    torch.manual_seed(0)
    b = build_model("rwp_resnet18", 10)
    assert type(a) is type(b)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name, kernel", [("preactresnet18", 4), ("wrn16_4", 8), ("rwp_wrn16_8", 8),
                                          ("pyramidnet110_48", 8)])
def test_global_pool_is_the_official_fixed_pool_at_32(name, kernel):
    seen = []

    def check(module, inputs, output):
        (x,) = inputs
        seen.append(x.shape[-2:] == (kernel, kernel) and
                    torch.equal(output, nn.AvgPool2d(kernel)(x).flatten(1)))

    model = build_model(name, 10).eval()
    pools = [m for m in model.modules() if isinstance(m, GlobalAvgPool)]
    assert len(pools) == 1
    pools[0].register_forward_hook(check)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert seen == [True]


def test_vgg_last_pool_is_the_official_maxpool_at_32():
    model = build_model("vgg11", 10).eval()
    x = torch.randn(2, 512, 2, 2)  # the map the last pool sees at 32×32
    assert torch.equal(model.features[-2](x), nn.MaxPool2d(2, 2)(x))


def test_preact_block_feeds_the_preactivated_input_to_the_shortcut():
    model = build_model("preactresnet18", 10).eval()
    unit = model.layers[2]  # first unit of the second stage: 1×1 conv shortcut with stride 2
    assert unit.shortcut.bias is not None and unit.residual[0].bias is not None
    seen = {}
    unit.preact.register_forward_hook(lambda m, i, o: seen.update(preact=o))
    unit.shortcut.register_forward_hook(lambda m, i, o: seen.update(shortcut_in=i[0]))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert seen["shortcut_in"] is seen["preact"]


def test_amp_wrn_quirks():
    with torch.device("meta"):
        model = build_model("wrn28_10", 10)
    first_strided = model.layers[4]  # n = 4 units per group
    convs = [m for m in first_strided.residual if isinstance(m, nn.Conv2d)]
    assert [c.stride for c in convs] == [(1, 1), (2, 2)]  # stride on the second conv
    assert first_strided.shortcut.stride == (2, 2)
    assert model.classifier[0].momentum == 0.9


def test_rwp_wrn_has_one_extra_unit_per_group():
    with torch.device("meta"):
        units = [m for m in build_model("rwp_wrn28_10", 10).f if isinstance(m, nn.Module)
                 and type(m).__name__.startswith("RWP")]
    assert len(units) == 3 * (1 + 4)


def test_initialisation_follows_the_official_code():
    torch.manual_seed(0)
    amp = build_model("preactresnet18", 10)
    for m in amp.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert bool((m.weight == 1).all() and (m.bias == 0).all())
        if isinstance(m, nn.Linear):
            assert bool((m.bias == 0).all()) and m.weight.abs().sum() > 0
    std = amp.layers[0].residual[0].weight.std()  # Kaiming normal, fan_out = 64·9
    assert abs(std / (2 / (64 * 9)) ** 0.5 - 1) < 0.05
    rwp = build_model("rwp_wrn16_8", 10)
    assert bool((rwp.f[-1].weight == 0).all())  # RWP's WRN starts with a zero classifier
    vgg = build_model("rwp_vgg16", 10)
    assert all(bool((m.bias == 0).all()) for m in vgg.modules() if isinstance(m, nn.Conv2d))


def test_docs_table_matches_the_code():
    with open(os.path.join(ROOT, "docs", "models.md")) as f:
        doc = f.read()
    assert models.markdown_table() in doc, "docs/models.md is stale: regenerate it with `python -m models`"
