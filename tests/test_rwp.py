"""Tests of rwp.RWP (CPU, tiny model): radius 0 = SGD, the mix, the noise law, exact restores, BN
policy, a plain reference loop, resume, no host syncs, the two-batch closure protocol, parallel RWP
under torchrun, and the configs/rwp recipe files."""
import copy
import glob
import io
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ddp_rwp_worker as worker  # noqa: E402  (tiny model + fixed batches, shared with torchrun)
import rwp  # noqa: E402
from conftest import forbid_host_sync, torch_threads  # noqa: E402
from rwp import RWP, noise_seed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SGD_KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)


def closure_for(model, opt, batches, calls=None):
    def closure(batch=0, loss_weight=1.0):
        if calls is not None:
            calls.append((batch, loss_weight))
        opt.zero_grad(set_to_none=True)
        x, y = batches[batch]
        out = model(x)
        loss = F.cross_entropy(out, y)
        (loss * loss_weight).backward()
        return out, loss.detach()
    return closure


def run_rwp(model, opt, steps, start=0, one_batch=False):
    losses = []
    for t in range(start, start + steps):
        batches = worker.make_batches(t)
        if one_batch:
            batches = [batches[0]]
        losses.append(opt.step(closure_for(model, opt, batches))[1])
    return losses


def run_sgd(model, steps, **kw):
    opt = torch.optim.SGD(model.parameters(), **kw)
    for t in range(steps):
        opt.step(closure_for(model, opt, worker.make_batches(t)))


def assert_same_model(a, b):
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


# ---------------------------------------------------------------- plain reference loop
def reference_rwp(model, steps, *, lr, momentum, weight_decay, gamma, alpha, seed, rank=0,
                  two_batches=True, arwp=False, eta=0.1, beta=0.99, gamma_final=None,
                  total_steps=None, bn_clean=True):
    """RWP / ARWP written out per parameter, after the official scripts (noise drawn from the same
    generator stream as rwp.RWP: one N(0, I) vector over all parameters in order)."""
    params = list(model.parameters())
    sgd = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    acc = [torch.zeros_like(p) for p in params]
    losses = []
    for t in range(steps):
        b0, b1 = worker.make_batches(t)
        if not two_batches or alpha == 1:  # one batch a step (α = 1: the single pass reads batch 0)
            b1 = b0
        sigma = gamma
        if gamma_final is not None:
            sigma = gamma + (gamma_final - gamma) * (1 - math.cos(math.pi * min(t, total_steps) / total_steps)) / 2
        gen = torch.Generator().manual_seed(noise_seed(seed, rank, t))
        z = torch.empty(sum(p.numel() for p in params)).normal_(generator=gen)
        noise, offset = [], 0
        for p, s in zip(params, acc):
            zp = z[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
            w = p.detach()
            if p.dim() >= 2:
                shape = (-1,) + (1,) * (p.dim() - 1)
                std = sigma * w.reshape(w.shape[0], -1).norm(dim=1).reshape(shape)
                fisher = s.reshape(s.shape[0], -1).sum(dim=1).reshape(shape)
            else:
                std = sigma * (w.norm() + 1e-16)
                fisher = s
            if arwp:
                std = std / torch.sqrt(1 + eta * fisher)
            noise.append(zp * std)
        saved = [p.detach().clone() for p in params]
        saved_bn = worker.bn_buffers(model)
        g1 = None
        if alpha > 0:
            with torch.no_grad():
                for p, e in zip(params, noise):
                    p.add_(e)
            sgd.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(b1[0]), b1[1])
            loss.backward()
            g1 = [None if p.grad is None else p.grad.clone() for p in params]
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)
            if bn_clean and alpha < 1:
                model.load_state_dict(saved_bn, strict=False)
            if arwp:
                acc = [s if g is None else beta * s + g * g for s, g in zip(acc, g1)]
        if alpha < 1:
            sgd.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(b0[0]), b0[1])
            loss.backward()
            if g1 is not None:
                for p, g in zip(params, g1):
                    if p.grad is not None:
                        p.grad = alpha * g + (1 - alpha) * p.grad
        losses.append(loss.detach())
        sgd.step()
    return losses


