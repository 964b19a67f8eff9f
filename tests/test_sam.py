"""SAM/ASAM invariants (CPU, tiny model) and the SAM-paper configs."""
import contextlib
import copy
import dataclasses
import glob
import io
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from conftest import ROOT, forbid_host_sync
from sam import SAM

SGD_KW = dict(momentum=0.9, nesterov=True, weight_decay=5e-4)


class Net(nn.Module):
    """Conv (no bias) → BN → ReLU → pool → Linear (bias); plus a layer that never gets a grad."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def make(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return Net().to(dtype)


def batches(n, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 5, 5, generator=g).to(dtype), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def closure_for(model, opt, x, y, log=None):
    def closure():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        if log is not None:
            log.append(({n: p.detach().clone() for n, p in model.named_parameters()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        return out, loss.detach()
    return closure


def bn_buffers(model):
    return [b.clone() for b in model.bn.buffers()]


def assert_same_model(a, b):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    for (n, p), q in zip(a.named_buffers(), b.buffers()):
        assert torch.equal(p, q), n


# ---------------------------------------------------------------- radius 0 = base optimizer

@pytest.mark.parametrize("adaptive", [False, True])
def test_rho0_equals_sgd_bit_for_bit(adaptive):
    ref, m = make(), make()
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, **SGD_KW)
    opt = SAM(m.parameters(), lr=0.1, rho=0.0, adaptive=adaptive, model=m, **SGD_KW)
    for x, y in batches(4):
        sgd.step(closure_for(ref, sgd, x, y))
        opt.step(closure_for(m, opt, x, y))
        assert_same_model(ref, m)  # bn_update='clean' (default with a model): buffers too


def test_rho0_bn_all_keeps_params_equal():
    ref, m = make(), make()
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, **SGD_KW)
    opt = SAM(m.parameters(), lr=0.1, rho=0.0, bn_update="all", model=m, **SGD_KW)
    for x, y in batches(3):
        sgd.step(closure_for(ref, sgd, x, y))
        opt.step(closure_for(m, opt, x, y))
    for p, q in zip(ref.parameters(), m.parameters()):
        assert torch.equal(p, q)
    assert m.bn.num_batches_tracked.item() == 6  # both passes updated the running stats


# ---------------------------------------------------------------- the perturbation itself

def asam_t(name, p, eta):
    return p.abs() + eta if "weight" in name.rsplit(".", 1)[-1] else torch.ones_like(p)


@pytest.mark.parametrize("adaptive", [False, True])
def test_perturbation_seen_inside_closure(adaptive):
    m = make(torch.float64)
    rho, eta = 0.3, 0.01
    opt = SAM(m.parameters(), lr=0.1, rho=rho, adaptive=adaptive, eta=eta, model=m)
    log = []
    x, y = batches(1, torch.float64)[0]
    opt.step(closure_for(m, opt, x, y, log))
    (theta, g), (theta_eps, _) = log
    assert "unused.weight" not in g and torch.equal(theta_eps["unused.weight"], theta["unused.weight"])
    eps = {n: theta_eps[n] - theta[n] for n in g}
    if not adaptive:  # ε̂ = ρ g / ‖g‖, ‖ε̂‖ = ρ
        gnorm = torch.sqrt(sum((v ** 2).sum() for v in g.values()))
        for n in g:
            torch.testing.assert_close(eps[n], rho * g[n] / gnorm)
        torch.testing.assert_close(torch.sqrt(sum((e ** 2).sum() for e in eps.values())),
                                   torch.tensor(rho, dtype=torch.float64))
    else:  # ε̂ = ρ T² g / ‖T g‖, T = |w|+η for "weight" names (BN weight included), 1 for biases
        t = {n: asam_t(n, theta[n], eta) for n in g}
        tgnorm = torch.sqrt(sum(((t[n] * g[n]) ** 2).sum() for n in g))
        for n in g:
            torch.testing.assert_close(eps[n], rho * t[n] ** 2 * g[n] / tgnorm)
        assert not torch.allclose(t["bn.weight"], torch.ones_like(t["bn.weight"]))
        assert torch.equal(t["bn.bias"], torch.ones_like(t["bn.bias"]))
        # ‖T⁻¹ ε̂‖ = ρ: the adaptive ball
        torch.testing.assert_close(torch.sqrt(sum(((eps[n] / t[n]) ** 2).sum() for n in g)),
                                   torch.tensor(rho, dtype=torch.float64))


def test_asam_without_model_scales_tensors_with_2_or_more_dims():
    m = make(torch.float64)
    opt = SAM(m.parameters(), lr=0.1, rho=0.2, adaptive=True, eta=0.01)
    x, y = batches(1, torch.float64)[0]
    closure_for(m, opt, x, y)()
    theta = {n: p.detach().clone() for n, p in m.named_parameters()}
    g = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    opt.perturb()
    t = {n: theta[n].abs() + 0.01 if theta[n].dim() >= 2 else torch.ones_like(theta[n]) for n in g}
    tgnorm = torch.sqrt(sum(((t[n] * g[n]) ** 2).sum() for n in g))
    for n, p in m.named_parameters():
        if n in g:
            torch.testing.assert_close(p - theta[n], 0.2 * t[n] ** 2 * g[n] / tgnorm)
    opt.restore()


# ---------------------------------------------------------------- equality with a plain loop

def reference_run(model, data, groups, adaptive, eta, lr, momentum, wd, delta=1e-12):
    """Per-parameter SAM/ASAM + Nesterov-SGD written out by hand; groups: [(names, rho)]."""
    params = dict(model.named_parameters())
    bufs = {}
    for x, y in data:
        for p in params.values():
            p.grad = None
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            t = {n: asam_t(n, p, eta) if adaptive else torch.ones_like(p)
                 for n, p in params.items() if p.grad is not None}
            norm = torch.sqrt(sum(((t[n] * params[n].grad) ** 2).sum() for n in t))
            saved = {n: params[n].clone() for n in t}
            for names, rho in groups:
                for n in names:
                    if n in t:
                        params[n].add_(rho * t[n] ** 2 * params[n].grad / (norm + delta))
        for p in params.values():
            p.grad = None
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for n in saved:
                params[n].copy_(saved[n])
            for n, p in params.items():
                if p.grad is None:
                    continue
                d = p.grad + wd * p
                bufs[n] = d.clone() if n not in bufs else momentum * bufs[n] + d
                p.sub_(lr * (d + momentum * bufs[n]))  # Nesterov


@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_reference_loop(adaptive):
    ref, m = make(torch.float64), make(torch.float64)
    data = batches(4, torch.float64)
    names_a = ["conv.weight", "bn.weight", "bn.bias"]
    names_b = ["fc.weight", "fc.bias", "unused.weight", "unused.bias"]
    reference_run(ref, data, [(names_a, 0.05), (names_b, 0.2)], adaptive, 0.01, 0.1, 0.9, 5e-4)
    p = dict(m.named_parameters())
    opt = SAM([{"params": [p[n] for n in names_a]}, {"params": [p[n] for n in names_b], "rho": 0.2}],
              lr=0.1, rho=0.05, adaptive=adaptive, eta=0.01, model=m, bn_update="all", **SGD_KW)
    for x, y in data:
        opt.step(closure_for(m, opt, x, y))
    for (n, a), b in zip(ref.named_parameters(), m.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14, msg=n)
    for a, b in zip(ref.buffers(), m.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_two_phase_api_equals_step():
    a, b = make(), make()
    oa = SAM(a.parameters(), lr=0.1, rho=0.1, model=a, **SGD_KW)
    ob = SAM(b.parameters(), lr=0.1, rho=0.1, model=b, **SGD_KW)
    for x, y in batches(3):
        out, loss = oa.step(closure_for(a, oa, x, y))
        F.cross_entropy(b(x), y).backward()
        ob.first_step(zero_grad=True)
        F.cross_entropy(b(x), y).backward()
        ob.second_step(zero_grad=True)
        assert_same_model(a, b)
        assert out.shape == (8, 3) and loss.dim() == 0


# ---------------------------------------------------------------- exact restore, BN policy

def test_weights_restored_exactly():
    m = make()
    opt = SAM(m.parameters(), lr=0.0, rho=0.5, adaptive=True, model=m)  # lr 0: the step changes nothing
    before = copy.deepcopy(m)
    x, y = batches(1)[0]
    closure_for(m, opt, x, y)()
    before_bn = bn_buffers(m)
    opt.perturb()
    assert not torch.equal(m.conv.weight, before.conv.weight)
    m(x)  # a perturbed forward in train mode moves the BN stats
    opt.restore()
    for p, q in zip(m.parameters(), before.parameters()):
        assert torch.equal(p, q)
    for b, c in zip(bn_buffers(m), before_bn):
        assert torch.equal(b, c)
    opt.step(closure_for(m, opt, x, y))
    for p, q in zip(m.parameters(), before.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("bn_update", ["clean", "all"])
def test_bn_update_policy(bn_update):
    m = make()
    opt = SAM(m.parameters(), lr=0.1, rho=0.5, model=m, bn_update=bn_update, **SGD_KW)
    x, y = batches(1)[0]
    clean = copy.deepcopy(m)
    clean(x)  # the running stats after the clean pass alone
    opt.step(closure_for(m, opt, x, y))
    same = all(torch.equal(a, b) for a, b in zip(bn_buffers(m), bn_buffers(clean)))
    assert same == (bn_update == "clean")


def test_default_bn_update():
    m = make()
    assert SAM(m.parameters(), lr=0.1, model=m).bn_update == "clean"
    assert SAM(m.parameters(), lr=0.1).bn_update == "all"


# ---------------------------------------------------------------- checkpoints, schedulers

def test_state_dict_round_trip_continues_identically():
    m = make()
    opt = SAM(m.parameters(), lr=0.1, rho=0.05, model=m, **SGD_KW)
    data = batches(5)
    for x, y in data[:2]:
        opt.step(closure_for(m, opt, x, y))
    sd = opt.state_dict()
    assert all("momentum_buffer" in s for s in sd["state"].values()) and sd["state"]
    assert all(set(s) == {"momentum_buffer"} for s in sd["state"].values())  # no scratch
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "opt": sd}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    m2 = make(seed=123)
    m2.load_state_dict(ck["model"])
    opt2 = SAM(m2.parameters(), lr=0.5, rho=0.05, model=m2, **SGD_KW)
    opt2.load_state_dict(ck["opt"])
    assert opt2.param_groups is opt2.base_optimizer.param_groups and opt2.param_groups[0]["lr"] == 0.1
    for x, y in data[2:]:
        opt.step(closure_for(m, opt, x, y))
        opt2.step(closure_for(m2, opt2, x, y))
        assert_same_model(m, m2)


def test_scheduler_on_wrapper_drives_base_optimizer():
    m = make()
    opt = SAM(m.parameters(), lr=0.1, model=m, **SGD_KW)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    x, y = batches(1)[0]
    opt.step(closure_for(m, opt, x, y))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + 0.70710678118))


def test_add_param_group_reaches_base_optimizer():
    m = make()
    opt = SAM([m.conv.weight], lr=0.1, rho=0.05, model=m, **SGD_KW)
    opt.add_param_group({"params": [m.fc.weight, m.fc.bias], "rho": 0.1})
    assert len(opt.base_optimizer.param_groups) == 2 and opt.param_groups[1]["momentum"] == 0.9
    x, y = batches(1)[0]
    opt.step(closure_for(m, opt, x, y))


# ---------------------------------------------------------------- no host sync, DDP no_sync

@pytest.mark.parametrize("adaptive", [False, True])
def test_step_has_no_host_sync(adaptive):
    m = make()
    opt = SAM(m.parameters(), lr=0.1, rho=0.05, adaptive=adaptive, model=m, **SGD_KW)
    data = batches(2)
    with forbid_host_sync():
        for x, y in data:
            opt.step(closure_for(m, opt, x, y))
    assert torch.isfinite(m.fc.weight).all()


class SyncRecorder(Net):
    """Stands in for a DDP model: a no_sync() context that records which pass ran inside it."""

    def __init__(self):
        super().__init__()
        self.inside = False
        self.calls = []

    @contextlib.contextmanager
    def no_sync(self):
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def forward(self, x):
        self.calls.append(self.inside)
        return super().forward(x)


def test_clean_pass_runs_inside_model_no_sync():
    torch.manual_seed(0)
    m = SyncRecorder()
    opt = SAM(m.parameters(), lr=0.1, model=m, **SGD_KW)
    x, y = batches(1)[0]
    with forbid_host_sync():
        opt.step(closure_for(m, opt, x, y))
    assert m.calls == [True, False]  # clean pass un-synced, perturbed pass synced


def test_explicit_no_sync_factory():
    m = make()
    entered = []

    @contextlib.contextmanager
    def no_sync():
        entered.append(True)
        yield

    opt = SAM(m.parameters(), lr=0.1, model=m, no_sync=no_sync)
    x, y = batches(1)[0]
    opt.step(closure_for(m, opt, x, y))
    assert entered == [True]


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs, word", [
    (dict(rho=-0.1), "rho"), (dict(rho=float("nan")), "rho"), (dict(rho="0.1"), "rho"),
    (dict(eta=-1.0), "eta"), (dict(adaptive="yes"), "adaptive"),
    (dict(bn_update="sometimes"), "bn_update"), (dict(bn_update="clean", model=None), "bn_update"),
    (dict(base_optimizer="sgd"), "base_optimizer"), (dict(model="net"), "model"),
    (dict(no_sync=3), "no_sync"),
])
def test_validation_errors_name_the_argument(kwargs, word):
    m = make()
    kw = dict(model=m)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=word):
        SAM(m.parameters(), lr=0.1, **kw)


@pytest.mark.parametrize("adaptive", [False, True])
def test_step_returns_detached_values(adaptive):
    """Like AMP: the caller gets the clean pass's values, not tensors that keep the graph."""
    model = make()
    opt = SAM(model.parameters(), lr=0.1, rho=0.05, adaptive=adaptive, model=model, **SGD_KW)
    (x, y), = batches(1)

    def closure():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        return out, loss  # not detached
    out, loss = opt.step(closure)
    assert not out.requires_grad and not loss.requires_grad and loss.grad_fn is None


