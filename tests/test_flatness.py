"""flatness.py: curvature against closed forms and an independent power iteration, each method's
sharpness against hand-computed values, filter-normalised landscapes, and the command end to end."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatness
import main
from rwp import noise_seed
from runner import flatness_measures as fm
from runner import spectrum
from runner.hessian import HessianOperator, top_eigenpairs
from test_main import DATA, TINY


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double()


def _data(seed=1, n=24, batch=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _loss(model, batches):
    """Mean cross-entropy over all batches, with autograd (the hand-written reference)."""
    n = sum(len(y) for _, y in batches)
    return sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in batches) / n


# ----------------------------------------------------------------------------- curvature

def test_least_squares_hessian_eigenvalues_and_trace_are_exact():
    # L(w) = (1/N) Σ (wᵀx_n − y_n)²  ⇒  H = (2/N) XᵀX exactly
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 12, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 12, dtype=torch.float64)
    Y = torch.randn(40, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(12, 1, bias=False).double()
    batches = [(X[:15], Y[:15]), (X[15:], Y[15:])]
    H = HessianOperator(model, list(model.parameters()), batches, loss_func=nn.MSELoss(reduction="sum"))
    exact = torch.linalg.eigvalsh(2 / 40 * X.T @ X).flip(0)
    eig, _ = top_eigenpairs(H, k=4, tol=1e-10)
    assert eig == sorted(eig, reverse=True)
    assert torch.allclose(torch.tensor(eig, dtype=torch.float64), exact[:4], rtol=1e-9, atol=0)
    r = spectrum.trace(H, max_matvecs=12)
    assert r["exact"] and r["low"] == r["high"]
    assert r["estimate"] == pytest.approx(float(exact.sum()), rel=1e-12)
    r = spectrum.trace(H, rtol=0, min_matvecs=11, max_matvecs=11, seed=3)   # Hutchinson: unbiased, interval
    assert not r["exact"] and r["matvecs"] == 11 and r["low"] < r["estimate"] < r["high"]


def test_spectral_density_finds_two_eigenvalue_clusters():
    lam = torch.tensor([1.0] * 6 + [10.0] * 6, dtype=torch.float64)
    X = torch.diag((6 * lam).sqrt())                                         # H = (2/12) XᵀX = diag(λ)
    model = nn.Linear(12, 1, bias=False).double()
    H = HessianOperator(model, list(model.parameters()), [(X, torch.zeros(12, 1, dtype=torch.float64))],
                        loss_func=nn.MSELoss(reduction="sum"))
    quad = spectrum.slq(H, steps=11, probes=2)
    grid = list(spectrum.grid_for(quad, 0.5, points=400))
    density = list(spectrum.density(quad, 0.5, grid))
    assert sum((b - a) * p for a, b, p in zip(grid, grid[1:], density)) == pytest.approx(1.0, abs=0.02)

    def at(x):
        return density[min(range(len(grid)), key=lambda i: abs(grid[i] - x))]
    assert at(1.0) > 5 * at(5.5) and at(10.0) > 5 * at(5.5)


def test_cnn_top_eigenvalue_matches_an_autograd_power_iteration():
    model, batches = _cnn(), _data()
    params = list(model.parameters())
    eig, _ = top_eigenpairs(HessianOperator(model, params, batches), k=2, tol=1e-8)

    def hvp(v):  # double backward over the whole set, written out
        grads = torch.autograd.grad(_loss(model, batches), params, create_graph=True)
        return torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), params)

    v = [torch.randn_like(p) for p in params]
    for _ in range(300):
        w = hvp(v)
        norm = math.sqrt(sum(float((t * t).sum()) for t in w))
        v = [t / norm for t in w]
    rayleigh = sum(float((a * b).sum()) for a, b in zip(v, hvp(v)))
    assert rayleigh > 0 and eig[0] == pytest.approx(rayleigh, rel=0.02)
    assert eig[0] >= eig[1]


# ----------------------------------------------------------------------------- landscapes

def test_filter_normalised_direction_has_the_weights_filter_norms_and_zero_bias_bn():
    model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5, 3))
    params = list(model.parameters())
    d = fm.filter_normalized_direction(params, torch.Generator().manual_seed(7))
    for p, t in zip(params, d):
        assert t.shape == p.shape
        if p.dim() <= 1:
            assert not t.any()
        else:
            for i in range(p.shape[0]):
                assert float(t[i].norm()) == pytest.approx(float(p[i].detach().norm()), rel=1e-5)
    # the same seed draws the same raw direction for another model of the same architecture
    other = nn.Sequential(nn.Conv2d(2, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5, 3))
    d2 = fm.filter_normalized_direction(list(other.parameters()), torch.Generator().manual_seed(7))
    for p, q, a, b in zip(params, other.parameters(), d, d2):
        if p.dim() > 1:
            scale = (p.detach().flatten(1).norm(dim=1) / q.detach().flatten(1).norm(dim=1)).view(-1, *[1] * (p.dim() - 1))
            assert torch.allclose(a, b * scale, rtol=1e-5, atol=1e-7)


def test_landscape_at_zero_is_the_checkpoint_loss_exactly_and_weights_come_back():
    model, batches = _cnn(), _data()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(0)
    d1, d2 = fm.filter_normalized_direction(params, g), fm.filter_normalized_direction(params, g)
    ax = fm.axis(5, 0.5)
    assert ax[2] == 0.0 and ax[0] == -0.5 and ax[-1] == 0.5
    one = fm.landscape(model, params, batches, [d1], [(a,) for a in ax])
    two = fm.landscape(model, params, batches, [d1, d2], [(a, b) for b in ax for a in ax])
    loss0 = fm.evaluate(model, batches)
    assert one[2] == loss0 and two[12] == loss0
    assert one[0][0] != loss0[0]                                       # the curve does move
    assert [a for a in one] == [two[2 * 5 + i] for i in range(5)]      # the β = 0 row is the 1-D curve
    assert all(torch.equal(a, b) for a, b in zip(before, params))


# ----------------------------------------------------------------------------- sharpness

def _at(model, params, new):
    """L at other weights, then the old weights back."""
    old = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, new):
            p.copy_(v)
    with torch.no_grad():
        loss = float(_loss(model, _data()))
    with torch.no_grad():
        for p, v in zip(params, old):
            p.copy_(v)
    return loss


def test_sam_sharpness_matches_the_formula_and_is_zero_at_rho_zero():
    model, batches = _cnn(), _data()
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]
    g = torch.autograd.grad(_loss(model, batches), params)
    norm = math.sqrt(sum(float((t * t).sum()) for t in g))
    want = _at(model, params, [p + 0.2 * t / (norm + 1e-12) for p, t in zip(theta, g)]) - float(_loss(model, batches).detach())
    got, _, _ = fm.sam_sharpness(model, params, batches, rho=0.2)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-13) and got > 0
    assert fm.sam_sharpness(model, params, batches, rho=0.0)[0] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(theta, params)) and all(p.grad is None for p in params)


def test_amp_sharpness_matches_two_hand_ascent_steps_and_is_zero_at_epsilon_zero():
    model, batches = _cnn(), _data()
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]
    eps, zeta = 0.05, 2.0

    def proj(delta):  # one ball per tensor
        return [d * min(1.0, eps / (float(d.norm()) + 1e-12)) for d in delta]

    def grad_at(delta):
        with torch.no_grad():
            for p, t, d in zip(params, theta, delta):
                p.copy_(t + d)
        out = torch.autograd.grad(_loss(model, batches), params)
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)
        return out

    zero = [torch.zeros_like(t) for t in theta]
    d1 = proj([zeta * g for g in grad_at(zero)])
    d2 = proj([a + zeta * g for a, g in zip(d1, grad_at(d1))])
    assert any(float(d.norm()) == pytest.approx(eps) for d in d2)       # the ball is active
    loss0 = float(_loss(model, batches).detach())
    losses = [_at(model, params, [t + d for t, d in zip(theta, dd)]) for dd in (d1, d2)]
    got, worst, l0 = fm.amp_sharpness(model, params, batches, eps, zeta, iters=2)
    assert l0 == pytest.approx(loss0, rel=1e-12)
    assert worst == pytest.approx(max([loss0] + losses), rel=1e-9)
    assert got == pytest.approx(max([loss0] + losses) - loss0, rel=1e-7, abs=1e-13) and got > 0
    assert fm.amp_sharpness(model, params, batches, 0.0, zeta, iters=3)[0] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(theta, params))


def test_rwp_sharpness_matches_hand_drawn_filter_noise_and_is_zero_at_gamma_zero():
    model, batches = _cnn(), _data()
    params = list(model.parameters())
    theta = [p.detach().clone() for p in params]
    gamma, draws, seed = 0.3, 5, 11
    loss0 = float(_loss(model, batches).detach())
    diffs = []
    for k in range(draws):
        gen = torch.Generator().manual_seed(noise_seed(seed, 0, k))
        z = torch.empty(sum(p.numel() for p in params), dtype=torch.float64).normal_(generator=gen)
        new, at = [], 0
        for t in theta:
            zt = z[at:at + t.numel()].view(t.shape)
            at += t.numel()
            if t.dim() >= 2:                                             # σ = γ‖W_i‖ per output filter
                sigma = gamma * t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))
            else:                                                        # σ = γ(‖p‖ + 1e-16)
                sigma = gamma * (t.norm() + 1e-16)
            new.append(t + sigma * zt)
        diffs.append(_at(model, params, new) - loss0)
    mean = sum(diffs) / draws
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (draws - 1) / draws)
    got, got_se, l0, losses = fm.rwp_sharpness(model, params, batches, gamma, draws, seed)
    assert len(losses) == draws and l0 == pytest.approx(loss0, rel=1e-12)
    assert got == pytest.approx(mean, rel=1e-9) and got_se == pytest.approx(se, rel=1e-7)
    assert fm.rwp_sharpness(model, params, batches, 0.0, 3, seed)[:2] == (0.0, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(theta, params))


def test_bn_train_mode_uses_batch_statistics_and_leaves_the_model_alone():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 4)).double().eval()
    batches = _data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    train = fm.prepare_model(model, "train")
    loss_train, _ = fm.evaluate(train, batches)
    want = float(_loss(model.train(), batches).detach())                        # plain train mode: batch statistics
    model.load_state_dict(state)
    model.eval()
    assert loss_train == pytest.approx(want, rel=1e-12)
    assert loss_train != fm.evaluate(fm.prepare_model(model, "eval"), batches)[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flat")
    args = [*TINY, "--epochs", "1", "--out_dir", str(tmp / "runs")]
    for opt in ("sgd", "sam"):
        assert main.main([*args, "--optimizer", opt, "--name", opt]) == 0
    return tmp, [str(tmp / "runs" / "sgd"), str(tmp / "runs" / "sam")]


QUICK = ["--samples", "16", "--batch_size", "16", "--top_k", "2", "--eig_tol", "1e-2", "--trace_matvecs", "3",
         "--rwp_draws", "2", "--adaptive_iters", "2", "--grid", "3", "--device", "cpu"]


def test_end_to_end_on_two_real_runs(two_runs, capsys):
    from PIL import Image
    import numpy as np
    tmp, runs = two_runs
    out = tmp / "out"
    code = flatness.main([*runs, *QUICK, "--out", str(out), "--json", str(tmp / "f.json"), "--csv", str(tmp / "f.csv"),
                          "--density", "--density_ncv", "5", "--density_probes", "2", "--save_eigenvectors"])
    assert code == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "wrn10_1" in line]
    assert len(rows) == 2 and "| sgd |" in rows[0] and "| sam |" in rows[1] and "λ_max" in table
    data = json.loads((tmp / "f.json").read_text())
    assert [r["run_dir"] for r in data] == runs
    for r in data:
        eig = r["hessian_top_eigenvalues"]
        assert len(eig) == 2 and eig[0] >= eig[1] and eig[0] > 0
        assert r["hessian_trace_low"] < r["hessian_trace"] < r["hessian_trace_high"] and r["hessian_trace_matvecs"] == 3
        d = r["spectral_density"]
        assert len(d["nodes"]) == len(d["weights"]) == 2 and d["sigma"] > 0 and d["sigma_default"]
        assert r["hessian_lambda_min"] == min(min(n) for n in d["nodes"]) < eig[0]
        for key in ("sam_sharpness", "amp_sharpness", "rwp_sharpness", "rwp_sharpness_se",
                    "adaptive_worst_linf", "adaptive_worst_l2", "adaptive_average_l2"):
            assert math.isfinite(r[key])
        saved = torch.load(os.path.join(r["run_dir"], flatness.EIGENVECTORS), weights_only=True)
        assert saved["eigenvalues"] == eig and len(saved["eigenvectors"]) == 2
        vec = torch.cat([t.flatten() for t in saved["eigenvectors"][0].values()])
        assert vec.numel() == r["parameters"] and float(vec.norm()) == pytest.approx(1.0, rel=1e-5)
        assert r["landscape_1d"]["loss"][1] == r["loss"]                  # α = 0 is the checkpoint
        assert len(r["landscape_2d"]["loss"]) == 3
        assert json.loads(open(os.path.join(r["run_dir"], "flatness.json")).read())["loss"] == r["loss"]
    assert data[0]["landscape_1d"]["loss"] != data[1]["landscape_1d"]["loss"]
    for png in ("landscape_1d.png", "landscape_2d.png", "spectral_density.png"):
        img = np.asarray(Image.open(out / png).convert("L"), dtype=float)
        assert img.shape[0] > 200 and img.shape[1] > 300 and img.std() > 5  # a real picture, not blank
    assert (out / "flatness.md").read_text() == table
    assert len((out / "landscape.csv").read_text().splitlines()) == 1 + 2 * (3 + 9)
    assert (tmp / "f.csv").read_text().startswith("run_dir,dataset,model,optimizer")
    import report                                             # report.py shows the records it finds
    assert report.main(runs) == 0
    shown = capsys.readouterr().out
    assert "| λ_max | sharpness SAM / AMP / RWP |" in shown
    for r in data:
        assert f"| {r['hessian_top_eigenvalues'][0]:.3g} | {r['sam_sharpness']:.3g} / " in shown


def _one_line_exit_2(capsys, argv):
    assert flatness.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("flatness.py: error: ") and err.count("\n") == 1, err
    return err


def test_bad_input_is_one_line_and_exit_2(two_runs, capsys, tmp_path):
    import shutil
    _, runs = two_runs
    err = _one_line_exit_2(capsys, [str(tmp_path), *QUICK])
    assert "no checkpoint.pt" in err
    assert "not a run folder" in _one_line_exit_2(capsys, [str(tmp_path / "nope"), *QUICK])
    # a checkpoint whose weights are of another architecture than the model it names
    other = tmp_path / "other"
    shutil.copytree(runs[0], other)
    ckpt = torch.load(other / "checkpoint.pt", weights_only=True)
    ckpt["config"]["model"] = "wrn16_1"
    torch.save(ckpt, other / "checkpoint.pt")
    assert "does not fit model wrn16_1" in _one_line_exit_2(capsys, [str(other), *QUICK])
    # a checkpoint copied into another run's folder (config.yaml names another model)
    text = (tmp_path / "other" / "config.yaml").read_text()
    shutil.copy(os.path.join(runs[0], "checkpoint.pt"), other / "checkpoint.pt")
    (other / "config.yaml").write_text(text.replace("model: wrn10_1", "model: wrn16_1"))
    assert "config.yaml says wrn16_1" in _one_line_exit_2(capsys, [str(other), *QUICK])
    err = _one_line_exit_2(capsys, [runs[0], *QUICK, "--samples", "1000", "--out", str(tmp_path / "never")])
    assert "larger than the run's training data (256 images" in err
    assert not (tmp_path / "never").exists()                             # nothing written on bad input
    assert "--grid" in _one_line_exit_2(capsys, [runs[0], "--grid", "1"])
    assert "--density_width" in _one_line_exit_2(capsys, [runs[0], *QUICK, "--density_width", "0"])
    new = tmp_path / "new"                                               # --json may go into the new --out
    assert flatness.main([runs[0], *QUICK, "--measures", "landscape", "--no-2d", "--out", str(new),
                          "--json", str(new / "rows.json")]) == 0
    assert (new / "rows.json").exists() and (new / "landscape_1d.png").exists()


def test_bf16_and_bn_train_options_run_and_are_recorded(two_runs, tmp_path):
    _, runs = two_runs
    args = [runs[1], *QUICK, "--measures", "sharpness", "landscape", "--no-2d", "--out", str(tmp_path)]
    assert flatness.main([*args, "--json", str(tmp_path / "fp32.json")]) == 0
    data_dir = DATA[DATA.index("--data_dir") + 1] if "--data_dir" in DATA else "data"
    assert flatness.main([*args, "--precision", "bf16", "--bn", "train", "--data_dir", data_dir,
                          "--json", str(tmp_path / "b.json")]) == 0
    (a,), (b,) = (json.loads((tmp_path / f).read_text()) for f in ("fp32.json", "b.json"))
    assert b["settings"]["precision"] == "bf16" and b["settings"]["bn"] == "train" and b["settings"]["data_dir"] == data_dir
    assert "hessian_trace" not in b and not (tmp_path / "landscape_2d.png").exists()
    assert b["loss"] != a["loss"]                         # batch statistics instead of running ones
    assert b["landscape_1d"]["loss"][1] != b["loss"]      # the curve ran in bf16, the reference in fp32
    assert b["landscape_1d"]["loss"][1] == pytest.approx(b["loss"], rel=0.05)


def test_curvature_and_adaptive_flags_reach_the_record(two_runs, tmp_path):
    _, runs = two_runs
    assert flatness.main([runs[0], *QUICK, "--measures", "curvature", "adaptive", "landscape", "--no-2d",
                          "--hvp", "recompute", "--density", "--density_width", "0.5", "--density_ncv", "3",
                          "--density_probes", "1", "--trace_rtol", "0", "--adaptive_rho_linf", "0",
                          "--log_loss", "--out", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    (r,) = json.loads((tmp_path / "r.json").read_text())
    assert r["hvp"] == "recompute" and r["hessian_trace_matvecs"] == 3            # rtol 0: the whole budget
    assert r["spectral_density"]["sigma"] == 0.5 and not r["spectral_density"]["sigma_default"]
    assert len(r["spectral_density"]["nodes"]) == 1
    assert r["adaptive_worst_linf"] == 0.0 and r["adaptive_worst_l2"] > 0
    assert (tmp_path / "landscape_1d.png").exists() and (tmp_path / "spectral_density.png").exists()
