"""The SAM paper's setting: its models (google-research/sam sam_jax/models at dae9904), label smoothing,
weight decay inside the loss, dropping the last partial batch, m-sharpness, and davda54/sam's ASAM."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import data_utils
from models import build_model, count_parameters
from models.samwrn import SameConv2d, SamWideBlock, ShakeShakeBlock, ShakeShakeWRN, ShakeShortcut, shake_shake
from runner.config import UsageError, parse_config
from runner.training import make_closure
from sam import SAM


pytestmark = pytest.mark.usefixtures("one_thread")


def meta_count(name, classes, channels=3):
    with torch.device("meta"):
        return count_parameters(build_model(name, classes, in_channels=channels))


def test_sam_wrn_counts_with_one_input_channel():
    """Fashion-MNIST: 36,220,346 (counted from the flax code); only init_conv changes (16·9 per channel)."""
    assert meta_count("sam_wrn28_10", 10, 1) == (36_220_346, 77)
    assert meta_count("sam_shakeshake26_2x96d", 10, 1) == (26_192_922 - 2 * 16 * 9, 161)


def test_shakeshake_count_layer_by_layer():
    """WideResnetShakeShake(blocks_per_group=4, channel_multiplier=6) counted from the flax file:
    init conv + BN; per block two branches (conv3×3, BN, conv3×3, BN); where channels change, two 1×1
    convs to half the channels and a BN; ReLU, pool, dense."""
    def count(classes, cin=3):
        total, c = cin * 16 * 9 + 2 * 16, 16
        for width in (96, 192, 384):
            for i in range(4):
                total += 2 * (c * width * 9 + 2 * width + width * width * 9 + 2 * width)
                if c != width:
                    total += 2 * c * (width // 2) + 2 * width
                c = width
        return total + c * classes + classes
    assert meta_count("sam_shakeshake26_2x96d", 10)[0] == count(10)
    assert meta_count("sam_shakeshake26_2x96d", 100)[0] == count(100)


def test_same_padding_is_tensorflows():
    """Stride 2 on an even map pads one pixel at the bottom/right only; stride 1 symmetric."""
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, 3, stride=2)
    x = torch.randn(1, 2, 8, 8)
    assert torch.equal(conv(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2))
    assert conv(torch.randn(1, 2, 7, 7)).shape[-1] == 4  # ⌈7/2⌉, padded (1, 1)
    conv1 = SameConv2d(2, 3, 3)
    assert torch.equal(conv1(x), F.conv2d(x, conv1.weight, padding=1))


def test_wide_block_shortcut_pools_and_zero_pads():
    """With zero convolutions the block is its shortcut: avg-pooled input with zero channels appended,
    taken before (first block of the model: after) the BN-ReLU."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    for first in (False, True):
        block = SamWideBlock(4, 6, 2 if not first else 1, activate_before_residual=first).eval()
        nn.init.zeros_(block.conv2.weight)
        with torch.no_grad():
            out = block(x)
        src = block.init_bn(x) if first else x
        want = src if first else F.avg_pool2d(src, 2)
        assert torch.allclose(out[:, :4], want, atol=1e-6) and torch.equal(out[:, 4:], torch.zeros_like(out[:, 4:]))
    assert block.conv1.stride == (1, 1) and SamWideBlock(4, 6, 2, False).conv1.stride == (2, 2)  # stride: 1st conv