def test_step_without_closure_is_an_error():
    m = make()
    with pytest.raises(ValueError, match="closure"):
        SAM(m.parameters(), lr=0.1, model=m).step()


def test_restore_without_perturb_is_an_error():
    m = make()
    with pytest.raises(RuntimeError, match="perturb"):
        SAM(m.parameters(), lr=0.1, model=m).restore()


# ---------------------------------------------------------------- configs

CONFIG_FIELDS = set("""
dataset data_dir download train_size test_size model dropout optimizer epochs batch_size lr
momentum nesterov weight_decay schedule milestones lr_decay lr_updates_per_epoch clip_norm augment
crop_padding pad_mode pad_fill flip cutout cutout_size cutout_prob cutout_style autoaugment mean std
epsilon inner_lr inner_iter amp_ball gamma alpha arwp arwp_eta arwp_beta gamma_final rho adaptive_eta
bn_update seed device precision channels_last compile workers eval_every out_dir name paper_ref autoaugment_first
paper_error paper_spread weight_decay_in_loss drop_last label_smoothing sam_m asam_all_params
autoaugment_policy""".split())

# SAM paper Table 1 (WRN-28-10, 200 epochs): (aug, dataset, optimizer) → (error, spread)
TABLE1 = {
    ("basic", "cifar10", "sgd"): (3.5, 0.1), ("basic", "cifar10", "sam"): (2.7, 0.1),
    ("basic", "cifar100", "sgd"): (18.8, 0.2), ("basic", "cifar100", "sam"): (16.5, 0.2),
    ("cutout", "cifar10", "sgd"): (2.6, 0.1), ("cutout", "cifar10", "sam"): (2.3, 0.1),
    ("cutout", "cifar100", "sgd"): (16.9, 0.1), ("cutout", "cifar100", "sam"): (14.9, 0.2),
    ("autoaugment", "cifar10", "sgd"): (2.3, 0.1), ("autoaugment", "cifar10", "sam"): (2.1, 0.1),
    ("autoaugment", "cifar100", "sgd"): (15.8, 0.2), ("autoaugment", "cifar100", "sam"): (13.6, 0.2),
}
# SAM paper appendix Table 5 (Fashion-MNIST) and our own AMP/RWP rows (no paper number).
FASHION = {("basic", "sgd"): (4.57, 0.07), ("basic", "sam"): (3.98, 0.05),
           ("cutout", "sgd"): (3.86, 0.14), ("cutout", "sam"): (3.61, 0.06),
           ("basic", "amp"): None, ("basic", "rwp"): None, ("cutout", "amp"): None, ("cutout", "rwp"): None}
