"""AMP optimizer invariants (CPU, tiny models) and the configs/amp/*.yaml table rows."""
import copy
import glob
import io
import os

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from amp import AMP

KW = dict(momentum=0.9, nesterov=True, weight_decay=1e-4)  # the official base optimizer
BALLS = ("tensor", "global")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: two threads on a busy 2-core box are 50x slower


def tiny_model(seed=0, unused=False):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    if unused:  # never used in forward: its .grad stays None
        model.register_parameter("unused", nn.Parameter(torch.randn(3)))
    return model


def batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def make_closure(model, opt, x, y, clip=None, log=None, bf16=False):
    """The runner's closure; ``log(model)`` sees every pass right after backward (and clipping)."""
    def closure():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            outputs = model(x)
            loss = F.cross_entropy(outputs, y)
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
        if log is not None:
            log(model)
        return outputs, loss.detach()
    return closure


def reference_step(model, base, closure, epsilon, inner_lr, inner_iter, ball):
    """AMP written plainly, one parameter at a time (the official loop, with exact restore)."""
    params = list(model.parameters())
    clean = closure()
    with torch.no_grad():
        theta = [p.clone() for p in params]
        delta = [torch.zeros_like(p) for p in params]
    for _ in range(inner_iter):
        with torch.no_grad():
            for i, p in enumerate(params):
                if p.grad is not None:
                    delta[i] = delta[i] + inner_lr * p.grad
            if ball == "tensor":
                for i in range(len(delta)):
                    coef = epsilon / (delta[i].norm() + 1e-12)
                    if coef < 1:
                        delta[i] = delta[i] * coef
            else:
                coef = epsilon / (torch.cat([d.flatten() for d in delta]).norm() + 1e-12)
                if coef < 1:
                    delta = [d * coef for d in delta]
            for p, t, d in zip(params, theta, delta):
                p.copy_(t + d)
        closure()
    with torch.no_grad():
        for p, t in zip(params, theta):
            p.copy_(t)
    base.step()
    return clean


def assert_same(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def assert_same_buffers(a, b):
    for (name, p), q in zip(a.named_buffers(), b.buffers()):
        assert torch.equal(p, q), name


# ---- radius 0, reference, ball, restore ----------------------------------------------------
@pytest.mark.parametrize("ball", BALLS)
@pytest.mark.parametrize("inner_iter,bn_update", [(1, "all"), (3, "clean")])
def test_epsilon_zero_is_base_optimizer(ball, inner_iter, bn_update):
    a = tiny_model()
    b = copy.deepcopy(a)
    opt = AMP(a.parameters(), lr=0.1, epsilon=0, inner_iter=inner_iter, ball=ball, bn_update=bn_update, model=a, **KW)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, **KW)
    for x, y in batches():
        opt.step(make_closure(a, opt, x, y))
        sgd.step(make_closure(b, sgd, x, y))
        assert_same(a, b)
        if bn_update == "clean":  # only the clean pass touched the running stats
            assert_same_buffers(a, b)


@pytest.mark.parametrize("ball", BALLS)
@pytest.mark.parametrize("inner_iter", [1, 3])
def test_matches_reference_loop(ball, inner_iter):
    eps, zeta = 0.05, 0.5
    a = tiny_model(unused=True)
    b = copy.deepcopy(a)
    opt = AMP(a.parameters(), lr=0.1, epsilon=eps, inner_lr=zeta, inner_iter=inner_iter, ball=ball, **KW)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, **KW)
    clip = 0.5 if inner_iter == 3 else None  # clipping inside the closure, in every pass
    for x, y in batches():
        out_a, loss_a = opt.step(make_closure(a, opt, x, y, clip=clip))
        out_b, loss_b = reference_step(b, sgd, make_closure(b, sgd, x, y, clip=clip), eps, zeta, inner_iter, ball)
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(a.unused, tiny_model(unused=True).unused)  # grad None: untouched


