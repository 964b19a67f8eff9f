"""AMP Table A baselines (runner/methods.py) against plain references written here: smoothing
targets, flooding's sign flip, MixUp, L∞ PGD and RMP; each composing with every optimizer; the
recorded test NLL and criterion loss; report.py's NLL columns."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import main
import report
from conftest import forbid_host_sync
from runner.config import parse_config
from runner.methods import Criterion, Regularizers, mix, pgd_linf
from runner.training import build_optimizer, make_closure

K = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, K)).to(dtype)


def data(n=8, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g, dtype=dtype), torch.randint(0, K, (n,), generator=g)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)


def train(model, regularizers, steps=3, clip=50.0, seed=7):
    """`steps` SGD steps through the runner's closure; returns the weights and BN buffers."""
    opt, params = sgd(model), list(model.parameters())
    torch.manual_seed(seed)
    for s in range(steps):
        opt.step(make_closure(opt, model, params, [data(seed=s)], clip_norm=clip, regularizers=regularizers))
    return [t.clone() for t in model.state_dict().values()]


def assert_same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---- label smoothing ---------------------------------------------------------------------------

@pytest.mark.parametrize("style", ["torch", "amp"])
def test_smoothing_targets_match_the_written_out_distribution(style):
    out, y = torch.randn(6, K, dtype=torch.float64, requires_grad=True), torch.randint(0, K, (6,))
    eps = 0.2
    q = torch.full((6, K), eps / (K - 1) if style == "amp" else eps / K, dtype=torch.float64)
    q[torch.arange(6), y] = 1 - eps if style == "amp" else 1 - eps + eps / K
    assert torch.allclose(q.sum(1), torch.ones(6, dtype=torch.float64))
    reference = -(q * F.log_softmax(out, 1)).sum(1).mean()
    loss = Criterion(K, eps, style)(out, y)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
    g, = torch.autograd.grad(loss, out)
    g_ref, = torch.autograd.grad(reference, out)
    assert torch.allclose(g, g_ref, rtol=0, atol=1e-15)
    if style == "amp":  # the AMP code's ε is PyTorch's ε·K/(K−1): the same targets
        assert loss.item() == pytest.approx(F.cross_entropy(out, y, label_smoothing=eps * K / (K - 1)).item(), rel=1e-12)


# ---- flooding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("level", [0.0, 0.3, 50.0])
def test_flooding_flips_the_gradient_below_the_level(level):
    out, y = torch.randn(6, K, dtype=torch.float64, requires_grad=True), torch.randint(0, K, (6,))
    plain = F.cross_entropy(out, y)
    g_plain, = torch.autograd.grad(plain, out)
    flooded = Criterion(K, flooding=level)(out, y)
    g, = torch.autograd.grad(flooded, out)
    assert flooded.item() == pytest.approx(abs(plain.item() - level) + level, rel=1e-14)
    sign = -1.0 if plain.item() < level else 1.0  # b = 50 is above the loss: ascent
    assert torch.equal(g, sign * g_plain)


def test_flooded_test_loss_is_per_group_of_the_batch_size():
    torch.manual_seed(0)
    out, y = torch.randn(10, K, dtype=torch.float64) * 4, torch.randint(0, K, (10,))
    crit = Criterion(K, flooding=6.0)  # group losses 7.1, 5.1, 5.7: one above the level, two below
    reference = sum(len(y[i:i + 4]) * (abs(F.cross_entropy(out[i:i + 4], y[i:i + 4]).item() - 6.0) + 6.0)
                    for i in range(0, 10, 4))  # groups 4, 4, 2
    assert crit.test_sum(out, y, 4).item() == pytest.approx(reference, rel=1e-12)
    assert Criterion(K).test_sum(out, y, 4).item() == pytest.approx(F.cross_entropy(out, y, reduction="sum").item())


# ---- MixUp -------------------------------------------------------------------------------------

