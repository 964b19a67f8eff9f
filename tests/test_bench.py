"""bench.py on the CPU: a short run of every optimizer gives a well-formed JSON and table; bad
arguments give one line on stderr and exit code 2."""
import json
import math
import os
import subprocess
import sys

import pytest

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--quick", "--model", "wrn10_1", "--dataset", "fashionmnist", "--batch_size", "8",
        "--train_size", "64", "--eval_batch_size", "32", "--optimizers", *bench.BENCH_OPTIMIZERS]


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run_writes_json_and_table(tmp_path, capsys, one_thread):
    out = tmp_path / "bench.json"
    argv = TINY + ["--check_sync", "--profile", "3", "--json", str(out)]
    assert bench.main_cli(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    for key in ("date", "device", "torch", "command", "argv", "config", "settings", "train", "pipeline",
                "eval", "sync_check", "steps_per_epoch", "loadavg_start", "loadavg_end"):
        assert key in report, key
    assert report["argv"] == argv and report["device_type"] == "cpu"
    assert report["config"]["model"] == "wrn10_1" and report["config"]["batch_size"] == 8
    assert report["settings"]["steps"] == bench.QUICK["steps"]
    assert report["steps_per_epoch"] == 8  # 64 samples / batch 8

    rows = {r["optimizer"]: r for r in report["train"]}
    assert list(rows) == list(bench.BENCH_OPTIMIZERS)
    for name, r in rows.items():
        for key in ("ms_per_step", "images_per_s", "steps_per_s", "ratio_to_sgd", "epoch_s",
                    "flop_per_step", "achieved_tflops"):
            assert _positive(r[key]), (name, key, r[key])
        assert len(r["ms_per_step_samples"]) == bench.QUICK["repeats"]
        assert r["peak_memory_mib"] is None  # not measured on CPU
        assert r["images_per_s"] == pytest.approx(r["images_per_step"] * 1000 / r["ms_per_step"])
    for name, r in rows.items():  # closure calls (forward/backward) + the optimizer's own work = the step
        assert r["passes_per_step"] == (1 if name == "sgd" else 2)
        assert 0 < r["closure_ms_per_step"] < r["ms_per_step"]
        assert r["other_ms_per_step"] == pytest.approx(r["ms_per_step"] - r["closure_ms_per_step"])
    assert rows["sgd"]["ratio_to_sgd"] == 1.0 and rows["sgd"]["ratio_to_sgd_paired"] == 1.0
    assert all(_positive(r["ratio_to_sgd_paired"]) for r in rows.values())
    assert rows["rwp"]["batches_per_step"] == 2 and rows["rwp"]["images_per_step"] == 16
    assert rows["amp"]["batches_per_step"] == 1
    # two forward/backward passes per step: twice SGD's FLOPs
    for name in ("amp", "rwp", "sam", "asam"):
        assert rows[name]["flop_per_step"] == 2 * rows["sgd"]["flop_per_step"]
    assert _positive(report["pipeline"]["images_per_s"]) and report["pipeline"]["augment"]["cutout"]
    assert _positive(report["eval"]["images_per_s"]) and report["eval"]["batch_size"] == 32
    assert report["sync_check"] == {n: "n/a (no CUDA)" for n in bench.BENCH_OPTIMIZERS}
    assert set(report["other_cpu_cores"]) == {"train", "pipeline", "eval"}
    for name, ops in report["profile"].items():  # top 3 operators + the closure and step labels
        labels = {op["name"] for op in ops}
        assert "bench.closure" in labels and "Optimizer.step#SGD.step" in labels, (name, labels)
        assert all(op["calls"] >= 1 and op["total_ms"] >= op["self_ms"] >= 0 for op in ops)
    assert [op["calls"] for op in report["profile"]["amp"] if op["name"] == "bench.closure"] == [2]

    assert "| optimizer | batches/step | passes/step | ms/step | in passes | rest | images/s | ratio to SGD | paired |" in printed
    for name in bench.BENCH_OPTIMIZERS:
        assert f"| {name} | " in printed
    assert "| pipeline (augmented, train batches) | 8 |" in printed
    assert "| evaluation (forward, eval mode) | 32 |" in printed
    assert "profile of one amp step" in printed


def test_defaults_and_config_file():
    args, cfg = bench.parse_args([])
    assert (cfg.model, cfg.batch_size, cfg.cutout) == ("wrn16_2", 32, True)
    bench.resolve_counts(args, "cpu")
    assert args.optimizers == ["sgd", "amp", "rwp", "sam"] and args.steps == bench.DEFAULTS["cpu"]["steps"]
    args, _ = bench.parse_args(["--steps", "7"])
    bench.resolve_counts(args, "cuda")
    assert (args.steps, args.repeats) == (7, bench.DEFAULTS["cuda"]["repeats"])
    # a config file decides (no bench defaults); flags still override it
    path = os.path.join(ROOT, "configs/amp/tableA_cifar10_preactresnet18_amp.yaml")
    args, cfg = bench.parse_args(["--config", path, "--batch_size", "16", "--quick"])
    assert (cfg.model, cfg.dataset, cfg.batch_size, cfg.cutout) == ("preactresnet18", "cifar10", 16, False)
    assert args.steps == bench.QUICK["steps"]


@pytest.mark.parametrize("argv", [
    ["--optimizers", "adam"], ["--steps", "0"], ["--model", "nope"], ["--bogus", "1"],
    ["--optimizer", "sgd"], ["--precision", "fp8"], ["--optimizers", "sgd", "sgd"],
    ["--json", "/nonexistent/dir/x.json"], ["--batch_size", "-1"], ["--json", "."], ["--json", "tests/"],
    pytest.param(["--json", "/proc/x.json"], marks=pytest.mark.skipif(not os.path.isdir("/proc"), reason="no /proc")),
])
def test_bad_arguments_one_line_exit_2(argv, capsys, monkeypatch):
    for name in ("bench_train", "bench_pipeline", "bench_eval"):  # refused before any measurement
        monkeypatch.setattr(bench, name, lambda *a, name=name: pytest.fail(f"{name} ran before the checks"))
    assert bench.main_cli(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench.py: error: "), captured.err


@pytest.mark.parametrize("flag, hint", [
    ("--stepz", "--steps"), ("--warmpu", "--warmup"), ("--optimizerz", "--optimizers"), ("--jsno", "--json"),
    ("--batch_sise", "--batch_size"), ("--confg", "--config"),
])
def test_typo_suggests_a_flag_of_bench_or_config(flag, hint, capsys):
    assert bench.main_cli([flag, "3"]) == 2
    assert capsys.readouterr().err == f"bench.py: error: unrecognized arguments: {flag} 3 (did you mean {hint}?)\n"


def test_command_line_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--repeats", "0"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["bench.py: error: --repeats: 0 must be >= 1"]