# ---------------------------------------------------------------- radius 0 and the mix
def test_gamma0_one_batch_equals_sgd_bit_for_bit():
    ref, model = worker.make_model(), worker.make_model()
    run_sgd(ref, 4, nesterov=True, **SGD_KW)
    opt = RWP(model.parameters(), gamma=0.0, alpha=0.5, model=model, nesterov=True, **SGD_KW)
    assert opt.batches_per_step == 1 and opt.bn_update == "clean"
    run_rwp(model, opt, 4, one_batch=True)
    assert_same_model(ref, model)


def test_alpha0_equals_sgd_bit_for_bit():
    ref, model = worker.make_model(), worker.make_model()
    run_sgd(ref, 4, **SGD_KW)
    opt = RWP(model.parameters(), gamma=0.05, alpha=0.0, two_batches=True, model=model, **SGD_KW)
    assert opt.batches_per_step == 1  # no perturbed pass to feed
    run_rwp(model, opt, 4)
    assert_same_model(ref, model)


def test_alpha1_uses_only_the_perturbed_gradient():
    ref, model = worker.make_model(), worker.make_model()
    reference_rwp(ref, 3, gamma=0.05, alpha=1.0, seed=3, two_batches=False, **SGD_KW)
    opt = RWP(model.parameters(), gamma=0.05, alpha=1.0, two_batches=True, model=model, seed=3, **SGD_KW)
    assert opt.batches_per_step == 1 and not opt.returns_clean and opt.bn_update == "all"
    calls = []
    opt.step(closure_for(model, opt, worker.make_batches(0), calls))
    assert calls == [(0, 1.0)]
    run_rwp(model, opt, 2, start=1)
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


# ---------------------------------------------------------------- noise law
def test_noise_std_per_filter_and_arwp_shaping():
    """Each row i of a ≥2-D tensor: ε ~ N(0, (γ‖W_i‖)²); 1-D: N(0, (γ(‖p‖+1e-16))²); with ARWP the
    std is divided by sqrt(1 + η Σ_row s). Tolerance: for N iid normal values the sample std s
    satisfies (N−1)s²/σ² ~ χ²_{N−1}, so s/σ has std ≈ 1/sqrt(2(N−1)); 6 of those (two-sided
    probability ≈ 2e-9 per row) plus nothing for rounding ((θ+ε)−θ is ε to ~1e-6 relative here).
    The mean must be within 6σ/sqrt(N) of 0."""
    draws, gamma, eta = 300, 0.05, 0.1
    for arwp in (False, True):
        model = worker.make_model()
        opt = RWP(model.parameters(), gamma=gamma, arwp=arwp, arwp_eta=eta, model=model, **SGD_KW)
        params = list(model.parameters())
        if arwp:  # a known accumulator
            gen = torch.Generator().manual_seed(5)
            for p in params:
                opt.state[p]["arwp_s"] = torch.rand(p.shape, generator=gen) * 20
        before = [p.detach().clone() for p in params]
        samples = [[] for _ in params]
        for k in range(draws):
            opt.step_count = k  # a fresh noise draw per "step"
            opt.perturb()
            for i, (p, w) in enumerate(zip(params, before)):
                samples[i].append(p.detach() - w)
            opt.restore()
        for p, w, eps in zip(params, before, samples):
            eps = torch.stack(eps).double()  # (draws, *shape)
            if p.dim() >= 2:
                rows = eps.transpose(0, 1).reshape(p.shape[0], -1)  # (rows, draws × row size)
                std = gamma * w.double().reshape(w.shape[0], -1).norm(dim=1)
                fisher = opt.state[p]["arwp_s"].double().reshape(w.shape[0], -1).sum(1) if arwp else torch.zeros(())
            else:
                rows = eps.reshape(draws, -1).transpose(0, 1)  # one "row" per element
                std = (gamma * (w.double().norm() + 1e-16)).expand(rows.shape[0])
                fisher = opt.state[p]["arwp_s"].double().reshape(-1) if arwp else torch.zeros(())
            std = std / torch.sqrt(1 + eta * fisher)
            n = rows.shape[1]
            measured = rows.std(dim=1)
            assert torch.all((measured / std - 1).abs() < 6 / math.sqrt(2 * (n - 1))), (p.shape, arwp)
            assert torch.all(rows.mean(dim=1).abs() < 6 * std / math.sqrt(n)), (p.shape, arwp)