def test_mixup_mixes_each_sample_with_its_own_lambda():
    x, y = data()
    lam, perm = torch.rand(8, dtype=torch.float64), torch.randperm(8)
    xm, y2 = mix(x, y, lam, perm)
    for i in range(8):
        assert torch.equal(xm[i], lam[i] * x[i] + (1 - lam[i]) * x[perm[i]]) and y2[i] == y[perm[i]]
    out = torch.randn(8, K, dtype=torch.float64)
    q = lam[:, None] * F.one_hot(y, K) + (1 - lam[:, None]) * F.one_hot(y[perm], K)  # targets as vectors
    reference = -(q * F.log_softmax(out, 1)).sum(1).mean()
    assert Criterion(K)(out, y, lam, y2).item() == pytest.approx(reference.item(), rel=1e-12)


def test_mixup_lambda_is_beta_per_sample():
    reg = Regularizers(Criterion(K), mixup=(2.0, 6.0))
    torch.manual_seed(0)
    lam, perm = reg.draw_mix(20000, torch.device("cpu"))
    assert lam.shape == (20000,) and sorted(perm.tolist()) == list(range(20000))
    assert lam.mean().item() == pytest.approx(2 / 8, abs=0.005)  # Beta(2, 6): mean 1/4, var 1/48
    assert lam.var().item() == pytest.approx(2 * 6 / (8 ** 2 * 9), rel=0.05)


class _LambdaOne(Regularizers):
    def draw_mix(self, n, device):
        return torch.ones(n, dtype=torch.float64), torch.randperm(n, device=device)


def test_mixup_with_lambda_one_is_erm():
    ours = train(tiny(), _LambdaOne(Criterion(K), mixup=(1.0, 1.0)))
    erm = train(tiny(), None)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-13) for a, b in zip(ours, erm))


# ---- adversarial training ----------------------------------------------------------------------

def test_pgd_is_the_written_out_attack_in_eval_mode():
    model, (x, y) = tiny(), data()
    model.train()
    bn = [b.clone() for b in model.buffers()]
    crit, eps, step = Criterion(K), 3 / 255, 2 / 255
    torch.manual_seed(5)
    ours = pgd_linf(model, crit, x, y, eps, step, 2)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert_same(bn, list(model.buffers()))  # BN statistics untouched by the attack
    torch.manual_seed(5)
    ref = x + torch.empty_like(x).uniform_(-eps, eps)
    model.eval()
    for _ in range(2):
        ref.requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(model(ref), y), ref)
        ref = torch.min(torch.max(ref.detach() + step * g.sign(), x - eps), x + eps)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-15) and (ours - x).abs().max() <= eps + 1e-15


def test_adversarial_training_with_radius_zero_is_erm():
    model = tiny()
    ours = train(model, Regularizers(Criterion(K), model, adversarial=(0.0, 1 / 255, 1)))
    assert_same(ours, train(tiny(), None))


# ---- RMP ---------------------------------------------------------------------------------------

def test_rmp_with_epsilon_zero_is_erm():
    model = tiny()
    ours = train(model, Regularizers(Criterion(K), model, model.parameters(), rmp_epsilon=0.0))
    assert_same(ours, train(tiny(), None))


def test_rmp_step_is_the_gradient_at_noisy_weights_applied_to_clean_ones():
    eps, (x, y) = 0.1, data(seed=0)  # train()'s first batch
    model = tiny()
    reg = Regularizers(Criterion(K), model, model.parameters(), rmp_epsilon=eps)
    ours = train(model, reg, steps=1, clip=0.5)
    ref = tiny()
    params = list(ref.parameters())
    clean = [p.detach().clone() for p in params]
    torch.manual_seed(7)
    with torch.no_grad():
        for p in params:  # trainer.py _reset_perturbation_rmp: U(±√(ε/numel)), one tensor after another
            b = math.sqrt(eps / p.numel())
            p.add_(torch.empty_like(p).uniform_(-b, b))
    F.cross_entropy(ref(x), y).backward()
    nn.utils.clip_grad_norm_(params, 0.5)
    with torch.no_grad():
        for p, c in zip(params, clean):
            p.copy_(c)
    sgd(ref).step()
    assert all(torch.allclose(a, b, rtol=0, atol=1e-14) for a, b in zip(ours, ref.state_dict().values()))
    assert not torch.equal(ours[0], train(tiny(), None, steps=1, clip=0.5)[0])  # the noise did something


