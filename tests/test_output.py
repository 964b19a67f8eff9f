"""What a person reads: epoch lines above the progress bar in a terminal, progress lines without
one, --help from the Config comments, `python -m models`, the data folder read, --evaluate of a
finished run, and --tensorboard event files."""
import json
import os
import pty
import re
import subprocess
import sys

import pytest

import main
from conftest import FASHION_DIR, ROOT
from runner.config import FIELDS, field_comments
from test_main import TINY

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def test_terminal_bar_stays_below_the_epoch_lines(tmp_path):
    """Under a pseudo-terminal the bar shows a running loss from the first step (4 steps an epoch:
    before any 50-step sync point), and every epoch line starts its own screen line."""
    import fcntl
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))  # a 150-column terminal
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), *TINY, "--optimizer", "sgd",
                             "--out_dir", str(tmp_path), "--name", "r"],
                            stdin=slave, stdout=slave, stderr=slave, env=ENV)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    os.close(master)
    screen = b"".join(chunks).decode(errors="replace")
    assert "train:" in screen and "loss=" in screen, screen  # the bar, with a loss, was drawn
    for k in (1, 2):
        line = next(seg for seg in screen.split("\n") if f"epoch {k}/2  train loss" in seg)
        visible = line.rstrip("\r").split("\r")[-1]  # what stays on that screen line after the carriage returns
        visible = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", visible)
        assert visible.startswith(f"epoch {k}/2  train loss"), repr(line)


def test_without_terminal_progress_lines_and_the_data_folder_read(tmp_path, capsys, monkeypatch):
    """stdout not a terminal (captured here, as a file or pipe would be): no bar, progress lines at
    the interval (here: every step) with step, running loss, images/s and ETA; the Debian folder,
    read when data_dir does not exist, is named in the first line and in summary.json."""
    if not os.path.isdir(FASHION_DIR):
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the Debian package dataset-fashion-mnist ({FASHION_DIR})")
        pytest.skip("needs the Debian package dataset-fashion-mnist (CI installs it)")
    args = [a for a in TINY if a not in ("--data_dir", FASHION_DIR)]
    monkeypatch.chdir(tmp_path)  # no ./data: Fashion-MNIST falls back to the Debian folder
    assert not sys.stdout.isatty()
    assert main.main([*args, "--optimizer", "sgd", "--progress_every", "1e-9", "--out_dir", "runs", "--name", "r"]) == 0
    text = capsys.readouterr().out
    assert "\r" not in text and "train:" not in text
    progress = [line for line in text.splitlines() if line.startswith("  epoch ")]
    assert "  epoch 1/2 step 1/4  loss " in text
    assert any(re.fullmatch(r"  epoch 2/2 step 4/4  loss \d+\.\d{3}  \d+ img/s  ETA 0:00 \(epoch\)", line)
               for line in progress), progress
    first = text.splitlines()[0]
    assert first.startswith("started runs/r: fashionmnist (from /usr/share/datasets/fashion-mnist) "), first
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert summary["data_read_from"] == FASHION_DIR
    log = (tmp_path / "runs" / "r" / "log.txt").read_text()
    assert log.splitlines()[0] == first and "step" not in log  # progress lines go to stdout only


def test_help_describes_every_flag_from_the_config_comments(capsys):
    assert main.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    comments = field_comments()
    assert set(comments) == set(FIELDS)  # every field has its one-line comment
    for name, comment in comments.items():
        assert f"--{name}" in text and " ".join(comment.split()) in text, name
    assert "--name NAME run folder name (default DATASET_MODEL_OPTIMIZER_sSEED" in text
    assert "--epochs EPOCHS training epochs (default: 200)" in text
    assert "python main.py --evaluate RUN_DIR" in text
    readme = open(os.path.join(ROOT, "README.md")).read()
    table = readme[readme.index("| group | fields (default) |"):readme.index("| paper reference |")]
    assert all(f"`{name}`" in table for name in FIELDS if not name.startswith("paper_")), "README Config table"


def test_python_m_models_lists_the_wrn_rule(capsys, monkeypatch):
    import runpy
    import models
    monkeypatch.setattr(models, "markdown_table", lambda: "TABLE")  # (the table: test_models.py)
    monkeypatch.setattr(sys, "argv", ["models"])  # (pytest's own arguments would be refused)
    runpy.run_module("models", run_name="__main__")
    out = capsys.readouterr().out
    assert "wrn{depth}_{width}" in out and "depth = 6n+4" in out and out.endswith("TABLE\n")
    assert "`rwp_wrn{depth}_{width}`" in out and "`sam_wrn{depth}_{width}`" in out  # all three families
    assert "wrn10_2 (the README quick start)" in out and "wrn10_1" in out


def test_evaluate_prints_the_last_test_error_and_writes_nothing(tmp_path, capsys):
    """--evaluate RUN_DIR gives exactly the last metrics.jsonl row's test loss and error; the
    run's TensorBoard events (--tensorboard) hold the numbers of metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from runner.evaluate import evaluate_run
    run_dir = tmp_path / "r"
    assert main.main([*TINY, "--optimizer", "sam", "--tensorboard", "--out_dir", str(tmp_path), "--name", "r"]) == 0
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    assert main.main(["--evaluate", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out == (f"{run_dir} (checkpoint after epoch 2/2): fashionmnist test set (128 images): "
                   f"test loss {rows[-1]['test_loss']:.4f} err {rows[-1]['test_error']:.2f}% "
                   f"top-5 {rows[-1]['test_error_top5']:.2f}%\n")
    r = evaluate_run(str(run_dir), "cpu")
    assert (r["loss"], r["error"], r["error_top5"], r["images"]) == (
        rows[-1]["test_loss"], rows[-1]["test_error"], rows[-1]["test_error_top5"], 128)  # bit for bit
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before

    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = {"train/loss": "train_loss", "train/error": "train_error", "test/loss": "test_loss",
            "test/error": "test_error", "lr": "lr", "epoch_time_s": "epoch_time_s"}
    assert set(tags) <= set(events.Tags()["scalars"])
    for tag, key in tags.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [r["epoch"] for r in rows]
        assert all(v == pytest.approx(r[key], rel=1e-6) for (_, v), r in zip(got, rows)), tag


def test_evaluate_of_a_bad_folder_is_one_line(tmp_path, capsys):
    assert main.main(["--evaluate", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err == f"main.py: error: {str(tmp_path / 'nope')!r} is not a run folder\n"
    assert main.main(["--evaluate", str(tmp_path)]) == 2
    assert "has no checkpoint.pt" in capsys.readouterr().err
    assert main.main(["--evaluate"]) == 2


def test_tensorboard_missing_is_one_line_before_any_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    assert main.main([*TINY, "--tensorboard", "--out_dir", str(tmp_path / "runs"), "--name", "r"]) == 2
    assert capsys.readouterr().err == ("main.py: error: tensorboard: --tensorboard needs the tensorboard "
                                       "package (pip install tensorboard)\n")
    assert not (tmp_path / "runs").exists()