@pytest.mark.parametrize("ball", BALLS)
def test_perturbation_stays_in_ball(ball):
    eps, inner_iter = 0.05, 3
    model = tiny_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=eps, inner_iter=inner_iter, ball=ball, **KW)
    for x, y in batches(2):
        theta = [p.detach().clone() for p in model.parameters()]
        seen = []

        def log(m):
            seen.append([(p - t).norm() for p, t in zip(m.parameters(), theta)])
        opt.step(make_closure(model, opt, x, y, log=log))
        assert len(seen) == inner_iter + 1
        assert all(n == 0 for n in seen[0])  # the clean pass runs at θ
        for norms in seen[1:]:
            norms = torch.stack(norms)
            radii = norms if ball == "tensor" else torch.linalg.vector_norm(norms)[None]
            assert (radii <= eps * (1 + 1e-5) + 1e-6).all(), radii
            assert (radii >= eps * (1 - 1e-4)).any(), "the projection never engaged: test too weak"
        if ball == "tensor":  # some tensors inside their ball, some on its boundary
            assert (torch.stack(seen[1]) < eps * 0.99).any()


def test_restore_is_exact():
    a = tiny_model()
    b = copy.deepcopy(a)
    opt = AMP(a.parameters(), lr=0.1, epsilon=0.5, inner_iter=2, **KW)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, **KW)
    for x, y in batches():
        final = {}

        def log(m):
            final["grads"] = [p.grad.clone() for p in m.parameters()]
            final["params"] = [p.detach().clone() for p in m.parameters()]
        opt.step(make_closure(a, opt, x, y, log=log))
        assert not opt.perturbed
        assert any(not torch.equal(p, q) for p, q in zip(final["params"], b.parameters()))  # was perturbed
        for q, g in zip(b.parameters(), final["grads"]):  # plain SGD from θ with the final gradient
            q.grad = g
        sgd.step()
        assert_same(a, b)  # bit for bit: θ came back exactly


@pytest.mark.parametrize("inner_iter,calls", [(0, 1), (1, 2), (3, 4)])
def test_passes_per_step(inner_iter, calls):
    eps, zeta = 0.05, 2.0
    a = tiny_model()
    b = copy.deepcopy(a)
    opt = AMP(a.parameters(), lr=0.1, epsilon=eps, inner_lr=zeta, inner_iter=inner_iter, **KW)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, **KW)
    x, y = batches(1)[0]
    theta = [p.detach().clone() for p in a.parameters()]
    seen = []
    log = lambda m: seen.append(([p.grad.clone() for p in m.parameters()], [p.detach().clone() for p in m.parameters()]))
    outputs, loss = opt.step(make_closure(a, opt, x, y, log=log))
    assert len(seen) == calls
    torch.testing.assert_close(loss, F.cross_entropy(b(x), y).detach(), rtol=0, atol=0)  # clean pass's loss
    assert not outputs.requires_grad
    if inner_iter == 0:  # the plain base optimizer
        sgd.step(make_closure(b, sgd, x, y))
        assert_same(a, b)
    if inner_iter == 1:  # θ + Δ_1 with Δ_1 = Π_ε(ζ·g_0), per tensor
        for g0, p1, t in zip(seen[0][0], seen[1][1], theta):
            d = zeta * g0
            d = d * min(1.0, eps / (d.norm().item() + 1e-12))
            torch.testing.assert_close(p1, t + d, rtol=1e-6, atol=1e-7)


# ---- state, schedules, BN, sync, precision ---------------------------------------------------
def test_state_dict_round_trip():
    data = batches(5)

    def run(model, opt, part):
        for x, y in part:
            opt.step(make_closure(model, opt, x, y))

    a = tiny_model()
    oa = AMP(a.parameters(), lr=0.1, epsilon=0.5, model=a, **KW)
    sched = torch.optim.lr_scheduler.MultiStepLR(oa, milestones=[1], gamma=0.1)
    run(a, oa, data[:2])
    sched.step()
    sched.step()
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": oa.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert all(set(s) == {"momentum_buffer"} for s in ckpt["opt"]["state"].values())  # no scratch
    assert len(ckpt["opt"]["state"]) == len(list(a.parameters()))

    b = tiny_model(seed=123)
    ob = AMP(b.parameters(), lr=0.1, epsilon=0.5, model=b, **KW)
    b.load_state_dict(ckpt["model"])
    ob.load_state_dict(ckpt["opt"])
    assert ob.param_groups is ob.base_optimizer.param_groups and ob.state is ob.base_optimizer.state
    assert ob.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    run(a, oa, data[2:])
    run(b, ob, data[2:])
    assert_same(a, b)
    assert_same_buffers(a, b)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(oa.state[p]["momentum_buffer"], ob.state[q]["momentum_buffer"])