COMMON = dict(model="sam_wrn28_10", drop_last=True, batch_size=256, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
              schedule="cosine", clip_norm=5, augment=True, crop_padding=4, pad_mode="reflect", flip=True)


def load(rel):
    path = os.path.join(ROOT, rel)
    with open(path) as f:
        text = f.read()
    assert text.startswith("# ") and f"python main.py --config {rel} --seed 0" in text, rel
    return text, yaml.safe_load(text)


def config_files():
    return sorted(os.path.relpath(p, ROOT) for d in ("sam", "fashionmnist")
                  for p in glob.glob(os.path.join(ROOT, "configs", d, "*.yaml")))


def test_config_set_is_complete():
    expected = {f"configs/sam/wrn28_10_{ds}_{aug}_{opt}.yaml" for aug, ds, opt in TABLE1}
    expected |= {f"configs/fashionmnist/wrn28_10_{aug}_{opt}.yaml" for aug, opt in FASHION}
    assert set(config_files()) == expected


@pytest.mark.parametrize("rel", config_files())
def test_config_uses_contract_fields_only(rel):
    _, cfg = load(rel)
    assert set(cfg) <= CONFIG_FIELDS, set(cfg) - CONFIG_FIELDS
    try:  # once the runner exists, its Config is the authority
        import main
    except ImportError:
        return
    if dataclasses.is_dataclass(getattr(main, "Config", None)):
        assert set(cfg) <= {f.name for f in dataclasses.fields(main.Config)}


