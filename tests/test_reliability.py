"""Reliability: SIGKILL at random moments + resume, signals, divergence, untrusted files,
concurrent runs with one name, determinism."""
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import main
from runner.records import atomic_write, write_text
from conftest import ROOT
from test_main import TINY, rows, run

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STRIP = ("epoch_time_s",)


def metrics(run_dir):
    return [{k: v for k, v in r.items() if k not in STRIP} for r in rows(run_dir)]


def spawn(args):
    return subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("optimizer", ["sgd", "amp", "rwp", "sam"])
def test_sigkill_at_random_moments_then_resume_gives_identical_metrics(tmp_path, optimizer):
    """Kill the run with SIGKILL at random moments (mid-epoch, mid-checkpoint, mid-metrics write),
    resume each time; the finished run's metrics equal an uninterrupted run's exactly."""
    args = [*TINY, "--optimizer", optimizer, "--epochs", "3", "--train_size", "384"]
    out = ["--out_dir", str(tmp_path / "runs")]
    ref = spawn([*args, *out, "--name", "ref"])  # the uninterrupted run, alongside (one thread each)
    run_dir = tmp_path / "runs" / "killed"
    try:
        rng = random.Random(optimizer)
        p = spawn([*args, *out, "--name", "killed"])
        kills = 0
        while kills < 2:
            # wait for this process to finish one more epoch (its checkpoint is then on disk), then
            # kill it after a random delay: mid-epoch, mid-evaluation or mid-checkpoint write
            done = len(rows(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0
            deadline = time.time() + 120
            while p.poll() is None and time.time() < deadline and (
                    not (run_dir / "metrics.jsonl").exists() or len(rows(run_dir)) <= done):
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 1.5))
            if p.poll() is not None:
                break
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
            p = spawn(["--resume", str(run_dir)])
        out_, err = p.communicate()
        assert p.returncode == 0, err[-1000:]
        assert kills >= 1
        assert ref.wait(timeout=300) == 0, ref.communicate()[1][-1000:]
        assert metrics(run_dir) == metrics(tmp_path / "runs" / "ref")
    finally:
        if ref.poll() is None:  # (a failed assertion above: do not leave it running)
            ref.kill()
            ref.wait()
    assert not [f for f in os.listdir(run_dir) if ".tmp" in f]  # no temporary file left


def test_sigterm_stops_cleanly_and_resumes(tmp_path):
    args = [*TINY, "--optimizer", "sgd", "--epochs", "50", "--out_dir", str(tmp_path / "runs"), "--name", "t"]
    p = spawn(args)
    run_dir = tmp_path / "runs" / "t"
    while not (run_dir / "checkpoint.pt").exists():
        assert p.poll() is None, p.communicate()[1]
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and "Traceback" not in err
    s = json.load(open(run_dir / "summary.json"))
    assert s["status"] == "interrupted" and "--resume" in s["message"]
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == s["epochs_completed"] == len(rows(run_dir))