def test_shake_shake_gates():
    """Training: value b + α(a−b), gradient β to a and 1−β to b, α, β ~ U(0,1) per sample; eval: mean."""
    a = torch.randn(5, 2, 3, 3, requires_grad=True)
    b = torch.randn(5, 2, 3, 3, requires_grad=True)
    torch.manual_seed(1)
    out = shake_shake(a, b, True)
    torch.manual_seed(1)
    alpha, beta = torch.rand(5, 1, 1, 1), torch.rand(5, 1, 1, 1)
    assert torch.allclose(out, alpha * a + (1 - alpha) * b, atol=1e-6)
    out.sum().backward()
    assert torch.allclose(a.grad, beta.expand_as(a)) and torch.allclose(b.grad, (1 - beta).expand_as(b))
    assert not torch.allclose(alpha, beta)
    assert torch.equal(shake_shake(a, b, False), (a + b) * 0.5)
    a.grad = b.grad = None  # true_gradient (the SAM code's ascent pass): gradient α and 1−α, same draws
    torch.manual_seed(1)
    out = shake_shake(a, b, True, true_gradient=True)
    assert torch.allclose(out, alpha * a + (1 - alpha) * b, atol=1e-6)
    out.sum().backward()
    assert torch.allclose(a.grad, alpha.expand_as(a)) and torch.allclose(b.grad, (1 - alpha).expand_as(b))
    after = torch.rand(3)
    torch.manual_seed(1)
    torch.rand(10)  # α and β: β is drawn all the same, so the draws after it do not depend on the flag
    assert torch.equal(after, torch.rand(3))


def recording_closure(block, log):
    """A closure that logs (a draw from torch's RNG, the block's true_gradient flag) per call."""
    def closure(part=None):
        log.append((torch.rand(4), block.true_gradient))
        loss = 0 * sum(p.sum() for p in block.parameters())
        loss.backward()
        return torch.zeros(2, 3), loss.detach()
    return closure


@pytest.mark.parametrize("shared", [True, False])
def test_sam_shared_draws_replays_the_clean_pass(shared):
    """shared_draws (the SAM code's one PRNG key per step): the perturbed pass draws what the clean pass
    drew and only the clean pass has true_gradient; the RNG then stands where ONE pass leaves it.
    Off: fresh draws in every pass. The same per sub-batch with m-sharpness."""
    block = ShakeShakeBlock(2, 2, 1)
    opt = SAM(list(block.parameters()), lr=0.1, rho=0.05, model=block, shared_draws=shared)
    for parts in (1, 3):
        log = []
        torch.manual_seed(7)
        opt.step(recording_closure(block, log), parts=parts)
        after = torch.rand(4)
        assert len(log) == 2 * parts
        for i in range(parts):
            (clean, flag_c), (perturbed, flag_p) = log[2 * i], log[2 * i + 1]
            assert torch.equal(clean, perturbed) == shared and (flag_c, flag_p) == (shared, False)
        assert not torch.equal(log[0][0], log[-1][0]) if parts > 1 else True  # each sub-batch its own draws
        torch.manual_seed(7)
        expected = [torch.rand(4) for _ in range(parts if shared else 2 * parts)]
        assert torch.equal(after, torch.rand(4)) and all(torch.equal(e, c) for e, c in zip(expected, [
            d for d, _ in (log[::2] if shared else log)]))
    assert block.true_gradient is False