def test_perturbed_ranks_draw_different_noise(monkeypatch):
    noise = {}
    for rank in (1, 3):
        monkeypatch.setattr(rwp, "_dist_rank_world", lambda rank=rank: (rank, 4))
        model = worker.make_model()
        opt = RWP(model.parameters(), gamma=0.05, parallel=True, model=model, **SGD_KW)
        assert opt.perturbed_pass and opt.rank_group == (1, 2) and opt.loss_weight == 1.0
        w = model.conv1.weight.detach().clone()
        opt.perturb()
        noise[rank] = model.conv1.weight.detach() - w
        opt.restore()
    assert not torch.allclose(noise[1], noise[3])
    assert len({noise_seed(0, r, t) for r in range(8) for t in range(100)}) == 800


# ---------------------------------------------------------------- exact restores, BN policy
def test_weights_restored_exactly():
    model = worker.make_model()
    opt = RWP(model.parameters(), gamma=0.3, two_batches=True, model=model, **SGD_KW)
    snapshot = [p.detach().clone() for p in model.parameters()]
    opt.perturb()
    assert not torch.equal(model.conv1.weight, snapshot[0])
    opt.restore()
    for p, w in zip(model.parameters(), snapshot):
        assert torch.equal(p, w)
    # inside step: the clean pass sees θ bit for bit
    seen = []
    inner = closure_for(model, opt, worker.make_batches(0))

    def closure(batch=0, loss_weight=1.0):
        if batch == 0:
            seen.append(all(torch.equal(p, w) for p, w in zip(model.parameters(), snapshot)))
        return inner(batch, loss_weight)
    opt.step(closure)
    assert seen == [True]


def test_weights_restored_when_the_perturbed_closure_raises():
    model = worker.make_model()
    opt = RWP(model.parameters(), gamma=0.3, two_batches=True, model=model, **SGD_KW)
    snapshot = copy.deepcopy(model)

    def closure(batch=0, loss_weight=1.0):
        model(worker.make_batches(0)[batch][0])
        raise FloatingPointError("loss is nan")
    with pytest.raises(FloatingPointError):
        opt.step(closure)
    assert_same_model(snapshot, model)
    with pytest.raises(RuntimeError, match="without perturb"):
        opt.restore()


def test_bn_buffers_only_from_the_clean_pass():
    batches = worker.make_batches(0)
    ref = worker.make_model()
    with torch.no_grad():
        ref(batches[0][0])  # one clean forward in train mode
    model = worker.make_model()
    opt = RWP(model.parameters(), gamma=0.05, two_batches=True, model=model, **SGD_KW)
    opt.step(closure_for(model, opt, batches))
    assert worker.bn_buffers(model).keys() == worker.bn_buffers(ref).keys()
    for (k, a), b in zip(worker.bn_buffers(ref).items(), worker.bn_buffers(model).values()):
        assert torch.equal(a, b), k
    # 'all' (and 'auto' without a model) lets the perturbed pass update them too
    for kw in (dict(bn_update="all"), dict()):
        model = worker.make_model()
        opt = RWP(model.parameters(), gamma=0.05, two_batches=True,
                  model=model if kw else None, **kw, **SGD_KW)
        assert opt.bn_update == "all"
        opt.step(closure_for(model, opt, batches))
        assert model.bn1.num_batches_tracked.item() == 2
        assert not torch.equal(model.bn1.running_mean, ref.bn1.running_mean)


# ---------------------------------------------------------------- fast = reference
@pytest.mark.parametrize("variant", ["rwp", "rwp_one_batch", "marwp", "arwp"])
def test_fast_equals_reference_loop(variant):
    kw = dict(gamma=0.05, alpha=0.5, seed=11)
    if variant == "marwp":
        kw.update(arwp=True, eta=0.5, beta=0.9)
    if variant == "arwp":
        kw.update(gamma=0.01, gamma_final=0.11, total_steps=4, alpha=1.0, arwp=True, eta=0.5, beta=0.9)
    two = variant != "rwp_one_batch"
    ref, model = worker.make_model(), worker.make_model()
    ref_losses = reference_rwp(ref, 5, two_batches=two, **kw, **SGD_KW)
    opt_kw = {("arwp_" + k if k in ("eta", "beta") else k): v for k, v in kw.items()}
    opt = RWP(model.parameters(), two_batches=two, model=model, **opt_kw, **SGD_KW)
    losses = run_rwp(model, opt, 5, one_batch=not two)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses))
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    if variant in ("marwp", "arwp"):  # accumulators were fed (and F shaped the noise above)
        assert opt.state[model.conv1.weight]["arwp_s"].abs().sum() > 0
        assert opt.state[model.unused]["arwp_s"].abs().sum() == 0


