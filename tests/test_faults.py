"""Faults a careful but unlucky user meets, one test per class: a removed lock file, float settings
beyond float32, a checkpoint copied from another run, YAML alias bombs, symlink loops in an image
folder, Ctrl-C in flatness.py, a diverged run's last good checkpoint; bad optimizer arguments, outputs
on a full disk, broken Fashion-MNIST/CIFAR/SVHN folders, `python -m models` arguments, a recipe's bad
main.py arguments, NaN or text in run records."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import flatness
import main
import runner
from runner import rundir
from runner.config import FIELDS, UsageError, _kind, parse_config
from runner.records import write_text
from conftest import ROOT
from imagefolder import write_image_folder
from amp import AMP
from test_dropin import OPTS, tiny
from test_flatness import QUICK, two_runs  # noqa: F401  (a fixture: an sgd and a sam run)
from test_main import DATA, TINY, rows
from test_reliability import ENV, spawn
from test_rundir import files, wait_for


def test_a_removed_lock_file_never_lets_a_second_writer_in(tmp_path):
    """A trains; `.lock` is deleted; B (`--resume`) gets a fresh lock but is refused while A lives
    (A's writer.txt), writing nothing; A stops at its next write (the lock it holds no longer has
    that name) with one line and exit 1, writing nothing more; once A is gone, the folder is free."""
    run_dir = tmp_path / "runs" / "a"
    a = spawn([*TINY, "--optimizer", "sgd", "--epochs", "500", "--out_dir", str(tmp_path / "runs"), "--name", "a"])
    b = None
    try:
        wait_for(run_dir / "checkpoint.pt", a)
        os.remove(run_dir / ".lock")
        a.send_signal(signal.SIGSTOP)  # (alive but not writing: the newcomer's check alone decides)
        before = files(run_dir)
        b = spawn(["--resume", str(run_dir)])
        _, err = b.communicate(timeout=120)
        assert b.returncode == 2 and err.count("\n") == 1, err
        assert f"{run_dir} is in use by process {a.pid}" in err and "writer.txt" in err, err
        assert files(run_dir) == before  # B wrote nothing
        a.send_signal(signal.SIGCONT)
        _, err = a.communicate(timeout=120)
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    assert a.returncode == 1 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert f"{run_dir}: its lock file .lock was replaced while this run wrote the folder" in last, err
    assert not (run_dir / "summary.json").exists()  # A wrote nothing more
    epochs = [r["epoch"] for r in rows(run_dir)]
    assert epochs == list(range(1, len(epochs) + 1))
    rundir.lock(str(run_dir))  # A is dead: its writer.txt no longer counts
    rundir.release()
    # the writer's side in one process: a removed .lock stops the next write
    folder = tmp_path / "solo"
    folder.mkdir()
    rundir.lock(str(folder))
    try:
        rundir.claim(str(folder))
        os.remove(folder / ".lock")
        with pytest.raises(rundir.LockLost, match="was removed while this run wrote"):
            write_text(str(folder / "summary.json"), "{}")
        assert sorted(os.listdir(folder)) == ["writer.txt"]
    finally:
        rundir.release()


NOT_A_TENSOR = {"progress_every", "paper_error", "paper_spread", "paper_nll"}  # (seconds; the paper's numbers)
TENSOR_FLOATS = [n for n in FIELDS if _kind(n) in ("float", "optfloat") and n not in NOT_A_TENSOR] + ["mean", "std"]


@pytest.mark.parametrize("name", TENSOR_FLOATS)
def test_every_float_setting_beyond_float32_is_refused(name):
    """torch cannot turn such a value into a step's float32 scalar (a traceback, not a divergence)."""
    with pytest.raises(UsageError, match=f"^{name}: "):
        parse_config([*DATA, f"--{name}", "1e39"])