def test_sam_shared_draws_step_matches_a_plain_reference_loop():
    """One SAM step on the SAM code's Shake-Shake (tiny: 1 block a group, width 1) with shared_draws
    equals a plain loop: ascent gradient with true_gradient at θ, ε̂ = ρ g/‖g‖, the SAME gates (RNG put
    back) at θ+ε̂ with shake-shake's β, SGD at θ with that gradient."""
    x, y = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 2, 1])
    torch.manual_seed(0)
    net = ShakeShakeWRN(1, 1, 3)
    ref = copy.deepcopy(net)
    opt = SAM(list(net.parameters()), lr=0.1, rho=0.05, model=net, shared_draws=True)
    torch.manual_seed(11)
    opt.step(make_closure(opt, net, list(net.parameters()), [(x, y)]))
    torch.manual_seed(11)
    blocks = [m for m in ref.modules() if isinstance(m, ShakeShakeBlock)]
    params = list(ref.parameters())
    state = torch.get_rng_state()
    for m in blocks:
        m.true_gradient = True
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    for m in blocks:
        m.true_gradient = False
    norm = torch.sqrt(sum(gi.square().sum() for gi in g))
    eps = [0.05 * gi / (norm + 1e-12) for gi in g]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    torch.set_rng_state(state)
    gp = torch.autograd.grad(F.cross_entropy(ref(x), y), params)
    with torch.no_grad():
        for p, e, gi in zip(params, eps, gp):
            p.sub_(e).sub_(0.1 * gi)
    for a, b in zip(net.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_shake_shortcut_is_gastaldis():
    """Two 1×1 convs: one on x[::2, ::2], one on x shifted by one pixel down-right; then BN."""
    torch.manual_seed(0)
    sc = ShakeShortcut(3, 4, 2).eval()
    x = torch.randn(2, 3, 6, 6)
    shifted = torch.zeros_like(x)
    shifted[:, :, :-1, :-1] = x[:, :, 1:, 1:]
    want = torch.cat([F.conv2d(x[:, :, ::2, ::2], sc.conv_h1.weight), F.conv2d(shifted[:, :, ::2, ::2], sc.conv_h2.weight)], 1)
    with torch.no_grad():
        assert torch.allclose(sc(x), sc.bn_residual(want), atol=1e-6)
    block = ShakeShakeBlock(4, 4, 1)
    assert block.shortcut.identity and isinstance(block.branch_a[0], nn.ReLU)  # branches start with ReLU


def test_init_is_the_sam_codes():
    torch.manual_seed(0)
    model = build_model("sam_wrn16_8", 100, in_channels=1)
    dense = model.head[-1]
    assert dense.weight.abs().max() <= 0.1 and dense.weight.abs().max() > 0.09 and not dense.bias.any()
    conv = model.blocks[-1].conv2.weight  # 512 → 512, fan_out = 512·9
    assert abs(conv.std().item() / math.sqrt(2 / (512 * 9)) - 1) < 0.02
    assert all(m.momentum == 0.1 and m.eps == 1e-5 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with pytest.raises(ValueError):
        build_model("sam_wrn16_8", 10, dropout=0.1)


# -- the closure: label smoothing, weight decay in the loss

def tiny_net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def tiny_batch(n=12, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 2, 2, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def test_label_smoothing_in_every_pass():
    net = tiny_net()
    x, y = tiny_batch()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    closure = make_closure(opt, net, list(net.parameters()), [(x, y)], label_smoothing=0.2)
    _, loss = closure()
    logp = net(x).log_softmax(1)
    target = torch.full_like(logp, 0.2 / 3).scatter(1, y[:, None], 1 - 0.2 + 0.2 / 3)
    assert torch.allclose(loss, -(target * logp).sum(1).mean(), atol=1e-6)
    _, plain = make_closure(opt, net, list(net.parameters()), [(x, y)])()
    assert not torch.allclose(loss, plain)
    cfg, _ = parse_config(["--label_smoothing", "0.1", "--optimizer", "sam"])
    assert cfg.label_smoothing == 0.1
    with pytest.raises(UsageError):
        parse_config(["--label_smoothing", "1.5"])


def test_weight_decay_in_the_loss_adds_lambda_theta_before_the_clip():
    net = tiny_net()
    params = list(net.parameters())
    x, y = tiny_batch()
    opt = torch.optim.SGD(params, lr=0.1)
    make_closure(opt, net, params, [(x, y)])()
    plain = [p.grad.clone() for p in params]
    _, loss = make_closure(opt, net, params, [(x, y)], l2=0.01)()
    assert torch.equal(loss, F.cross_entropy(net(x), y).detach())  # the logged loss is the CE alone
    for p, g in zip(params, plain):
        assert torch.allclose(p.grad, g + 0.01 * p.detach(), atol=1e-7)
    make_closure(opt, net, params, [(x, y)], l2=0.01, clip_norm=1e-3)()  # clipped with the L2 term inside
    total = torch.sqrt(sum(p.grad.square().sum() for p in params))
    assert abs(total.item() - 1e-3) < 1e-8  # clip_grad_norm_ divides by ‖g‖ + 1e-6


def test_trainer_passes_the_new_fields(tmp_path):
    """weight_decay_in_loss moves the decay out of SGD; asam_all_params makes one adaptive_all group."""
    import models
    from runner.training import build_optimizer
    model = models.build_model("wrn16_4", 10)
    cfg, _ = parse_config(["--optimizer", "asam", "--weight_decay_in_loss", "--asam_all_params", "--adaptive_eta", "0"])
    opt = build_optimizer(cfg, model, 1)
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[0]["adaptive_all"]
    assert not opt.shared_draws
    cfg, _ = parse_config(["--optimizer", "sam", "--model", "sam_shakeshake26_2x96d", "--sam_shared_draws"])
    with torch.device("meta"):
        opt = build_optimizer(cfg, models.build_model(cfg.model, 10), 1)
    assert opt.shared_draws and len(opt._true_gradient) == 12  # the 12 Shake-Shake blocks


def test_drop_last():
    x = torch.zeros(10, 1, 4, 4, dtype=torch.uint8)
    y = torch.zeros(10, dtype=torch.int64)
    aug = data_utils.Augment((0.5,), (0.25,))
    keep = data_utils.TrainLoader(x, y, 4, aug, device="cpu")
    drop = data_utils.TrainLoader(x, y, 4, aug, device="cpu", drop_last=True)
    assert len(keep) == 3 and len(drop) == 2
    assert [len(b[1]) for b in drop] == [4, 4]


# -- m-sharpness

def sam_steps(part_size, steps=3, adaptive=False, dtype=torch.float32, clip=0.0, all_params=False):
    net = tiny_net(dtype=dtype)
    params = list(net.parameters())
    groups = [{"params": params, "adaptive_all": True}] if all_params else params
    opt = SAM(groups, lr=0.1, rho=0.05, adaptive=adaptive, eta=0.0 if all_params else 0.01,
              momentum=0.9, weight_decay=1e-3)
    out = []
    for s in range(steps):
        batch = tiny_batch(seed=s, dtype=dtype)
        closure = make_closure(opt, net, params, [batch], part_size=part_size, clip_norm=clip)
        out.append(opt.step(closure))
    return net, out


def test_m_equal_to_the_batch_is_todays_sam_exactly():
    ref, ref_out = sam_steps(0)
    for m in (12, 100):
        net, out = sam_steps(m)
        assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), net.state_dict().values()))
        assert all(torch.equal(a[1], b[1]) for a, b in zip(ref_out, out))


