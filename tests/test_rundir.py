"""Run folders: one writer (an OS lock), the recorded process count, values refused before any
folder exists, a config.yaml that says what ran, failed writes, leftovers, start-up interrupts."""
import errno
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import main
import report
from conftest import ROOT
from test_main import DATA, TINY, rows
from test_report import recipe
from test_reliability import ENV, spawn

ONE = [*TINY, "--optimizer", "sgd", "--epochs", "1"]


def files(folder):
    """{name: (size, mtime)} of a folder's records: to show that nothing was written (the lock file
    holds the PID of the process that holds, or last held, the lock)."""
    return {n: (os.stat(folder / n).st_size, os.stat(folder / n).st_mtime_ns) for n in os.listdir(folder)
            if n != ".lock"}


def wait_for(path, proc, timeout=240):
    start = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout
        time.sleep(0.1)


def test_a_folder_in_use_has_one_writer_and_a_killed_run_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "runs"
    dir_ = out / "wrn28_10_basic_sgd_s0"  # the name of a recipe row
    proc = spawn([*TINY, "--optimizer", "sgd", "--epochs", "500", "--out_dir", str(out), "--name", dir_.name])
    try:
        wait_for(dir_ / "checkpoint.pt", proc)
        before = files(dir_)
        assert main.main(["--resume", str(dir_)]) == 2  # a second process: refused, writes nothing
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{dir_} is in use by process {proc.pid}" in err, err
        same_row = [*ONE, "--out_dir", str(out), "--name", dir_.name, "--on_existing", "resume"]
        assert main.main(same_row) == 2 and "in use by process" in capsys.readouterr().err
        assert sorted(os.listdir(out)) == [dir_.name]  # never suffixed as name-1
        stub = tmp_path / "stub.sh"
        stub.write_text(f'echo "$@" >> {tmp_path / "calls"}\n')
        p = recipe("sam_fashionmnist", env={"OUT": str(out), "ONLY": "basic_sgd", "SEEDS": "0",
                                            "LAUNCH": f"bash {stub}"})
        assert f"{dir_} is running in another process; skipped" in p.stderr
        assert not (tmp_path / "calls").exists()
        assert {k: v for k, v in files(dir_).items() if k not in ("log.txt", "metrics.jsonl", "checkpoint.pt")} \
            == {k: v for k, v in before.items() if k not in ("log.txt", "metrics.jsonl", "checkpoint.pt")}
    finally:
        proc.kill()
        proc.wait()
    ckpt = torch.load(dir_ / "checkpoint.pt", weights_only=True)
    ckpt["config"]["epochs"] = ckpt["epoch"] + 1  # (so the resume is short)
    torch.save(ckpt, dir_ / "checkpoint.pt")
    (dir_ / "config.yaml").write_text((dir_ / "config.yaml").read_text().replace("epochs: 500", f"epochs: {ckpt['epoch'] + 1}"))
    assert main.main(["--resume", str(dir_)]) == 0  # SIGKILL left no stale lock


def test_a_recipe_row_is_resumed_only_with_its_own_settings(tmp_path, capsys):
    row = [*TINY, "--optimizer", "sgd", "--out_dir", str(tmp_path), "--name", "row_s0", "--on_existing", "resume"]
    assert main.main([*row, "--epochs", "1"]) == 0  # a smoke test with fewer epochs lands in the row's folder
    before = files(tmp_path / "row_s0")
    capsys.readouterr()
    assert main.main(row) == 2  # the real row: refused, says with which settings, writes nothing
    err = capsys.readouterr().err
    assert "holds a run with other settings (epochs=1 there, 2 here)" in err and err.count("\n") == 1, err
    assert files(tmp_path / "row_s0") == before and sorted(os.listdir(tmp_path)) == ["row_s0"]
    assert main.main([*row, "--epochs", "1"]) == 0  # the same settings: finished, nothing to do
    assert "has finished all 1 epochs; nothing to resume" in capsys.readouterr().out
    assert files(tmp_path / "row_s0") == before