def test_lr_scheduler_drives_base_optimizer():
    model = tiny_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.5, inner_iter=1)  # plain SGD base: θ ← θ - lr·g
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1], gamma=0.1)
    (x, y), (x2, y2) = batches(2)
    opt.step(make_closure(model, opt, x, y))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    theta = [p.detach().clone() for p in model.parameters()]
    final = {}
    opt.step(make_closure(model, opt, x2, y2, log=lambda m: final.update(g=[p.grad.clone() for p in m.parameters()])))
    for p, t, g in zip(model.parameters(), theta, final["g"]):
        assert torch.equal(p, t.add(g, alpha=-opt.param_groups[0]["lr"]))


@pytest.mark.parametrize("inner_iter", [1, 3])
def test_bn_update_clean_keeps_clean_pass_stats(inner_iter):
    x, y = batches(1)[0]
    a = tiny_model()
    clean_only = copy.deepcopy(a)
    every_pass = copy.deepcopy(a)
    F.cross_entropy(clean_only(x), y).backward()  # the clean pass alone
    opt = AMP(a.parameters(), lr=0.1, epsilon=0.5, inner_iter=inner_iter, bn_update="clean", model=a, **KW)
    opt.step(make_closure(a, opt, x, y))
    assert_same_buffers(a, clean_only)
    opt_all = AMP(every_pass.parameters(), lr=0.1, epsilon=0.5, inner_iter=inner_iter, bn_update="all", **KW)
    opt_all.step(make_closure(every_pass, opt_all, x, y))
    assert every_pass[1].num_batches_tracked.item() == 1 + inner_iter
    assert not torch.equal(every_pass[1].running_mean, clean_only[1].running_mean)


@pytest.mark.parametrize("ball", BALLS)
def test_step_has_no_host_sync(no_host_sync, ball):
    model = tiny_model(unused=True)
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.05, inner_iter=2, ball=ball, bn_update="clean", model=model, **KW)
    for x, y in batches(2):
        closure = make_closure(model, opt, x, y, clip=1.0)
        with no_host_sync():
            opt.step(closure)
    with pytest.raises(AssertionError, match="host sync"):  # the trap itself works
        with no_host_sync():
            torch.ones(1).item()


def test_bf16_autocast():
    x, y = batches(1)[0]
    # ε = 0 under autocast still reproduces the base optimizer bit for bit
    a = tiny_model()
    b = copy.deepcopy(a)
    opt = AMP(a.parameters(), lr=0.1, epsilon=0, **KW)
    sgd = torch.optim.SGD(b.parameters(), lr=0.1, **KW)
    for x, y in batches(2):
        opt.step(make_closure(a, opt, x, y, bf16=True))
        sgd.step(make_closure(b, sgd, x, y, bf16=True))
    assert_same(a, b)
    # ε > 0: fp32 master weights, perturbation inside the ball, finite update
    eps = 0.05
    opt = AMP(a.parameters(), lr=0.1, epsilon=eps, **KW)
    theta = [p.detach().clone() for p in a.parameters()]
    norms = []
    log = lambda m: norms.append(max((p - t).norm().item() for p, t in zip(m.parameters(), theta)))
    _, loss = opt.step(make_closure(a, opt, x, y, bf16=True, log=log))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in a.parameters())
    assert norms[0] == 0 and eps * 0.99 < norms[1] <= eps * (1 + 1e-5)
    assert torch.isfinite(loss)


# ---- API -----------------------------------------------------------------------------------------
def test_two_phase_api_equals_step():
    a = tiny_model()
    b = copy.deepcopy(a)
    oa = AMP(a.parameters(), lr=0.1, epsilon=0.1, inner_iter=2, **KW)
    ob = AMP(b.parameters(), lr=0.1, epsilon=0.1, inner_iter=2, **KW)
    for x, y in batches(3):
        oa.step(make_closure(a, oa, x, y))
        ob.zero_grad()
        F.cross_entropy(b(x), y).backward()        # g_0 at θ
        for _ in range(2):
            ob.perturb()                            # θ + Δ_n
            assert ob.perturbed
            ob.zero_grad()
            F.cross_entropy(b(x), y).backward()    # g_n
        ob.restore()
        assert not ob.perturbed
        ob.base_step()
        assert_same(a, b)