def reference_m_sharpness(m, steps=3, adaptive=False):
    """A plain loop: per sub-batch ε̂_i = ρ T²g_i/‖T g_i‖ from its own gradient, gradients at θ+ε̂_i
    weighted n_i/B and summed, then SGD with momentum 0.9 and weight decay 1e-3 (float64)."""
    net = tiny_net(dtype=torch.float64)
    params = list(net.parameters())
    buf = None
    for s in range(steps):
        x, y = tiny_batch(seed=s, dtype=torch.float64)
        total = [torch.zeros_like(p) for p in params]
        for i in range(0, len(y), m):
            xi, yi = x[i:i + m], y[i:i + m]
            g = torch.autograd.grad(F.cross_entropy(net(xi), yi), params)
            t = [(p.detach().abs() + 0.01) if adaptive and p.dim() >= 2 else torch.ones_like(p) for p in params]
            norm = torch.sqrt(sum(((ti * gi) ** 2).sum() for ti, gi in zip(t, g)))
            eps = [0.05 * ti * ti * gi / (norm + 1e-12) for ti, gi in zip(t, g)]
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.add_(e)
            gp = torch.autograd.grad(F.cross_entropy(net(xi), yi) * len(yi) / len(y), params)
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.sub_(e)
            total = [a + b for a, b in zip(total, gp)]
        with torch.no_grad():
            d = [gt + 1e-3 * p for gt, p in zip(total, params)]
            buf = d if buf is None else [0.9 * b + di for b, di in zip(buf, d)]
            for p, b in zip(params, buf):
                p.sub_(0.1 * b)
    return net