def test_divergence_stops_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = main.Trainer.closure_for

    def nan_from_epoch_2(self, batches):
        closure = real(self, batches)
        if not hasattr(self, "_calls"):
            self._calls = 0
        self._calls += 1

        def poisoned(batch=0, loss_weight=1.0):
            # 4 steps per epoch: from the 7th step on (epoch 2, step 3) the loss is inf
            factor = float("inf") if self._calls >= 7 else 1.0
            outputs, loss = closure(batch, loss_weight * factor)
            return outputs, loss * factor
        return poisoned

    monkeypatch.setattr(main.Trainer, "closure_for", nan_from_epoch_2)
    code, run_dir = run(tmp_path, *TINY, "--optimizer", "sgd", "--epochs", "3", name="div")
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite at epoch 2, step 3" in err
    s = json.load(open(run_dir / "summary.json"))
    assert s["status"] == "diverged" and "epoch 2, step 3" in s["message"] and s["epochs_completed"] == 1
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_huge_learning_rate_diverges_with_exit_1(tmp_path, capsys):
    code, run_dir = run(tmp_path, *TINY, "--optimizer", "sgd", "--lr", "1e6", "--epochs", "2", name="big")
    assert code == 1
    s = json.load(open(run_dir / "summary.json"))
    assert s["status"] == "diverged" and "non-finite" in s["message"]
    if s["epochs_completed"] == 0:  # diverged in epoch 1: no checkpoint exists, and it says so
        assert "last good checkpoint: none yet (start the run again)" in s["message"]
        assert not (run_dir / "checkpoint.pt").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 2-epoch SGD run, trained once for the tests below that only read or edit its files."""
    code, run_dir = run(tmp_path_factory.mktemp("finished"), *TINY, "--optimizer", "sgd", "--epochs", "2", name="done")
    assert code == 0
    return run_dir


def copy_of(finished, tmp_path, name):
    """A private copy of the finished run (each test edits its own files)."""
    return shutil.copytree(finished, tmp_path / "runs" / name)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARKER']}",))


def test_crafted_pickle_is_refused_without_running(tmp_path, capsys, monkeypatch, finished):
    run_dir = copy_of(finished, tmp_path, "victim")
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    ckpt["payload"] = _Evil()
    with open(run_dir / "checkpoint.pt", "wb") as f:
        pickle.dump(ckpt, f)  # torch.load(weights_only=False) would run os.system
    assert main.main(["--resume", str(run_dir)]) == 2
    assert "cannot load" in capsys.readouterr().err and not marker.exists()


def test_corrupt_and_foreign_checkpoints_are_clear_errors(tmp_path, capsys, finished):
    run_dir = copy_of(finished, tmp_path, "c")
    data = open(run_dir / "checkpoint.pt", "rb").read()
    with open(run_dir / "checkpoint.pt", "wb") as f:
        f.write(data[: len(data) // 2])  # truncated
    assert main.main(["--resume", str(run_dir)]) == 2
    assert "corrupt" in capsys.readouterr().err
    torch.save({"state_dict": {}}, run_dir / "checkpoint.pt")  # some other program's checkpoint
    assert main.main(["--resume", str(run_dir)]) == 2
    assert "not a checkpoint of this runner" in capsys.readouterr().err


def _edit(ckpt, path, value):
    *keys, last = path.split(".")
    for k in keys:
        ckpt = ckpt[k]
    if value is KeyError:
        del ckpt[last]
    else:
        ckpt[last] = value


@pytest.mark.parametrize("path,value,message", [
    ("rng", KeyError, "not a checkpoint of this runner"),
    ("history", KeyError, "not a checkpoint of this runner"),
    ("epoch", "1", "not a checkpoint of this runner"),
    ("epoch", 7, "not a checkpoint of this runner"),          # more epochs than the run has
    ("history", [{"epoch": 1}], "not a checkpoint of this runner"),
    ("rng.cpu", torch.zeros(3), "not a checkpoint of this runner"),
    ("config.lr", "x", "the config saved in"),
    ("config.model", "nosuch", "model: unknown model 'nosuch'"),
    ("model", torch.zeros(2, 2), "checkpoint does not fit this model/optimizer (size mismatch"),
])
def test_edited_checkpoints_are_one_line_exit_2(tmp_path, capsys, finished, path, value, message):
    """Loadable files in our format with one part removed or of the wrong type: never a traceback."""
    run_dir = copy_of(finished, tmp_path, "e")
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    ckpt["epoch"], ckpt["history"] = 1, ckpt["history"][:1]  # as if stopped after epoch 1
    if path == "model":  # the classifier's weight, of another shape
        ckpt["model"][next(k for k, v in ckpt["model"].items() if v.dim() == 2)] = value
    else:
        _edit(ckpt, path, value)
    torch.save(ckpt, run_dir / "checkpoint.pt")
    capsys.readouterr()
    assert main.main(["--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("main.py: error: resume: ") and message in err, err


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys, finished):
    run_dir = copy_of(finished, tmp_path, "f")
    before = {f: (run_dir / f).read_bytes() for f in os.listdir(run_dir)}
    capsys.readouterr()
    assert main.main(["--resume", str(run_dir)]) == 0
    assert "has finished all 2 epochs; nothing to resume" in capsys.readouterr().out
    assert {f: (run_dir / f).read_bytes() for f in os.listdir(run_dir)} == before
    # killed after the final checkpoint, before summary.json: resuming completes the records
    summary = json.loads(before["summary.json"])
    os.remove(run_dir / "summary.json")
    assert main.main(["--resume", str(run_dir)]) == 0
    again = json.load(open(run_dir / "summary.json"))
    assert again["status"] == "completed" and again["final_test_error"] == summary["final_test_error"]
    assert again["wall_time_s"] >= summary["wall_time_s"] - 1


def _torchrun(args, out=None, name=None):
    """torchrun with 2 gloo workers in a new session; returns (process, master port)."""
    from test_main import free_port
    port = str(free_port())
    where = ["--out_dir", str(out), "--name", name] if name else []
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          port, "main.py", *args, *where], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    return p, port


def _signal_workers_after_first_checkpoint(p, port, ckpt_path, ranks, times=1, delay=0.0):
    """Wait for the run's first checkpoint, then SIGTERM the workers of `ranks` (`times` each), and
    wait for torchrun to end (a rank left in a collective would hang here)."""
    try:
        deadline = time.time() + 120
        while not ckpt_path.exists():
            assert p.poll() is None and time.time() < deadline, p.communicate()[1][-2000:]
            time.sleep(0.05)
        time.sleep(delay)
        workers = [int(pid) for pid in os.listdir("/proc") if pid.isdigit()
                   and _env_of(pid).get("MASTER_PORT") == port and _env_of(pid).get("RANK") in ranks]
        assert len(workers) == len(ranks), workers
        for _ in range(times):
            for pid in workers:
                os.kill(pid, signal.SIGTERM)
        p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def test_torchrun_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Under torchrun a signal may reach one rank only (or the ranks at different steps). The ranks
    agree on stopping (all-reduced flag) so none is left waiting in a collective: SIGTERM to rank 1
    alone ends the whole job promptly with a consistent checkpoint and summary."""
    out = tmp_path / "runs"
    p, port = _torchrun([*TINY, "--optimizer", "sgd", "--epochs", "200", "--batch_size", "32"], out, "ddp")
    _signal_workers_after_first_checkpoint(p, port, out / "ddp" / "checkpoint.pt", ["1"])
    s = json.load(open(out / "ddp" / "summary.json"))
    assert s["status"] == "interrupted" and "--resume" in s["message"]
    ckpt = torch.load(out / "ddp" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == s["epochs_completed"] == len(rows(out / "ddp")) < 200


def test_torchrun_mid_epoch_stop_and_resume_match_an_uninterrupted_run(tmp_path):
    """2 ranks, 128 steps an epoch: SIGTERM (twice) to both workers early in epoch 2 stops them at
    the same 50-step sync point (50 or 100); the checkpoint holds both ranks' running sums; a torchrun
    --resume then ends with the metrics of an uninterrupted 2-rank run."""
    args = [*TINY, "--optimizer", "sgd", "--epochs", "2", "--train_size", "512", "--batch_size", "2",
            "--eval_every", "2"]
    out = tmp_path / "runs"
    p, _ = _torchrun(args, out, "full")
    assert p.communicate(timeout=300) and p.returncode == 0
    p, port = _torchrun(args, out, "part")
    # every worker, twice (a cluster signals each process and torchrun forwards), early in epoch 2
    _signal_workers_after_first_checkpoint(p, port, out / "part" / "checkpoint.pt", ["0", "1"], times=2, delay=0.3)
    partial = torch.load(out / "part" / "checkpoint.pt", weights_only=True)["partial"]
    assert partial["step"] % 50 == 0 and 0 < partial["step"] < 128 and len(partial["ranks"]) == 2
    assert partial["ranks"][0][2] == partial["ranks"][1][2] == 2 * partial["step"]  # samples seen per rank
    p, _ = _torchrun(["--resume", str(out / "part")])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    assert metrics(out / "part") == metrics(out / "full")


def _env_of(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return dict(kv.split("=", 1) for kv in f.read().decode(errors="replace").split("\0") if "=" in kv)
    except OSError:
        return {}


def test_interrupted_checkpoint_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.pt"
    write_text(str(path), "old")

    def dies_midway(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), dies_midway)
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["f.pt"]


MORE_BAD = [
    (["--out_dir", "__FILE__/runs"], "out_dir: cannot create"),
    (["--dataset", "cifar10", "--data_dir", "__TMP__/missing"], "cifar10 not found"),
    (["--optimizer", "amp", "--amp_ball", "sphere"], "invalid choice: 'sphere'"),
    (["--cutout_prob", "1.5"], "cutout_prob: 1.5 is out of range"),
    (["--inner_iter", "-1"], "inner_iter: -1 is out of range"),
    (["--name", "a/b"], "name: 'a/b' must be a plain folder name"),
    (["--dropout", "0.1", "--model", "resnet18"], "dropout"),
    (["--train_size", "1"], "train_size: 1 training sample(s) per process make no batch of 2 or more"),
]


@pytest.mark.parametrize("argv,message", MORE_BAD, ids=[" ".join(a) for a, _ in MORE_BAD])
def test_more_bad_input(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("x")
    argv = [a.replace("__FILE__", str(tmp_path / "file")).replace("__TMP__", str(tmp_path)) for a in argv]
    out = [] if any(a.startswith("--out_dir") for a in argv) else ["--out_dir", str(tmp_path / "runs")]
    code = main.main([*TINY, *argv, *out])  # later flags override TINY's
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_odd_world_size_for_parallel_rwp(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main.main([*TINY, "--optimizer", "rwp", "--out_dir", str(tmp_path / "runs")]) == 2
    assert "needs an even number of processes, got 3" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")  # a run from one process, resumed by three
    assert main.main([*TINY, "--optimizer", "rwp", "--epochs", "1", "--out_dir", str(tmp_path / "runs"),
                      "--name", "w"]) == 0
    ckpt = torch.load(tmp_path / "runs" / "w" / "checkpoint.pt", weights_only=True)
    ckpt["config"]["epochs"], ckpt["world_size"] = 2, 3  # (as if saved by three processes)
    torch.save(ckpt, tmp_path / "runs" / "w" / "checkpoint.pt")
    config = tmp_path / "runs" / "w" / "config.yaml"
    config.write_text(config.read_text().replace("epochs: 1", "epochs: 2"))
    monkeypatch.setenv("WORLD_SIZE", "3")
    capsys.readouterr()
    assert main.main(["--resume", str(tmp_path / "runs" / "w")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("main.py: error: torchrun: parallel RWP") and err.count("\n") == 1, err


def test_two_runs_with_one_name_at_once_keep_separate_records(tmp_path):
    args = [*TINY, "--optimizer", "sgd", "--epochs", "1", "--out_dir", str(tmp_path / "runs"), "--name", "same"]
    procs = [spawn(args) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.communicate()[1]
    assert sorted(os.listdir(tmp_path / "runs")) == ["same", "same-1"]
    for d in ("same", "same-1"):
        assert json.load(open(tmp_path / "runs" / d / "summary.json"))["status"] == "completed"
        assert len(rows(tmp_path / "runs" / d)) == 1


def test_same_seed_same_metrics(tmp_path):
    args = [*TINY, "--optimizer", "amp", "--dropout", "0.1", "--train_size", "128"]  # 2 epochs of 2 steps
    assert run(tmp_path, *args, name="a")[0] == 0 and run(tmp_path, *args, name="b")[0] == 0
    assert metrics(tmp_path / "runs" / "a") == metrics(tmp_path / "runs" / "b")
    assert run(tmp_path, *args, "--seed", "1", name="c")[0] == 0
    assert metrics(tmp_path / "runs" / "c") != metrics(tmp_path / "runs" / "a")