@pytest.mark.parametrize("key", sorted(TABLE1))
def test_cifar_config_matches_sam_paper(key):
    aug, ds, opt = key
    text, cfg = load(f"configs/sam/wrn28_10_{ds}_{aug}_{opt}.yaml")
    for k, v in COMMON.items():
        assert cfg[k] == v, k
    assert (cfg["dataset"], cfg["optimizer"], cfg["epochs"]) == (ds, opt, 200)
    assert cfg["lr_updates_per_epoch"] == 50000 // 256
    assert cfg.get("cutout", False) == (aug == "cutout")
    assert cfg.get("autoaugment", False) == (aug == "autoaugment")
    assert cfg.get("autoaugment_first", False) == (aug == "autoaugment")  # policy, then flip + crop
    assert cfg.get("autoaugment_policy", "torchvision") == ("sam" if aug == "autoaugment" else "torchvision")
    if aug == "cutout":
        assert (cfg["cutout_size"], cfg["cutout_prob"], cfg["cutout_style"]) == (16, 1.0, "rwp")
    assert len(cfg["mean"]) == len(cfg["std"]) == 3
    assert cfg["weight_decay_in_loss"] is True  # the SAM code's L2 term in the loss
    if opt == "sam":
        assert cfg["rho"] == (0.05 if ds == "cifar10" else 0.10) and cfg["bn_update"] == "clean"
    else:
        assert "rho" not in cfg
    assert (cfg["paper_error"], cfg["paper_spread"]) == TABLE1[key]
    assert "Table 1" in cfg["paper_ref"] and f"{cfg['paper_error']} ± " in text