def test_error_in_closure_leaves_weights_restored():
    model = tiny_model()
    opt = AMP(model.parameters(), lr=0.1, epsilon=0.5, inner_iter=2, **KW)
    x, y = batches(1)[0]
    theta = [p.detach().clone() for p in model.parameters()]
    calls = []

    def log(m):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(make_closure(model, opt, x, y, log=log))
    assert not opt.perturbed
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))


def test_seed_readme_example():
    model = tiny_model()
    loss_fn = nn.CrossEntropyLoss()
    optimizer = AMP(model.parameters(), lr=0.1, epsilon=0.5, momentum=0.9)
    for inputs, targets in batches(2):
        def closure():
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
            loss.backward()
            return outputs, loss

        outputs, loss = optimizer.step(closure)
        assert outputs.shape == (8, 5) and not loss.requires_grad


@pytest.mark.parametrize("kwargs,match", [
    (dict(epsilon=-0.1), r"epsilon must be a number >= 0"),
    (dict(epsilon=float("nan")), r"epsilon must be a number >= 0"),
    (dict(epsilon="0.5"), r"epsilon must be a number >= 0"),
    (dict(inner_lr=-1), r"inner_lr must be a number >= 0"),
    (dict(inner_iter=-1), r"inner_iter must be an int >= 0"),
    (dict(inner_iter=1.5), r"inner_iter must be an int >= 0"),
    (dict(inner_iter=True), r"inner_iter must be an int >= 0"),
    (dict(ball="sphere"), r"ball must be one of tensor\|global"),
    (dict(bn_update="auto"), r"bn_update must be one of all\|clean"),
    (dict(bn_update="clean"), r"bn_update='clean' needs model"),
    (dict(model="net"), r"model must be an nn.Module"),
])
def test_validation_errors(kwargs, match):
    args = dict(lr=0.1, epsilon=0.5) | kwargs
    with pytest.raises(ValueError, match=match):
        AMP(tiny_model().parameters(), **args)


def test_usage_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="epsilon"):
        AMP([{"params": list(model.parameters()), "epsilon": -1}], lr=0.1, epsilon=0.5)
    with pytest.raises(ValueError, match="needs a closure"):
        AMP(model.parameters(), lr=0.1, epsilon=0.5).step()
    params = list(model.parameters())
    opt = AMP([{"params": params[:2], "epsilon": 0.1}, {"params": params[2:]}], lr=0.1, epsilon=0.5, ball="global")
    x, y = batches(1)[0]
    with pytest.raises(ValueError, match="one epsilon"):
        opt.step(make_closure(model, opt, x, y))
    assert not opt.perturbed