@pytest.mark.parametrize("m,adaptive", [(4, False), (5, False), (4, True)])
def test_smaller_m_matches_a_plain_reference_loop(m, adaptive):
    net, out = sam_steps(m, adaptive=adaptive, dtype=torch.float64)
    ref = reference_m_sharpness(m, adaptive=adaptive)
    for a, b in zip(net.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-10, rtol=0)
    whole, _ = sam_steps(0, adaptive=adaptive, dtype=torch.float64)
    assert not torch.allclose(next(net.parameters()), next(whole.parameters()), atol=1e-6)
    outputs, loss = out[-1]
    assert outputs.shape == (12, 3) and loss.dim() == 0


def test_m_sharpness_clips_the_summed_gradient_once():
    """With clip_norm the final (summed) gradient is clipped, not each sub-batch's share."""
    net = tiny_net()
    params = list(net.parameters())
    opt = SAM(params, lr=1.0, rho=0.05)
    grads = []
    opt.base_step = lambda: grads.append([p.grad.clone() for p in params])
    opt.step(make_closure(opt, net, params, [tiny_batch()], part_size=4, clip_norm=1e-3))
    assert abs(torch.sqrt(sum(g.square().sum() for g in grads[0])).item() - 1e-3) < 1e-8


def test_m_sharpness_has_no_host_sync(no_host_sync):
    net = tiny_net()
    params = list(net.parameters())
    opt = SAM(params, lr=0.1, rho=0.05, momentum=0.9)
    closure = make_closure(opt, net, params, [tiny_batch()], part_size=4)
    with no_host_sync():
        opt.step(closure)


def test_sam_m_with_fp16_is_refused():
    with pytest.raises(UsageError, match="sam_m"):
        parse_config(["--optimizer", "sam", "--sam_m", "32", "--precision", "fp16"])


def test_asam_all_params_is_davda54s_rule():
    """adaptive_all with η = 0: ε̂ = ρ·w²g/‖|w|g‖ on every parameter, biases included (davda54/sam)."""
    net = tiny_net()
    params = list(net.parameters())
    x, y = tiny_batch()
    opt = SAM([{"params": params, "adaptive_all": True}], lr=0.1, rho=0.5, adaptive=True, eta=0.0)
    g = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    before = [p.detach().clone() for p in params]
    for p, gi in zip(params, g):
        p.grad = gi.clone()
    opt.perturb()
    norm = torch.sqrt(sum(((p.abs() * gi) ** 2).sum() for p, gi in zip(before, g)))
    for p, b, gi in zip(params, before, g):
        assert torch.allclose(p.detach() - b, 0.5 * b * b * gi / norm, atol=1e-7)
    opt.restore()


# -- davda54/sam's WRN-16-8 table (a peer reproduction)

@pytest.mark.parametrize("opt,error", [("sgd", 3.20), ("sam", 2.86), ("asam", 2.55)])
def test_davda54_configs(opt, error):
    import os
    import yaml
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rel = f"configs/davda54/wrn16_8_cifar10_{opt}.yaml"
    text = open(os.path.join(root, rel)).read()
    cfg, _ = parse_config(["--config", os.path.join(root, rel)])
    assert f"python main.py --config {rel} --seed 0" in text and "peer reproduction" in cfg.paper_ref
    assert set(yaml.safe_load(text)) >= {"model", "optimizer", "label_smoothing", "milestones"}
    assert (cfg.model, cfg.optimizer, cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.nesterov) == (
        "rwp_wrn16_8", opt, 200, 128, 0.1, 0.9, False)
    assert (cfg.weight_decay, cfg.weight_decay_in_loss, cfg.clip_norm, cfg.drop_last) == (5e-4, False, 0.0, False)
    assert (cfg.schedule, cfg.milestones, cfg.lr_decay) == ("step", [60, 120, 160], 0.2)
    assert abs(cfg.label_smoothing - 0.1 * 10 / 9) < 1e-12
    assert (cfg.cutout, cfg.cutout_size, cfg.cutout_prob, cfg.cutout_style, cfg.pad_fill) == (True, 16, 0.5, "rwp", 0)
    assert cfg.paper_error == error and cfg.paper_spread is None
    if opt == "sam":
        assert (cfg.rho, cfg.bn_update) == (0.05, "clean")
    if opt == "asam":
        assert (cfg.rho, cfg.adaptive_eta, cfg.asam_all_params, cfg.bn_update) == (2.0, 0.0, True, "clean")