@pytest.mark.parametrize("key", sorted(FASHION))
def test_fashionmnist_config_matches_protocol(key):
    aug, opt = key
    text, cfg = load(f"configs/fashionmnist/wrn28_10_{aug}_{opt}.yaml")
    for k, v in COMMON.items():
        assert cfg[k] == v, k
    assert (cfg["dataset"], cfg["optimizer"], cfg["epochs"]) == ("fashionmnist", opt, 200)
    assert cfg["lr_updates_per_epoch"] == 60000 // 256
    assert (cfg["mean"], cfg["std"]) == ([0.1307], [0.3081])
    assert cfg.get("cutout", False) == (aug == "cutout") and not cfg.get("autoaugment", False)
    if aug == "cutout":
        assert (cfg["cutout_size"], cfg["cutout_prob"], cfg["cutout_style"]) == (16, 1.0, "rwp")
    assert cfg.get("weight_decay_in_loss", False) == (opt in ("sgd", "sam"))  # AMP/RWP: their own placement
    if opt == "sam":
        assert cfg["rho"] == 0.05 and cfg["bn_update"] == "clean"
    if opt == "amp":
        assert (cfg["epsilon"], cfg["inner_lr"], cfg["inner_iter"]) == ((0.5, 1, 1) if aug == "basic" else (0.3, 0.5, 1))
    if opt == "rwp":
        assert (cfg["gamma"], cfg["alpha"]) == (0.01, 0.5)
    if FASHION[key] is None:
        assert "OUR OWN PROTOCOL, not a paper row" in text and not any(k.startswith("paper_") for k in cfg)
    else:
        assert (cfg["paper_error"], cfg["paper_spread"]) == FASHION[key]
        assert "Table 5" in cfg["paper_ref"] and "95% confidence interval over 5 runs" in text