# ---------------------------------------------------------------- resume
def test_state_dict_resume_continues_identically():
    kw = dict(gamma=0.05, alpha=0.5, two_batches=True, arwp=True, gamma_final=0.1, total_steps=6,
              seed=4, nesterov=True, **SGD_KW)
    full = worker.make_model()
    opt = RWP(full.parameters(), model=full, **kw)
    run_rwp(full, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": full.state_dict(), "opt": opt.state_dict()}, buf)
    run_rwp(full, opt, 3, start=3)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["opt"]["rwp"]["step_count"] == 3 and ckpt["opt"]["base_optimizer"]["state"]
    resumed = worker.make_model()
    resumed.load_state_dict(ckpt["model"])
    kw["seed"] = 99  # the checkpoint's seed wins
    opt2 = RWP(resumed.parameters(), model=resumed, **kw)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    run_rwp(resumed, opt2, 3, start=3)
    assert_same_model(full, resumed)


# ---------------------------------------------------------------- no host sync, closure protocol
@pytest.mark.parametrize("kw", [dict(two_batches=True, arwp=True, gamma_final=0.1, total_steps=5),
                                dict(two_batches=False), dict(alpha=1.0, arwp=True)])
def test_step_makes_no_host_sync(kw):
    model = worker.make_model()
    opt = RWP(model.parameters(), gamma=0.05, model=model, **kw, **SGD_KW)
    batches = worker.make_batches(0)
    for _ in range(2):  # the first step allocates the scratch buffers
        closure = closure_for(model, opt, batches)
        with forbid_host_sync():
            opt.step(closure)


def test_two_batch_form_calls_both_batches_and_returns_the_clean_pass():
    model = worker.make_model()
    opt = RWP(model.parameters(), gamma=0.05, two_batches=True, model=model, **SGD_KW)
    assert opt.batches_per_step == 2 and opt.rank_group == (0, 1) and opt.returns_clean
    calls = []
    batches = worker.make_batches(0)
    out, loss = opt.step(closure_for(model, opt, batches, calls))
    assert calls == [(1, 1.0), (0, 1.0)]  # perturbed term on batch 1, clean term on batch 0
    with torch.no_grad():
        clean = F.cross_entropy(worker.make_model()(batches[0][0]), batches[0][1])
    assert torch.equal(loss, clean)


@pytest.mark.parametrize("parallel", [False, True])
def test_step_returns_detached_values(monkeypatch, parallel):
    """Like AMP: the caller gets the clean pass's values, not tensors that keep the graph."""
    if parallel:
        monkeypatch.setattr(rwp, "_dist_rank_world", lambda: (1, 2))  # a perturbed rank
    model = worker.make_model()
    opt = RWP(model.parameters(), gamma=0.05, two_batches=not parallel, model=model, parallel=parallel, **SGD_KW)
    assert opt.parallel == parallel
    batches = worker.make_batches(0)

    def closure(batch=0, loss_weight=1.0):
        opt.zero_grad(set_to_none=True)
        out = model(batches[batch][0])
        loss = F.cross_entropy(out, batches[batch][1])
        (loss * loss_weight).backward()
        return out, loss  # not detached
    out, loss = opt.step(closure)
    assert not out.requires_grad and not loss.requires_grad and loss.grad_fn is None


def test_one_batch_form_calls_plain_closure_twice():
    model = worker.make_model()
    opt = RWP(model.parameters(), gamma=0.05, model=model, **SGD_KW)
    calls = []
    batches = worker.make_batches(0)

    def closure():
        calls.append(1)
        return closure_for(model, opt, batches)()
    opt.step(closure)
    assert calls == [1, 1] and opt.batches_per_step == 1


# ---------------------------------------------------------------- modes and argument checks
def test_parallel_modes(monkeypatch):
    model = worker.make_model()
    with pytest.warns(UserWarning, match="single process"):
        opt = RWP(model.parameters(), parallel=True, model=model, **SGD_KW)
    assert not opt.parallel and opt.batches_per_step == 2 and opt.rank_group == (0, 1)

    monkeypatch.setattr(rwp, "_dist_rank_world", lambda: (2, 4))
    opt = RWP(model.parameters(), alpha=0.25, parallel=True, model=model, **SGD_KW)
    assert (opt.parallel, opt.clean_pass, opt.perturbed_pass) == (True, True, False)
    assert opt.batches_per_step == 1 and opt.rank_group == (0, 2) and opt.loss_weight == 1.5
    with pytest.raises(ValueError, match="arwp"):
        RWP(model.parameters(), parallel=True, arwp=True, model=model, **SGD_KW)
    monkeypatch.setattr(rwp, "_dist_rank_world", lambda: (0, 3))
    with pytest.raises(ValueError, match="even number of processes.*3"):
        RWP(model.parameters(), parallel=True, model=model, **SGD_KW)


@pytest.mark.parametrize("kw, match", [
    (dict(gamma=-0.1), "gamma"), (dict(alpha=1.5), "alpha"), (dict(arwp_beta=2.0), "arwp_beta"),
    (dict(arwp_eta=-1.0), "arwp_eta"), (dict(gamma_final=-1.0), "gamma_final"),
    (dict(gamma_final=0.1, total_steps=0), "total_steps"), (dict(bn_update="some"), "bn_update"),
    (dict(bn_update="clean"), "model"), (dict(seed=1.5), "seed"),
])
def test_bad_arguments_raise_value_error(kw, match):
    model = worker.make_model()
    with pytest.raises(ValueError, match=match):
        RWP(model.parameters(), **kw, **SGD_KW)


def test_clean_policy_needs_a_clean_pass_and_schedule_needs_total_steps():
    model = worker.make_model()
    with pytest.raises(ValueError, match="alpha=1"):
        RWP(model.parameters(), alpha=1.0, bn_update="clean", model=model, **SGD_KW)
    opt = RWP(model.parameters(), gamma_final=0.1, model=model, **SGD_KW)
    with pytest.raises(ValueError, match="total_steps"):
        opt.step(closure_for(model, opt, worker.make_batches(0)))
    opt.total_steps = 10  # set after construction, as a runner does
    opt.step(closure_for(model, opt, worker.make_batches(0)))


# ---------------------------------------------------------------- parallel RWP under torchrun
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parallel_rwp_under_torchrun_matches_single_process_mix(tmp_path):
    seed = 7
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           os.path.join(ROOT, "tests", "ddp_rwp_worker.py"), "--out", str(tmp_path), "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = {(name, r): torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=True)
           for name in worker.SCENARIOS for r in (0, 1)}
    with torch_threads(1):  # as in the workers: CPU kernels may round differently per thread count
        _compare_with_single_process(res, seed)