def test_davda54_label_smoothing_is_pytorchs_at_ten_ninths():
    """Its smooth_crossentropy (true class 1−s, others s/(K−1)) has PyTorch's targets at ε = s·K/(K−1),
    so the same gradient (its KL loss differs from the cross-entropy by the targets' entropy)."""
    torch.manual_seed(0)
    logits = torch.randn(6, 10, requires_grad=True)
    y = torch.randint(0, 10, (6,))
    one_hot = torch.full_like(logits, 0.1 / 9).scatter(1, y[:, None], 0.9)
    theirs = F.kl_div(logits.log_softmax(1), one_hot, reduction="none").sum(-1).mean()
    g1, = torch.autograd.grad(theirs, logits)
    g2, = torch.autograd.grad(F.cross_entropy(logits, y, label_smoothing=0.1 * 10 / 9), logits)
    assert torch.allclose(g1, g2, atol=1e-7)


def bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))


@pytest.mark.parametrize("m", [4, 5])
def test_m_sharpness_bn_statistics_are_the_replicas_average(m):
    """google-research/sam (flax_training.py): each accelerator keeps its own BN running average,
    updated once a step from its own sub-batch (clean pass), and evaluation / checkpoints use their
    mean (pmean of the model state). Plain reference: one replica per sub-batch, each a PyTorch BN
    updated from its sub-batch at the step's θ; their mean (weighted n_i/B) is our model's BN state."""
    net = bn_net()
    params = list(net.parameters())
    opt = SAM(params, lr=0.1, rho=0.05, momentum=0.9, model=net)
    n, steps = 12, 3
    sizes = [len(range(i, min(i + m, n))) for i in range(0, n, m)]
    replicas = [{k: v.clone() for k, v in net[1].state_dict().items()} for _ in sizes]
    for s in range(steps):
        x, y = tiny_batch(n=n, seed=s)
        ref = bn_net()
        ref.load_state_dict(net.state_dict())  # θ of this step
        ref.train()
        for i, state in enumerate(replicas):  # replica i: its own running stats, its own sub-batch
            ref[1].load_state_dict(state)
            with torch.no_grad():
                ref(x[i * m:(i + 1) * m])
            replicas[i] = {k: v.clone() for k, v in ref[1].state_dict().items()}
        opt.step(make_closure(opt, net, params, [(x, y)], part_size=m))
        for key in ("running_mean", "running_var"):
            mean = sum(r[key] * (k / n) for r, k in zip(replicas, sizes))
            assert torch.allclose(net[1].state_dict()[key], mean, atol=1e-6, rtol=1e-6), (s, key)
        assert int(net[1].num_batches_tracked) == s + 1  # one update per step
    # K updates in sequence (the former behaviour) would be another state: the test can tell
    seq = bn_net()
    seq.load_state_dict(bn_net().state_dict())
    with torch.no_grad():
        for i in range(0, n, m):
            seq(tiny_batch(n=n, seed=0)[0][i:i + m])
    first = bn_net()
    opt1 = SAM(list(first.parameters()), lr=0.1, rho=0.05, momentum=0.9, model=first)
    x, y = tiny_batch(n=n, seed=0)
    opt1.step(make_closure(opt1, first, list(first.parameters()), [(x, y)], part_size=m))
    assert not torch.allclose(first[1].running_mean, seq[1].running_mean, atol=1e-3)


def test_m_sharpness_bn_average_has_no_host_sync(no_host_sync):
    net = bn_net()
    params = list(net.parameters())
    opt = SAM(params, lr=0.1, rho=0.05, momentum=0.9, model=net)
    closure = make_closure(opt, net, params, [tiny_batch()], part_size=5)
    with no_host_sync():
        opt.step(closure)