@pytest.mark.parametrize("flags,message", [
    (["--lr", "1e308"], "lr: 1e+308 does not fit float32"),
    (["--lr", "1e10", "--lr_decay", "1e30", "--milestones", "1", "2"], "lr_decay: 1e+30 at 2 milestone(s) raises lr"),
    (["--label_smoothing", "1"], "label_smoothing: 1.0 is out of range (must be ≥ 0 and < 1"),
])
def test_values_beyond_float32_and_label_smoothing_1_are_refused_before_any_folder(tmp_path, capsys, flags, message):
    assert main.main([*TINY, "--optimizer", "sgd", *flags, "--out_dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_the_largest_float32_learning_rate_diverges_cleanly(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main.main([*TINY, "--optimizer", "sgd", "--epochs", "1", "--lr", "3e38", "--out_dir", str(out), "--name", "r"]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert json.load(open(out / "r" / "summary.json"))["status"] == "diverged"


def test_evaluate_flatness_and_load_run_refuse_a_checkpoint_of_another_run(two_runs, tmp_path, capsys):  # noqa: F811
    _, (sgd, sam) = two_runs
    mixed = tmp_path / "sgd"
    shutil.copytree(sgd, mixed)
    shutil.copy(os.path.join(sam, "checkpoint.pt"), mixed / "checkpoint.pt")  # the same model, another optimizer
    expect = f"{mixed}/checkpoint.pt is not the run its config.yaml describes (checkpoint.pt is of optimizer sam, but " \
        "config.yaml says sgd)"
    assert main.main(["--evaluate", str(mixed), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expect in err, err
    assert flatness.main([str(mixed), *QUICK, "--measures", "sharpness", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expect in err, err
    with pytest.raises(UsageError, match="is not the run its config.yaml describes"):
        runner.load_run(str(mixed))
    assert main.main(["--evaluate", sam, "--device", "cpu"]) == 0  # (its own folder: fine)


def _bomb(levels):
    """`mean:` of 10**levels ones through nested aliases: a few hundred bytes of YAML."""
    parts = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, levels + 1):
        parts.append(f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "mean: [" + ", ".join(parts) + "]\n"


def test_yaml_alias_bombs_are_refused_fast_and_errors_quote_short_values(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    for text in (_bomb(6), "mean: &a [1, *a]\n"):  # 10⁷ values; a list that holds itself
        path.write_text(text)
        start = time.perf_counter()
        with pytest.raises(UsageError, match="expands to more than 10,000 values") as e:
            parse_config(["--config", str(path)])
        assert time.perf_counter() - start < 1.0 and len(str(e.value)) < 200
    path.write_text(_bomb(2))  # 1,110 values under aliases: read, then refused for its type, quoted short
    assert main.main(["--config", str(path), "--out_dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mean: expected a list of numbers, got [[1, 1, 1" in err and len(err) < 300, err
    path.write_text("milestones: &m [3, 4]\nepochs: 5\n")  # an ordinary anchor still works
    assert parse_config(["--config", str(path)])[0].milestones == [3, 4]


def test_symlink_loops_in_an_image_folder_are_not_followed(tmp_path, capsys):
    import data_folder
    root = write_image_folder(str(tmp_path / "data"), classes=2, train_per_class=4, val_per_class=2)
    extra = tmp_path / "extra"  # a folder outside the data, linked in: its images count once
    os.makedirs(extra / "sub")
    for name in ("a.JPEG", "sub/b.JPEG"):
        shutil.copy(os.path.join(root, "train", "n00000001", "train_1_1.JPEG"), extra / name)
    cat = os.path.join(root, "train", "n00000000")
    os.symlink("..", os.path.join(cat, "loop"))  # the plain loop first: every image once, in its own class
    assert data_folder.FolderData(root).fingerprint["train_files"] == 4 + 4
    links = {"self": ".", "dog": "../n00000001", "more": str(extra), "more_again": str(extra / "sub"), "top": str(tmp_path)}
    for name, target in links.items():
        os.symlink(target, os.path.join(cat, name))
    capsys.readouterr()
    d = data_folder.FolderData(root)
    names = [p.decode() for p in d.train[1]]
    assert d.fingerprint["train_files"] == 4 + 2 + 4 == len(set(names))
    assert "n00000000/more/a.JPEG" in names and "n00000000/more_again/b.JPEG" in names  # (reached first so)
    assert list(d.train[2]).count(0) == 6
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and all(line.startswith("data: not following ") for line in err), err
    for name in ("loop", "self", "dog", "top", os.path.join("more", "sub")):
        assert sum(f"{os.path.join(cat, name)} -> " in line for line in err) == 1, (name, err)


def test_ctrl_c_in_flatness_is_one_line_and_exit_130(two_runs, tmp_path):  # noqa: F811
    """Ctrl-C while flatness.py imports torch, and while it analyses (its --out folder is made after
    every input is loaded, right before the first measure): one line, exit 130, nothing written."""
    _, runs = two_runs
    runs = [shutil.copytree(r, tmp_path / os.path.basename(r)) for r in runs]
    out = tmp_path / "out"
    cmd = [sys.executable, "flatness.py", *map(str, runs), *QUICK, "--measures", "sharpness", "--rwp_draws", "100000",
           "--out", str(out)]
    for when in ("importing", "analysing"):
        p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if when == "importing":
            time.sleep(1.0)
        else:
            wait_for(out, p)
            time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 130 and err.count("\n") == 1 and "flatness.py: interrupted" in err, (when, err)
    assert not [r for r in runs if (r / "flatness.json").exists()] and os.listdir(out) == []


def test_a_diverged_run_keeps_its_last_good_checkpoint_for_evaluate_and_resume(tmp_path, capsys):
    """Epoch 1 trains; the step schedule then multiplies lr by 10⁶ and epoch 2 diverges. --evaluate
    reports epoch 1's checkpoint (its metrics row); --resume repeats the divergence, changing nothing."""
    run_dir = tmp_path / "runs" / "d"
    args = [*TINY, "--optimizer", "sgd", "--epochs", "3", "--milestones", "1", "--lr_decay", "1e6",
            "--out_dir", str(tmp_path / "runs"), "--name", "d"]
    assert main.main(args) == 1
    summary = json.load(open(run_dir / "summary.json"))
    assert summary["status"] == "diverged" and "last good checkpoint: epoch 1" in summary["message"]
    capsys.readouterr()
    assert main.main(["--evaluate", str(run_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "(checkpoint after epoch 1/3)" in out and f"err {rows(run_dir)[0]['test_error']:.2f}%" in out, out
    assert main.main(["--resume", str(run_dir)]) == 1
    assert json.load(open(run_dir / "summary.json"))["message"] == summary["message"]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1 and len(rows(run_dir)) == 1


@pytest.mark.parametrize("name", OPTS)
@pytest.mark.parametrize("bad, match", [
    (dict(lr=float("nan")), "lr must be a finite number"),
    (dict(lr=float("inf")), "lr must be a finite number"),
    (dict(base_optimizer=42), "base_optimizer must be a torch.optim.Optimizer subclass"),
    (dict(base_optimizer="sgd"), "base_optimizer must be a torch.optim.Optimizer subclass"),
    ("instance", "got an instance of SGD"),
])
def test_an_optimizer_refuses_bad_lr_and_base_optimizer_with_value_error(name, bad, match):
    """AMP/RWP/SAM(...) with a non-finite lr (torch.optim.SGD takes it, and every weight turns NaN),
    or a base optimizer that is no Optimizer class (an instance, a name): ValueError naming it."""
    cls, radius = OPTS[name]
    params = list(tiny().parameters())
    kwargs = dict(lr=0.1, **radius)
    kwargs.update(dict(base_optimizer=torch.optim.SGD(params, lr=0.1)) if bad == "instance" else bad)
    with pytest.raises(ValueError, match=match):
        cls(params, **kwargs)


@pytest.mark.parametrize("bad", [dict(epsilon=float("inf")), dict(inner_lr=float("inf"))])
def test_amp_refuses_an_infinite_radius_or_step(bad):
    """AMP's ε and ζ are finite like SAM's ρ and RWP's γ: ζ = inf made every weight NaN in one step."""
    with pytest.raises(ValueError, match="must be a number >= 0 and finite"):
        AMP(tiny().parameters(), lr=0.1, **{"epsilon": 0.5, **bad})


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device that is always full)")
@pytest.mark.parametrize("flag", ["--csv", "--json", "--plot"])
def test_report_and_flatness_outputs_on_a_full_disk_are_one_line_and_exit_1(two_runs, tmp_path, capsys, flag):  # noqa: F811
    """report.py and flatness.py writing --csv/--json to a full disk (/dev/full), or a record into a
    run folder on one (a file whose writes fail as a full disk's do): one line naming the file, exit 1,
    no traceback, no half-written file left."""
    _, runs = two_runs
    report = __import__("report")
    if flag != "--plot":  # (matplotlib's PNG writer does not report a failed write to /dev/full)
        assert report.main([*runs, flag, "/dev/full"]) == 1
        err = capsys.readouterr().err
        assert err == "report.py: error: cannot write /dev/full: No space left on device\n", err
        assert flatness.main([*runs, *QUICK, "--measures", "sharpness", "--out", str(tmp_path / "o"), flag, "/dev/full"]) == 1
        err = capsys.readouterr().err
        assert err == "flatness.py: error: cannot write /dev/full: No space left on device\n", err
        return
    record = os.path.join(runs[0], "flatness.json")
    before = open(record).read() if os.path.exists(record) else None
    real_open = open

    def full_disk_open(path, mode="r", *a, **k):  # a file that fails on a full disk once written
        f = real_open(path, mode, *a, **k)
        if "w" in mode and ("r.png" in str(path) or "flatness.json" in str(path)):
            def fail(*_):
                raise OSError(28, "No space left on device")
            f.write = fail
        return f
    with pytest.MonkeyPatch.context() as mp:
        import builtins
        mp.setattr(builtins, "open", full_disk_open)
        assert report.main([*runs, "--plot", str(tmp_path / "r.png")]) == 1
        assert flatness.main([runs[0], *QUICK, "--measures", "sharpness", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"report.py: error: cannot write {tmp_path / 'r.png'}: No space left on device",
                   f"flatness.py: error: cannot write {record}: No space left on device"], err
    assert not (tmp_path / "r.png").exists()
    assert (open(record).read() if os.path.exists(record) else None) == before  # (written whole or not at all)
    assert [f for f in os.listdir(runs[0]) if ".tmp" in f] == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device that is always full)")
def test_bench_json_on_a_full_disk_is_one_line_and_exit_1(capsys):
    import bench
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (tiny ops on a shared 2-core machine are far slower with two)
    argv = ["--quick", "--model", "wrn10_1", "--dataset", "synthetic", "--batch_size", "8", "--train_size", "64",
            "--eval_batch_size", "32", "--optimizers", "sgd", "--json", "/dev/full"]
    try:
        assert bench.main_cli(argv) == 1
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().err == "bench.py: error: cannot write /dev/full: No space left on device\n"


def _write_idx(path, array):
    """The idx format, gzipped: magic 0 0 0x08 ndim, big-endian uint32 dims, uint8 data."""
    import gzip
    import numpy as np
    a = np.asarray(array, dtype=np.uint8)
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes() + a.tobytes())


@pytest.mark.parametrize("fault", ["missing", "counts", "label"])
def test_a_broken_fashion_mnist_folder_is_one_line_and_exit_2(tmp_path, capsys, fault):
    """A --data_dir with three of the four idx files was completed from the Debian package's folder
    (the test set from elsewhere, unsaid); 64 labels for 60 images, or a label 200, trained on or
    crashed (IndexError). Each is one line naming the files, exit 2, no run folder."""
    import numpy as np
    data = tmp_path / "fmnist"
    data.mkdir()
    g = np.random.default_rng(0)
    for prefix, n in (("train", 64), ("t10k", 64)):
        _write_idx(data / f"{prefix}-images-idx3-ubyte.gz", g.integers(0, 256, (n, 28, 28)))
        _write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", g.integers(0, 10, n))
    if fault == "missing":
        os.remove(data / "t10k-labels-idx1-ubyte.gz")
    elif fault == "counts":
        _write_idx(data / "train-images-idx3-ubyte.gz", g.integers(0, 256, (60, 28, 28)))
    else:
        _write_idx(data / "train-labels-idx1-ubyte.gz", [200] + [1] * 63)
    args = ["--dataset", "fashionmnist", "--data_dir", str(data), "--model", "wrn10_1", "--epochs", "1",
            "--batch_size", "32", "--out_dir", str(tmp_path / "runs")]
    assert main.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("main.py: error: fashionmnist: "), err
    assert ("holds idx files but not t10k-labels-idx1-ubyte" in err) if fault == "missing" else ("do not fit" in err), err
    assert not (tmp_path / "runs").exists()


def test_python_m_models_refuses_arguments_and_a_closed_pipe_is_quiet():
    """`python -m models foo` printed the table, exit 0 (the argument ignored); `python -m models |
    head -1` ended with a BrokenPipeError traceback. Now: one line and exit 2; quiet, exit 0."""
    p = subprocess.run([sys.executable, "-m", "models", "wrn10_1"], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert "it takes no arguments, got 'wrn10_1'" in p.stderr
    p = subprocess.Popen([sys.executable, "-m", "models"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()  # the reader is gone before the table is written
    err = p.stderr.read()
    assert p.wait(timeout=120) == 0 and err == "", err


@pytest.mark.parametrize("extra, message", [(["--bogus"], "unrecognized arguments: --bogus"),
                                             (["--lr", "-1"], "lr: -1.0 is out of range"),
                                             (["--out_dir"], "expected one argument")])
def test_a_recipe_checks_main_py_arguments_once_before_any_row(tmp_path, extra, message):
    """`recipes/X.sh --bogus` started every row, each failing with exit 2 ("going on"), dozens of
    lines; now one line and exit 2 before any row, with or without --dry-run."""
    for dry in ([], ["--dry-run"]):
        p = subprocess.run(["bash", "recipes/sam_fashionmnist.sh", *dry, "--seeds", "0", *extra], cwd=ROOT,
                           env={**ENV, "OUT": str(tmp_path / "runs")}, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
        assert p.stderr.startswith("sam_fashionmnist.sh: for main.py: ") and message in p.stderr, p.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("dataset, name", [("cifar10", "cifar-10-batches-py/data_batch_1"),
                                           ("cifar100", "cifar-100-python/train"), ("svhn", "train_32x32.mat")])
def test_a_corrupt_cifar_or_svhn_file_is_named_corrupt_not_missing(tmp_path, dataset, name):
    """Files in place but damaged were reported as "not found ... put the files into" the folder that
    holds them; now the file or folder is named as corrupt or incomplete."""
    import data_utils
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x80\x04 not the original file")
    with pytest.raises(data_utils.DataError, match=f"{dataset}: {tmp_path}/{name.split('/')[0]} is corrupt or incomplete"):
        data_utils.load_dataset(dataset, str(tmp_path), True)


def test_a_truncated_checkpoint_is_named_without_resume_outside_a_resume(two_runs, tmp_path, capsys):  # noqa: F811
    """--evaluate and flatness.py said "resume: cannot load ..." of a truncated checkpoint.pt."""
    run = shutil.copytree(two_runs[1][0], tmp_path / "run")
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:3000])
    assert main.main(["--evaluate", str(run), "--device", "cpu"]) == 2
    assert flatness.main([str(run), *QUICK]) == 2
    assert main.main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"{prog}: error: {how}cannot load {ckpt} (RuntimeError); it is corrupt or not ours"
                   for prog, how in (("main.py", ""), ("flatness.py", ""), ("main.py", "resume: "))], err


def test_report_never_averages_a_nan_error_nor_plots_a_metrics_row_that_is_not_numbers(two_runs, tmp_path, capsys):  # noqa: F811
    """A completed summary.json with final_test_error NaN was averaged (the group's mean: nan); a
    metrics.jsonl row with test_error "x" made --plot a TypeError traceback. Both are malformed now:
    listed apart with the reason, never averaged or plotted."""
    report = __import__("report")
    nan_run = shutil.copytree(two_runs[1][0], tmp_path / "runs" / "nan")
    summary = json.load(open(nan_run / "summary.json"))
    (nan_run / "summary.json").write_text(json.dumps({**summary, "final_test_error": float("nan")}))
    text_run = shutil.copytree(two_runs[1][0], tmp_path / "runs" / "text")
    row = json.loads((text_run / "metrics.jsonl").read_text().splitlines()[0])
    (text_run / "metrics.jsonl").write_text(json.dumps({**row, "test_error": "x"}) + "\n")
    assert report.main([str(tmp_path / "runs"), "--plot", str(tmp_path / "p.png")]) == 1
    out, err = capsys.readouterr()
    assert err == "report.py: error: no completed runs to plot\n", err
    assert "unreadable (summary.json: final_test_error is nan, not an error in [0, 100] %)" in out, out
    assert "unreadable (metrics.jsonl line 1: test_error is 'x', not a number)" in out, out
    assert "nan ±" not in out