def _compare_with_single_process(res, seed):
    for name in worker.SCENARIOS:
        r0, r1 = res[name, 0], res[name, 1]
        assert r0["rank_group"] == (0, 2) and r1["rank_group"] == (1, 2)
        assert r0["batches_per_step"] == 1 and (r0["loss_weight"], r1["loss_weight"]) == (
            2 * (1 - worker.SCENARIOS[name]["alpha"]), 2 * worker.SCENARIOS[name]["alpha"])
        assert r0["returns_clean"] and not r1["returns_clean"]
        for a, b in zip(r0["params"], r1["params"]):  # both ranks hold the same θ after every step
            for k in a:
                assert torch.equal(a[k], b[k]), (name, k)

    # α = 0: the clean rank's loss weight 2 and DDP's average by 2 are exact: plain SGD bit for bit
    ref = worker.make_model()
    opt = torch.optim.SGD(ref.parameters(), **worker.SHARED)
    clean = res["clean", 0]
    for t in range(worker.STEPS):
        x, y = worker.make_batches(t)[0]
        _, loss = opt.step(closure_for(ref, opt, [(x, y)]))
        assert torch.equal(loss, clean["losses"][t])
        for k, p in ref.named_parameters():
            assert torch.equal(p, clean["params"][t][k]), (t, k)
        for k, v in worker.bn_buffers(ref).items():
            assert torch.equal(v, clean["buffers"][t][k]), (t, k)

    # α = 0.5: DDP's (2α·g1 + 2(1−α)·g0)/2 = the sequential mix of the same batches with rank 1's
    # noise (to float rounding); the first clean loss is exact (same θ, same batch)
    ref = worker.make_model()
    kw = dict(worker.SHARED, **worker.SCENARIOS["mix"])
    ref_losses = reference_rwp(ref, worker.STEPS, seed=seed, rank=1, **kw)
    mix = res["mix", 0]
    assert torch.equal(ref_losses[0], mix["losses"][0])
    torch.testing.assert_close(torch.stack(ref_losses), torch.stack(mix["losses"]))
    for k, p in ref.named_parameters():
        torch.testing.assert_close(p.detach(), mix["params"][-1][k], msg=k)
    for k, v in worker.bn_buffers(ref).items():
        torch.testing.assert_close(v, mix["buffers"][-1][k], msg=k)