# ---- configs/amp/*.yaml ------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FIELDS = set("""
dataset data_dir download train_size test_size model dropout optimizer epochs batch_size lr momentum
nesterov weight_decay schedule milestones lr_decay lr_updates_per_epoch clip_norm augment crop_padding
pad_mode pad_fill flip cutout cutout_size cutout_prob cutout_style autoaugment mean std epsilon inner_lr
inner_iter amp_ball gamma alpha arwp arwp_eta arwp_beta gamma_final rho adaptive_eta bn_update seed device
precision channels_last compile workers eval_every out_dir name paper_ref paper_error paper_spread
paper_nll label_smoothing label_smoothing_style flooding mixup_alpha mixup_beta adv_epsilon adv_step adv_iter
rmp_epsilon
""".split())
DATASETS = ("svhn", "cifar10", "cifar100")
CUTOUT_SIZE = {"cifar10": 16, "cifar100": 8, "svhn": 20}
# hiyouga/AMP-Regularizer @ 87e689f README.md and the AMP paper (arXiv 2010.04925): (epsilon, inner_lr, inner_iter)
HYPER = {"preactresnet18": (0.5, 1, 1), "vgg16": (0.1, 0.2, 1),
         "standard": (0.5, 1, 1), "cutout": (0.3, 0.5, 1), "autoaugment": (0.1, 0.1, 1)}
# AMP paper (arXiv 2010.04925), Table A as in the authors' slides and poster (hiyouga/AMP-Poster-Slides-LaTeX
# slides/experiments.tex): model -> method -> (error, spread, NLL) on SVHN, CIFAR-10, CIFAR-100
TABLE_A = {
    "preactresnet18": {
        "erm": ((2.95, 0.063, 0.166), (5.02, 0.212, 0.239), (24.31, 0.303, 1.056)),
        "dropout": ((2.80, 0.065, 0.156), (4.86, 0.148, 0.223), (24.48, 0.351, 1.110)),
        "smoothing": ((2.78, 0.087, 0.998), (4.85, 0.115, 1.038), (22.07, 0.256, 2.099)),
        "flooding": ((2.84, 0.047, 0.130), (4.97, 0.082, 0.166), (24.50, 0.234, 0.950)),
        "mixup": ((2.74, 0.044, 0.146), (4.09, 0.117, 0.198), (21.78, 0.210, 0.910)),
        "adv": ((2.77, 0.080, 0.151), (4.99, 0.085, 0.247), (25.23, 0.229, 1.110)),
        "rmp": ((2.93, 0.066, 0.161), (4.97, 0.167, 0.239), (24.28, 0.138, 1.059)),
        "amp": ((2.30, 0.025, 0.096), (3.97, 0.091, 0.129), (21.51, 0.308, 0.774))},
    "vgg16": {
        "erm": ((3.14, 0.060, 0.140), (6.32, 0.193, 0.361), (27.84, 0.297, 1.827)),
        "dropout": ((2.96, 0.049, 0.134), (6.22, 0.147, 0.314), (27.72, 0.337, 1.605)),
        "smoothing": ((3.07, 0.070, 1.004), (6.29, 0.158, 1.076), (27.49, 0.179, 2.310)),
        "flooding": ((3.15, 0.085, 0.128), (6.26, 0.145, 0.234), (27.93, 0.271, 1.221)),
        "mixup": ((3.09, 0.057, 0.160), (5.48, 0.112, 0.251), (26.81, 0.254, 1.136)),
        "adv": ((2.94, 0.091, 0.122), (6.49, 0.130, 0.380), (29.12, 0.145, 1.535)),
        "rmp": ((3.19, 0.052, 0.134), (6.30, 0.109, 0.363), (27.81, 0.327, 1.873)),
        "amp": ((2.73, 0.015, 0.116), (5.65, 0.147, 0.207), (25.60, 0.168, 1.049))},
}
# the authors' flags (hiyouga/AMP-Regularizer README.md at 768b374) in our names
BASELINES = {"dropout": {"dropout": 0.1}, "smoothing": {"label_smoothing": 0.2, "label_smoothing_style": "amp"},
             "flooding": {"flooding": 0.02}, "mixup": {"mixup_alpha": 1.0, "mixup_beta": 1.0},
             "adv": {"adv_epsilon": 1, "adv_step": 1, "adv_iter": 1}, "rmp": {"rmp_epsilon": 0.1}}
METHOD_FIELDS = {k for v in BASELINES.values() for k in v}
# AMP paper (arXiv 2010.04925), WRN-28-10/PyramidNet table: (dataset, aug) -> WRN ERM, WRN AMP, PyramidNet ERM, PyramidNet AMP (error, spread)
TABLE_B = {
    ("svhn", "standard"): ((2.57, 0.067), (2.19, 0.036), (2.47, 0.034), (2.11, 0.041)),
    ("svhn", "cutout"): ((2.27, 0.085), (1.83, 0.018), (2.19, 0.021), (1.82, 0.023)),
    ("svhn", "autoaugment"): ((1.91, 0.059), (1.61, 0.024), (1.80, 0.044), (1.35, 0.056)),
    ("cifar10", "standard"): ((3.87, 0.167), (3.00, 0.059), (3.60, 0.197), (2.75, 0.040)),
    ("cifar10", "cutout"): ((3.38, 0.081), (2.67, 0.043), (2.83, 0.102), (2.27, 0.034)),
    ("cifar10", "autoaugment"): ((2.78, 0.134), (2.32, 0.097), (2.49, 0.128), (1.98, 0.062)),
    ("cifar100", "standard"): ((19.17, 0.270), (17.33, 0.110), (17.13, 0.210), (15.09, 0.092)),
    ("cifar100", "cutout"): ((18.12, 0.114), (16.04, 0.071), (16.45, 0.136), (14.34, 0.153)),
    ("cifar100", "autoaugment"): ((17.79, 0.185), (14.95, 0.088), (15.43, 0.269), (13.36, 0.245)),
}


def expected_rows():
    """file name -> (model, dataset, aug, method, paper error, paper spread[, paper NLL])"""
    rows = {}
    for model, per_method in TABLE_A.items():
        for method, cells in per_method.items():
            for dataset, cell in zip(DATASETS, cells):
                rows[f"tableA_{dataset}_{model}_{method}.yaml"] = (model, dataset, "standard", method, *cell)
    for (dataset, aug), (wrn_erm, wrn_amp, pyr_erm, pyr_amp) in TABLE_B.items():
        for model, erm, amp_ in (("wrn28_10", wrn_erm, wrn_amp), ("pyramidnet164_270", pyr_erm, pyr_amp)):
            rows[f"tableB_{dataset}_{model}_{aug}_erm.yaml"] = (model, dataset, aug, "erm", *erm)
            rows[f"tableB_{dataset}_{model}_{aug}_amp.yaml"] = (model, dataset, aug, "amp", *amp_)
    return rows


def test_amp_configs_match_paper_tables():
    rows = expected_rows()
    assert len(rows) == 48 + 36
    found = {os.path.basename(f) for f in glob.glob(os.path.join(ROOT, "configs", "amp", "*.yaml"))}
    assert found == set(rows)
    for fname, (model, dataset, aug, method, error, spread, *nll) in rows.items():
        path = os.path.join(ROOT, "configs", "amp", fname)
        text = open(path).read()
        assert text.startswith("#") and f"python main.py --config configs/amp/{fname} --seed 0" in text, fname
        cfg = yaml.safe_load(text)
        assert set(cfg) <= CONFIG_FIELDS, (fname, set(cfg) - CONFIG_FIELDS)
        assert all(isinstance(v, (str, int, float, bool, list)) for v in cfg.values()), fname
        assert (cfg["dataset"], cfg["model"]) == (dataset, model), fname
        assert cfg["paper_error"] == error and cfg["paper_spread"] == spread and cfg["paper_ref"], fname
        assert cfg.get("paper_nll") == (nll[0] if nll else None), fname
        assert {k: cfg[k] for k in METHOD_FIELDS & set(cfg)} == BASELINES.get(method, {}), fname
        if method in BASELINES:
            assert cfg["optimizer"] == "sgd" and not {"epsilon", "inner_lr", "inner_iter"} & set(cfg), fname
            assert "hiyouga/AMP-Regularizer README.md at 768b374" in text, fname
        elif method == "erm":
            assert cfg["optimizer"] == "sgd" and not {"epsilon", "inner_lr", "inner_iter"} & set(cfg), fname
        else:
            hyper = HYPER[model if fname.startswith("tableA") else aug]
            assert cfg["optimizer"] == "amp", fname
            assert (cfg["epsilon"], cfg["inner_lr"], cfg.get("inner_iter", 1)) == hyper, fname
        # augmentation as in the official data_utils.py (defaults: crop pad 4 + flip, no Cutout)
        assert cfg.get("cutout", False) == (aug != "standard"), fname
        assert cfg.get("autoaugment", False) == (aug == "autoaugment"), fname
        if aug != "standard":
            assert cfg["cutout_size"] == CUTOUT_SIZE[dataset], fname
        if dataset == "svhn":
            assert cfg["crop_padding"] == 2 and cfg["flip"] is False, fname
            assert cfg.get("augment", True) == (aug != "autoaugment"), fname  # SVHN AutoAugment: no crop
        else:
            assert cfg.get("augment", True) and "crop_padding" not in cfg and "flip" not in cfg, fname


def test_amp_configs_use_runner_fields():
    """Every key of every AMP config is a field of the runner's Config."""
    import main
    names = set(main.Config.__dataclass_fields__)
    for path in glob.glob(os.path.join(ROOT, "configs", "amp", "*.yaml")):
        cfg = yaml.safe_load(open(path))
        assert set(cfg) <= names, (path, set(cfg) - names)
