"""The optimizers as drop-ins: the constructor habits of the ecosystem, loss-only closures, the
README's examples run as written, and `pip install .` installing them without the runner."""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from amp import AMP
from rwp import RWP
from sam import SAM
from conftest import ROOT

# name -> (class, its own radius arguments)
OPTS = {"amp": (AMP, dict(epsilon=0.5)), "rwp": (RWP, dict(gamma=0.01)), "sam": (SAM, dict(rho=0.05))}


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)


def train(make, loss_only=False, steps=2):
    model = tiny()
    opt = make(model)
    x, y = data()

    def closure():
        opt.zero_grad()
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        return loss if loss_only else (out, loss)
    results = [opt.step(closure) for _ in range(steps)]
    return [p.detach().clone() for p in model.parameters()], results


@pytest.mark.parametrize("name", OPTS)
def test_base_optimizer_in_lr_place_as_davda54_sam(name):
    """OPT(params, torch.optim.SGD, lr=...) (davda54/sam's order) = OPT(params, lr=..., base_optimizer=SGD)."""
    cls, radius = OPTS[name]
    a, _ = train(lambda m: cls(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **radius))
    b, _ = train(lambda m: cls(m.parameters(), lr=0.1, base_optimizer=torch.optim.SGD, momentum=0.9, **radius))
    c, _ = train(lambda m: cls(m.parameters(), 0.1, momentum=0.9, **radius))  # lr positional, SGD default
    assert all(torch.equal(p, q) and torch.equal(p, r) for p, q, r in zip(a, b, c))
    adam, _ = train(lambda m: cls(m.parameters(), torch.optim.Adam, lr=0.01, **radius))
    assert not all(torch.equal(p, q) for p, q in zip(a, adam))  # the class given is the one used
    params = tiny().parameters()
    with pytest.raises(TypeError, match="missing required argument 'lr'"):
        cls(params, torch.optim.SGD, **radius)
    with pytest.raises(TypeError, match="multiple values for argument 'lr'"):
        cls(tiny().parameters(), 0.1, lr=0.1, **radius)
    with pytest.raises(TypeError, match="two base optimizers"):
        cls(tiny().parameters(), torch.optim.SGD, lr=0.1, base_optimizer=torch.optim.Adam, **radius)


def test_amp_needs_epsilon():
    with pytest.raises(TypeError, match="'epsilon'"):
        AMP(tiny().parameters(), lr=0.1)


@pytest.mark.parametrize("name", OPTS)
def test_closure_returning_only_the_loss_works(name):
    """A closure that returns the loss alone trains exactly like one returning (outputs, loss), and
    step returns that loss (detached), as torch.optim's step(closure) does."""
    cls, radius = OPTS[name]
    make = lambda m: cls(m.parameters(), lr=0.1, momentum=0.9, **radius)  # noqa: E731
    a, tuples = train(make)
    b, losses = train(make, loss_only=True)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    for (out, loss), alone in zip(tuples, losses):
        assert torch.is_tensor(alone) and alone.dim() == 0 and not alone.requires_grad
        assert torch.equal(loss, alone) and out.shape == (8, 3)


def readme_section(title):
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index(title)
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_readme_optimizer_examples_run_as_written():
    """Every Python block of README 'Use the optimizers in your own loop' runs on a small BN model
    and changes its weights; the RWP example is the paper's setting (two batches, BN statistics
    from the clean pass); the fp16 example runs with AMP (autocast is off without CUDA)."""
    import warnings
    blocks = re.findall(r"```python\n(.*?)```", readme_section("## Use the optimizers in your own loop"), re.S)
    x, y = data()
    ns = dict(model=tiny(), inputs=x, targets=y, criterion=nn.CrossEntropyLoss(),
              loader=iter([(x[:4], y[:4]), (x[4:], y[4:])]))
    seen = set()
    for block in blocks:
        if "LossScaler" in block:
            exec(blocks[0], ns)  # the fp16 recipe wraps an optimizer built as above (AMP)
        before = [p.detach().clone() for p in ns["model"].parameters()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.autocast("cuda") on a machine without CUDA
            exec(block, ns)
        opt = ns["optimizer"]
        seen.add(type(opt).__name__)
        assert any(not torch.equal(p, q) for p, q in zip(before, ns["model"].parameters())), block[:60]
        if isinstance(opt, RWP):
            assert opt.batches_per_step == 2 and opt.bn_update == "clean"
    assert seen == {"AMP", "SAM", "RWP"} and any("LossScaler" in b for b in blocks)


def test_pip_install_gives_the_optimizers_and_scaler_only(tmp_path):
    """`pip install .` with the repository's pyproject.toml installs amp, rwp, sam and runner.scaler
    (nothing else of the runner, no dependency pulled: --no-deps), importable from another folder.
    Built from a copy of the files it needs, offline (setuptools is in the README's set-up line)."""
    import shutil
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "amp.py", "rwp.py", "sam.py"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "runner"), src / "runner", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True, capture_output=True, timeout=300)
    installed = sorted(os.path.relpath(os.path.join(d, f), site) for d, _, files in os.walk(site)
                       for f in files if f.endswith(".py"))
    assert installed == ["amp.py", os.path.join("runner", "__init__.py"), os.path.join("runner", "scaler.py"),
                         "rwp.py", "sam.py"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import torch, amp, rwp, sam, runner.scaler as s\n"
            "m = torch.nn.Linear(2, 1)\n"
            "opt = sam.SAM(m.parameters(), torch.optim.SGD, lr=0.1, rho=0.05)\n"
            "s.LossScaler(opt, list(m.parameters()))\n"
            "print(amp.__file__, rwp.__file__, sam.__file__, s.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    assert all(path.startswith(str(site)) for path in out.stdout.split())


def test_ci_installs_what_the_readme_says():
    setup = readme_section("## Set up")
    readme_line = re.search(r"```bash\n(pip install [^\n]*)\n", setup)[1]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert readme_line.replace("pip install ", "python -m pip install -q ", 1) in ci.splitlines()