# ---------------------------------------------------------------- configs/rwp
CONFIG_FIELDS = set("""dataset data_dir download train_size test_size model dropout optimizer epochs
batch_size lr momentum nesterov weight_decay schedule milestones lr_decay lr_updates_per_epoch
clip_norm augment crop_padding pad_mode pad_fill flip cutout cutout_size cutout_prob cutout_style
autoaugment mean std epsilon inner_lr inner_iter amp_ball gamma alpha arwp arwp_eta arwp_beta
gamma_final rho adaptive_eta bn_update seed device precision channels_last compile workers
eval_every out_dir name paper_ref paper_error paper_spread""".split())
RECIPE = dict(epochs=200, batch_size=256, lr=0.1, schedule="cosine", lr_updates_per_epoch=2,
              momentum=0.9, nesterov=False, weight_decay=1e-3, clip_norm=0, augment=True,
              crop_padding=4, pad_fill=0, flip=True, cutout=True, cutout_style="rwp", cutout_size=16,
              cutout_prob=0.5, mean=[0.4914, 0.4822, 0.4465], std=[0.2023, 0.1994, 0.2010],
              paper_error=None)
VARIANTS = {  # file suffix -> values besides RECIPE
    "sgd": dict(optimizer="sgd"),
    "rwp": dict(optimizer="rwp", alpha=0.5, gamma=0.01),  # RWP paper, nblt/RWP
    "marwp": dict(optimizer="rwp", alpha=0.5, gamma=0.015, arwp=True, arwp_eta=0.1,  # run_mrwp.sh
                  arwp_beta=0.99),
    "arwp": dict(optimizer="rwp", alpha=1.0, gamma=0.001, gamma_final=0.011, arwp=True,  # run_rwp.sh
                 arwp_eta=0.1, arwp_beta=0.99, lr_updates_per_epoch=196),  # LR cosine every step
}
MODELS = {"rwp_resnet18", "rwp_vgg16_bn", "rwp_wrn16_8", "rwp_wrn28_10"}


def test_rwp_configs_parse_and_follow_the_recipe():
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "rwp", "*.yaml")))
    rows = set()
    for path in paths:
        with open(path) as f:
            text = f.read()
        name = os.path.basename(path)
        assert text.startswith("#") and f"python main.py --config configs/rwp/{name} --seed 0" in text
        cfg = yaml.safe_load(text)
        assert set(cfg) <= CONFIG_FIELDS, (path, set(cfg) - CONFIG_FIELDS)
        assert cfg["dataset"] in ("cifar10", "cifar100") and cfg["model"] in MODELS, path
        variant = name[len(f"{cfg['model']}_{cfg['dataset']}_"):-len(".yaml")]
        assert name.startswith(f"{cfg['model']}_{cfg['dataset']}_") and variant in VARIANTS, path
        for key, value in {**RECIPE, **VARIANTS[variant]}.items():
            assert cfg.get(key) == value, (path, key, cfg.get(key), value)
        rows.add((cfg["model"], cfg["dataset"], variant))
    table = {(m, d, v) for m in MODELS for d in ("cifar10", "cifar100") for v in ("rwp", "sgd")}
    assert rows == table | {("rwp_resnet18", "cifar100", "marwp"), ("rwp_vgg16_bn", "cifar100", "arwp")}
