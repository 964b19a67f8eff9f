"""fp16 loss scaling across the passes of one step (runner/scaler.py) and the runner's fp16 path."""
import copy
import json
import os
import signal

import pytest
import torch
from torch import nn

import main
from runner.config import Config
from runner.scaler import LossScaler
from runner.training import build_optimizer, make_closure
from test_main import TINY, rows, run

OPTIMIZERS = ["sgd", "amp", "rwp", "sam", "asam"]


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def setup(name, init_scale=None, **scaler_kw):
    model = tiny_net()
    cfg = Config(optimizer=name, lr=0.1, epsilon=0.5, gamma=0.05, rho=0.05, clip_norm=2.0, seed=3)
    opt = build_optimizer(cfg, model, world_size=1)
    params = [p for p in model.parameters()]
    scaler = LossScaler(opt, params, init_scale=init_scale, **scaler_kw) if init_scale else None
    return model, opt, params, scaler


def batches(step):
    g = torch.Generator().manual_seed(step)
    return [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(2)]


def do_step(model, opt, params, scaler, step, autocast=None):
    closure = make_closure(opt, model, params, batches(step), clip_norm=2.0, scaler=scaler, autocast=autocast)
    return opt.step(closure)


def snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def assert_same(a, b):
    (ma, oa), (mb, ob) = a, b
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    sa, sb = oa.get("base_optimizer", oa)["state"], ob.get("base_optimizer", ob)["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_power_of_two_scale_is_exact(name):
    """Scaling the loss by 2^k and the gradients by 2^-k is exact in fp32: the trajectory with the
    scaler equals the one without, bit for bit (weights, BN buffers, momentum)."""
    plain = setup(name)
    scaled = setup(name, init_scale=2.0 ** 12)
    for step in range(4):
        out_a = do_step(*plain[:3], None, step)
        out_b = do_step(*scaled, step)
        assert torch.equal(out_a[1], out_b[1])
    assert_same(snapshot(*plain[:2]), snapshot(*scaled[:2]))
    assert scaled[3].scale.item() == 2.0 ** 12 and scaled[3].skipped == 0


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_overflow_skips_the_step_exactly_and_backs_off(name):
    """fp16 autocast, then a scale of 2^100: the fp16 backward overflows in the first pass."""
    model, opt, params, scaler = setup(name, init_scale=2.0 ** 8)
    autocast = torch.autocast("cpu", dtype=torch.float16)
    for step in range(2):  # momentum buffers exist
        do_step(model, opt, params, scaler, step, autocast)
    before = snapshot(model, opt)
    scaler.scale.fill_(2.0 ** 100)
    outputs, loss = do_step(model, opt, params, scaler, 2, autocast)
    assert torch.isfinite(loss)  # the reported loss is unscaled
    after = snapshot(model, opt)
    for k, v in after[0].items():
        if k.endswith("running_mean") or k.endswith("running_var"):
            assert torch.isfinite(v).all(), k  # passes ran at finite weights
            after[0][k] = before[0][k]          # (BN statistics move with any forward pass)
        elif k.endswith("num_batches_tracked"):
            after[0][k] = before[0][k]
    assert_same(before, after)                  # weights and momentum untouched
    assert scaler.skipped == 1 and scaler.scale.item() == 2.0 ** 99
    assert scaler.pop_skipped() == 1 and scaler.skipped == 0
    scaler.scale.fill_(2.0 ** 8)
    do_step(model, opt, params, scaler, 3, autocast)  # and training goes on
    assert not torch.equal(snapshot(model, opt)[0]["0.weight"], before[0]["0.weight"])
    assert all(torch.isfinite(p).all() for p in params)


def test_scale_grows_after_growth_interval_clean_steps():
    model, opt, params, scaler = setup("amp", init_scale=4.0, growth_interval=3)
    for step in range(6):
        do_step(model, opt, params, scaler, step)
    assert scaler.scale.item() == 16.0 and scaler.skipped == 0


def test_state_round_trip():
    _, opt, params, scaler = setup("sgd", init_scale=2.0 ** 10)
    scaler.scale.fill_(512.0)
    scaler.growth_tracker.fill_(7)
    _, _, _, other = setup("sgd", init_scale=2.0 ** 16)
    other.load_state_dict(scaler.state_dict())
    assert other.scale.item() == 512.0 and other.growth_tracker.item() == 7


@pytest.mark.parametrize("name", ["amp", "rwp", "sam"])
def test_fp16_autocast_trains(name):
    """Real fp16 autocast (CPU) with a perturbation optimizer: the loss falls, nothing is skipped."""
    model, opt, params, scaler = setup(name, init_scale=2.0 ** 16)
    autocast = torch.autocast("cpu", dtype=torch.float16)
    fixed = batches(0)
    losses = []
    for _ in range(15):
        closure = make_closure(opt, model, params, fixed, clip_norm=2.0, scaler=scaler, autocast=autocast)
        losses.append(opt.step(closure)[1].item())
    assert losses[-1] < 0.6 * losses[0] and scaler.skipped == 0




def test_runner_fp16_records_scale_and_resumes_bit_exactly(tmp_path, monkeypatch):
    """fp16 through main.py (CPU fp16 kernels are slow: a few small steps): rows carry the skipped
    steps and the loss scale, the checkpoint the scaler, and a resume from mid-epoch matches the
    full run."""
    args = [*TINY, "--train_size", "32", "--test_size", "16", "--batch_size", "16", "--eval_batch_size", "16",
            "--optimizer", "sgd", "--precision", "fp16", "--epochs", "2"]
    assert run(tmp_path, *args, name="full")[0] == 0
    full = rows(tmp_path / "runs" / "full")
    assert [r["skipped_steps"] for r in full] == [0, 0] and full[-1]["loss_scale"] == 2.0 ** 16
    ckpt = torch.load(tmp_path / "runs" / "full" / "checkpoint.pt", weights_only=True)
    assert ckpt["scaler"]["scale"].item() == 2.0 ** 16

    real, calls = main.Trainer.closure_for, []

    def sigterm_in_step_3(self, batches):  # epoch 2, step 1 of 2
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, batches)

    monkeypatch.setattr(main.Trainer, "closure_for", sigterm_in_step_3)
    code, part = run(tmp_path, *args, name="part")
    assert code == 143
    partial = torch.load(part / "checkpoint.pt", weights_only=True)["partial"]
    assert partial["step"] == 1 and partial["skipped"] == 0
    monkeypatch.setattr(main.Trainer, "closure_for", real)
    assert main.main(["--resume", str(part)]) == 0
    strip = lambda rs: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rs]
    assert strip(rows(part)) == strip(full)
    assert json.load(open(part / "summary.json"))["status"] == "completed"


def test_readme_fp16_pattern_with_amp_directly():
    """The README's own-loop pattern: AMP from amp.py, a hand-written closure, LossScaler."""
    from amp import AMP
    model = tiny_net()
    optimizer = AMP(model.parameters(), lr=0.1, epsilon=0.5, inner_lr=1, inner_iter=1,
                    base_optimizer=torch.optim.SGD, momentum=0.9, nesterov=True, weight_decay=1e-4)
    scaler = LossScaler(optimizer, [p for p in model.parameters() if p.requires_grad])
    inputs, targets = batches(0)[0]
    losses = []
    for _ in range(15):
        def closure():
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                outputs = model(inputs)
                loss = nn.functional.cross_entropy(outputs, targets)
            scaler.backward(loss)
            return outputs, loss
        losses.append(optimizer.step(closure)[1].item())
    assert losses[-1] < 0.6 * losses[0] and scaler.skipped == 0