def test_a_row_that_stopped_before_its_first_checkpoint_starts_again(tmp_path, capsys):
    dead = tmp_path / "row_s0"
    for attempt in (1, 2):
        dead.mkdir()
        (dead / "log.txt").write_text(f"attempt {attempt}\n")
        row = [*ONE, "--out_dir", str(tmp_path), "--name", "row_s0", "--on_existing", "resume"]
        assert main.main(row) == 0
        assert f"kept as {dead}.failed-{attempt}, starting it again" in capsys.readouterr().err
        assert (tmp_path / f"row_s0.failed-{attempt}" / "log.txt").read_text() == f"attempt {attempt}\n"
        assert json.load(open(dead / "summary.json"))["status"] == "completed"
        if attempt == 1:
            os.rename(dead, tmp_path / "done")


def test_the_process_count_is_recorded_and_must_match_on_resume(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main.main([*TINY, "--optimizer", "rwp", "--out_dir", str(out), "--name", "a", "--epochs", "1"]) == 0
    summary = json.load(open(out / "a" / "summary.json"))
    assert (summary["world_size"], summary["rwp_mode"]) == (1, "sequential")
    ckpt = torch.load(out / "a" / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 1
    ckpt["world_size"], ckpt["config"]["epochs"] = 2, 2  # as if two torchrun processes had trained it
    torch.save(ckpt, out / "a" / "checkpoint.pt")
    (out / "a" / "config.yaml").write_text((out / "a" / "config.yaml").read_text().replace("epochs: 1", "epochs: 2"))
    capsys.readouterr()
    assert main.main(["--resume", str(out / "a")]) == 2
    err = capsys.readouterr().err
    assert "was trained by 2 process(es) and continues only with 2" in err and "torchrun --nproc_per_node 2" in err
    # report.py keeps runs of another process count apart
    for name, world in (("b", 1), ("c", 2)):
        (out / name).mkdir()
        (out / name / "config.yaml").write_text((out / "a" / "config.yaml").read_text())
        (out / name / "summary.json").write_text(json.dumps({**summary, "world_size": world}))
    groups, _ = report.summarize([report.Run(str(out / n)) for n in ("b", "c")])
    assert sorted((g["n"], g["setting"]) for g in groups) == [(1, "world_size=1"), (1, "world_size=2")]


BAD_VALUES = [
    ("std: [.inf]\n", "std: values must be finite numbers"),
    ("std: [0]\n", "std: values must be > 0"),
    ("mean: [.nan]\n", "mean: values must be finite numbers"),
    ("train_size: 70000\n", "train_size: 70000 is more than the 60000 samples of fashionmnist's train set"),
    ("test_size: 10001\n", "test_size: 10001 is more than the 10000 samples of fashionmnist's test set"),
    ("cutout: true\ncutout_size: 100000000000000000000000000\n", "cutout_size: 100000000000000000000000000 is out of range"),
    ("cutout: true\ncutout_size: 29\n", "cutout_size: at most the image size (28 pixels), got 29"),
    ("batch_size: 100000000000000000000000000\n", "batch_size: 100000000000000000000000000 is out of range"),
    ("lr: 0.1\nlr: 0.2\n", "config: key 'lr' is given twice (line 2)"),
    (b"lr: 0.1\n# caf\xe9\n", "is not UTF-8 text (byte 0xe9 at offset 13)"),
]


@pytest.mark.parametrize("text,message", BAD_VALUES, ids=[m.split(":")[0] for _, m in BAD_VALUES])
def test_values_that_cannot_train_are_refused_before_any_folder(tmp_path, capsys, text, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    base = [*DATA, "--model", "wrn10_1", "--optimizer", "sgd", "--epochs", "1"]  # (sizes from the file)
    assert main.main([*base, "--config", str(path), "--out_dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_config_files_in_utf16_and_from_a_pipe_are_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.3\nepochs: 7\n", encoding="utf-16")  # with its byte-order mark, as editors save it
    cfg, _ = main.parse_config(["--config", str(path)])
    assert (cfg.lr, cfg.epochs) == (0.3, 7)
    code = "import main; print(main.parse_config(['--config', '/dev/stdin'])[0].lr)"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, input="lr: 0.25\n", capture_output=True,
                       text=True, timeout=120)
    assert p.stdout.strip() == "0.25", p.stderr


def test_an_edited_config_yaml_is_refused_on_resume(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main.main([*ONE, "--out_dir", str(out), "--name", "r"]) == 0
    ckpt = torch.load(out / "r" / "checkpoint.pt", weights_only=True)
    ckpt["config"]["epochs"] = 2  # (a run stopped after epoch 1 of 2)
    torch.save(ckpt, out / "r" / "checkpoint.pt")
    text = (out / "r" / "config.yaml").read_text().replace("epochs: 1", "epochs: 2")
    (out / "r" / "config.yaml").write_text(text.replace("lr: 0.1", "lr: 0.5"))
    capsys.readouterr()
    assert main.main(["--resume", str(out / "r")]) == 2
    err = capsys.readouterr().err
    assert "config.yaml was edited (lr: 0.5 there, 0.1 in checkpoint.pt, which is what ran" in err, err


def test_disk_full_while_saving_keeps_the_last_checkpoint_and_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "runs"
    real, calls = torch.save, []

    def save(obj, f):  # the second checkpoint finds the disk full after writing part of it
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, f)
    monkeypatch.setattr(torch, "save", save)
    args = [*TINY, "--optimizer", "sgd", "--epochs", "3", "--out_dir", str(out), "--name", "r"]
    assert main.main(args) == 1
    err = capsys.readouterr().err
    assert f"cannot write {out / 'r' / 'checkpoint.pt'} (No space left on device); it needs about" in err
    assert "the last checkpoint (epoch 1) is intact: make room, then --resume" in err and "Traceback" not in err
    summary = json.load(open(out / "r" / "summary.json"))
    assert summary["status"] == "failed" and "No space left" in summary["message"]
    assert torch.load(out / "r" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert sorted(os.listdir(out / "r")) == sorted([".lock", "checkpoint.pt", "command.txt", "config.yaml",
                                                    "git_commit.txt", "log.txt", "metrics.jsonl", "summary.json"])
    monkeypatch.setattr(torch, "save", real)
    assert main.main(["--resume", str(out / "r")]) == 0
    assert [r["epoch"] for r in rows(out / "r")] == [1, 2, 3]


def test_a_real_failed_write_is_one_line_and_exit_1(tmp_path):
    """The file-size limit makes the kernel refuse the checkpoint's bytes (as a full disk does):
    torch reports it as a RuntimeError, which must still be one line, naming the limit (not the
    free space: it is not a disk-space problem)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    p = subprocess.run([sys.executable, "main.py", *ONE, "--out_dir", str(tmp_path), "--name", "r"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"cannot write {tmp_path / 'r' / 'checkpoint.pt'} (File too large: this process may write files of at most " \
        f"100,000 bytes" in p.stderr and "it needs about" in p.stderr and "free" not in p.stderr, p.stderr
    assert json.load(open(tmp_path / "r" / "summary.json"))["status"] == "failed"
    assert not [n for n in os.listdir(tmp_path / "r") if ".tmp" in n]


def test_a_resume_removes_temporaries_that_a_killed_writer_left(tmp_path):
    assert main.main([*ONE, "--out_dir", str(tmp_path), "--name", "r"]) == 0
    for name in ("checkpoint.pt.tmp4242", "summary.json.tmp77"):
        (tmp_path / "r" / name).write_bytes(b"x" * 1000)
    assert main.main(["--resume", str(tmp_path / "r")]) == 0  # (finished: nothing else changes)
    assert not [n for n in os.listdir(tmp_path / "r") if ".tmp" in n]


def test_ctrl_c_while_starting_is_one_line_and_exit_130(tmp_path):
    proc = subprocess.Popen([sys.executable, "main.py", *ONE, "--out_dir", str(tmp_path / "runs")], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # importing torch, loading data
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and err.count("\n") <= 1, err


def test_command_txt_runs_again_as_written_and_a_long_name_is_blamed_on_the_name(tmp_path, capsys):
    argv = [*ONE, "--out_dir", str(tmp_path), "--name", "with space's"]
    assert main.main(argv) == 0
    assert shlex.split((tmp_path / "with space's" / "command.txt").read_text()) == ["python", "main.py", *argv]
    assert main.main([*ONE, "--out_dir", str(tmp_path), "--name", "x" * 300]) == 2
    assert "name: 'xxxx" in capsys.readouterr().err


def test_a_finished_row_is_skipped_whatever_else_changed(tmp_path, capsys):
    """A finished row is never trained again or counted as failed: not when its checkpoint was
    deleted to save space, run by another process count, or its config.yaml relabelled."""
    row = [*ONE, "--out_dir", str(tmp_path), "--name", "row_s0", "--on_existing", "resume"]
    assert main.main(row) == 0
    config = tmp_path / "row_s0" / "config.yaml"
    config.write_text(config.read_text().replace("paper_ref: ''", "paper_ref:"))  # the same, written another way
    ckpt = torch.load(tmp_path / "row_s0" / "checkpoint.pt", weights_only=True)
    ckpt["world_size"] = 2
    torch.save(ckpt, tmp_path / "row_s0" / "checkpoint.pt")
    capsys.readouterr()
    assert main.main(row) == 0 and "has finished all 1 epochs" in capsys.readouterr().out
    os.remove(tmp_path / "row_s0" / "checkpoint.pt")
    assert main.main(row) == 0 and "row_s0 has finished (summary.json); skipped" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["row_s0"]


def test_folders_that_are_not_run_folders_are_left_alone(tmp_path, capsys):
    mine = tmp_path / "proj"
    mine.mkdir()
    (mine / "backup.tmp1").write_text("keep")
    (mine / "notes.txt").write_text("keep")
    assert main.main(["--resume", str(mine)]) == 2
    assert "has no checkpoint.pt" in capsys.readouterr().err
    assert main.main([*ONE, "--out_dir", str(tmp_path), "--name", "proj", "--on_existing", "resume"]) == 2
    assert "exists and is not a run folder" in capsys.readouterr().err
    assert sorted(os.listdir(mine)) == ["backup.tmp1", "notes.txt"] and sorted(os.listdir(tmp_path)) == ["proj"]


def test_rundir_stands_below_records_and_training():
    """records.py and training.py import rundir.py, so rundir.py imports neither (no import cycle),
    nor torch (main.py --help stays fast): of the runner it loads config.py alone."""
    code = "import sys, runner.rundir; print(*sorted(m for m in sys.modules if m.split('.')[0] in ('runner', 'torch')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["runner", "runner.config", "runner.rundir"]


def test_under_torchrun_every_rank_follows_rank_0s_decision(tmp_path):
    """--on_existing resume under torchrun: only rank 0 looks at the folder, the others learn its
    decision. A finished row whose checkpoint was deleted is "done" on rank 0 (the others alone
    would start it anew): both ranks skip it, exit 0 and write nothing."""
    from test_main import free_port
    row = [*ONE, "--out_dir", str(tmp_path), "--name", "row_s0", "--on_existing", "resume"]
    assert main.main(row) == 0
    os.remove(tmp_path / "row_s0" / "checkpoint.pt")
    before = files(tmp_path / "row_s0")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), "main.py", *row], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == f"{tmp_path / 'row_s0'} has finished (summary.json); skipped"
    assert files(tmp_path / "row_s0") == before and os.listdir(tmp_path) == ["row_s0"]