# ---- every optimizer, no host sync -------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["sgd", "amp", "sam", "asam", "rwp"])
def test_all_methods_compose_with_every_optimizer_without_host_sync(optimizer):
    cfg, _ = parse_config(["--optimizer", optimizer, "--label_smoothing", "0.1", "--label_smoothing_style", "amp",
                           "--flooding", "0.02", "--mixup_alpha", "1", "--adv_epsilon", "2", "--rmp_epsilon", "0.1",
                           "--dataset", "synthetic"])
    from runner.methods import build_regularizers
    model = tiny(dtype=torch.float32)
    opt = build_optimizer(cfg, model, 1)
    params = list(model.parameters())
    reg = build_regularizers(cfg, model, params, K)
    before = [p.detach().clone() for p in params]
    batches = [data(dtype=torch.float32, seed=s) for s in range(getattr(opt, "batches_per_step", 1))]
    with forbid_host_sync():
        _, loss = opt.step(make_closure(opt, model, params, batches, clip_norm=50.0, regularizers=reg))
    assert torch.isfinite(loss) and not any(torch.equal(a, b) for a, b in zip(before, params))


@pytest.mark.parametrize("flag, value, message", [
    ("--flooding", "-0.1", "flooding: -0.1 is out of range"),
    ("--mixup_alpha", "-1", "mixup_alpha: -1.0 is out of range"),
    ("--adv_epsilon", "-1", "adv_epsilon: -1.0 is out of range"),
    ("--adv_iter", "-1", "adv_iter: -1 is out of range"),
    ("--rmp_epsilon", "-0.5", "rmp_epsilon: -0.5 is out of range"),
    ("--label_smoothing_style", "keras", "invalid choice"),
    ("--mixup_beta", "2", "mixup_beta: only with MixUp"),
])
def test_bad_values_are_one_line_exit_2(capsys, flag, value, message):
    assert main.main(["--dataset", "synthetic", flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# ---- a run records NLL and criterion; report.py shows them ------------------------------------

def test_run_records_nll_and_criterion_and_report_shows_the_papers(tmp_path, capsys):
    args = ["--dataset", "synthetic", "--model", "wrn10_1", "--train_size", "64", "--test_size", "40",
            "--batch_size", "16", "--epochs", "1", "--eval_batch_size", "32", "--optimizer", "sgd",
            "--label_smoothing", "0.2", "--label_smoothing_style", "amp", "--flooding", "0.02",
            "--paper_error", "4.85", "--paper_nll", "1.038", "--out_dir", str(tmp_path), "--name", "ls"]
    assert main.main(args) == 0
    summary = json.load(open(tmp_path / "ls" / "summary.json"))
    row = json.loads(open(tmp_path / "ls" / "metrics.jsonl").read().splitlines()[-1])
    assert summary["final_test_nll"] == row["test_loss"] and summary["paper_nll"] == 1.038
    assert summary["final_test_criterion_loss"] == row["test_criterion_loss"] != row["test_loss"]
    capsys.readouterr()
    assert report.main([str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| test NLL | paper NLL | criterion test loss |" in table
    assert f"| {summary['final_test_nll']:.3f} ± – | 1.038 | {summary['final_test_criterion_loss']:.3f} ± – |" in table


def test_bench_times_the_methods_through_the_runners_closure(tmp_path):
    import bench
    out = tmp_path / "b.json"
    argv = ["--quick", "--model", "wrn10_1", "--dataset", "synthetic", "--batch_size", "8", "--optimizers", "sgd",
            "amp", "--pipeline_batches", "0", "--eval_batches", "0", "--adv_epsilon", "1", "--mixup_alpha", "1",
            "--rmp_epsilon", "0.1", "--flooding", "0.02", "--json", str(out)]
    assert bench.main_cli(argv) == 0
    report_ = json.loads(out.read_text())
    assert {k: report_["config"][k] for k in ("adv_epsilon", "mixup_alpha", "rmp_epsilon", "flooding")} == {
        "adv_epsilon": 1.0, "mixup_alpha": 1.0, "rmp_epsilon": 0.1, "flooding": 0.02}
    assert [r["optimizer"] for r in report_["train"]] == ["sgd", "amp"]
    assert all(r["ms_per_step"] > 0 and r["flop_per_step"] > 0 for r in report_["train"])
