"""recipes/gpu_visit.sh --cpu --tiny: every step of the GPU visit runs end to end and writes
well-formed results; a step that fails or runs past its time share is recorded and the rest go on."""
import gzip
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from runner import gpu_visit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "recipes", "gpu_visit.sh")


def _fashion(root):
    """A small Fashion-MNIST in the Debian package's layout (flat idx .gz files): 256 + 64 images."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 256), ("t10k", 64)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))), ("labels-idx1", rng.integers(0, 10, n))):
            header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
            with gzip.open(os.path.join(root, f"{prefix}-{kind}-ubyte.gz"), "wb") as f:
                f.write(header + array.astype(np.uint8).tobytes())
    return str(root)


def _visit(out, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    return subprocess.run(["bash", SCRIPT, str(out), "--cpu", "--tiny", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=1500)


@pytest.fixture(scope="module")
def visit(tmp_path_factory):
    data = _fashion(tmp_path_factory.mktemp("fashion"))
    out = tmp_path_factory.mktemp("visit") / "out"
    proc = _visit(out, "--data_dir", data)
    return proc, out


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_every_step_runs_and_writes_well_formed_results(visit):
    proc, out = visit
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((out / "results.json").read_text())
    steps = {s["step"]: s for s in results["steps"]}
    assert list(steps) == list(gpu_visit.STEPS)
    for s in steps.values():
        assert s["status"] == "ok" and s["exit_code"] == 0 and 0 < s["seconds"] <= s["share_s"], s
        assert s["items"] and all(i["exit_code"] == 0 and i["figures"] for i in s["items"]), s["step"]
    visit_ = results["visit"]
    assert visit_["torch"] == torch.__version__ and visit_["commit"] and _positive(visit_["tflops"])
    assert set(visit_["flatness_modules"]) == {"scipy"}
    assert visit_["command"].startswith(f"bash recipes/gpu_visit.sh {out} --cpu --tiny --data_dir ")

    args = gpu_visit._args(["bench", str(out), "--cpu", "--tiny"])
    assert [i["label"] for i in steps["bench"]["items"]] == [label for label, _ in gpu_visit.bench_plan(args)]
    for item in steps["bench"]["items"]:
        rows = item["figures"]["train"]
        assert [r["optimizer"] for r in rows] == list(gpu_visit.OPTIMIZERS)
        for r in rows:
            assert all(_positive(r[k]) for k in ("ms_per_step", "images_per_s", "ratio_to_sgd", "achieved_tflops"))
            assert r["fraction_of_bf16_peak"] == pytest.approx(r["achieved_tflops"] / 790)
        assert rows[0]["ratio_to_sgd"] == 1.0
    sync, pipeline, decode = (i["figures"] for i in steps["sync_pipeline"]["items"])
    assert sync["sync_check"] == {n: "n/a (no CUDA)" for n in ("sgd", "amp", "rwp", "sam", "asam")}
    assert _positive(sync["pipeline_images_per_s"]) and _positive(pipeline["pipeline_images_per_s"])
    assert pipeline["train"] == []
    assert _positive(decode["cpu_workers"]["images_per_s"]) and decode["cpu_workers"]["workers"] >= 1
    assert all(_positive(v) for v in decode["device_decode"].values())
    assert [i["label"] for i in steps["train"]["items"]] == [f"fm_{n}" for n in gpu_visit.OPTIMIZERS]
    for item in steps["train"]["items"]:
        f = item["figures"]
        assert f["status"] == "completed" and len(f["epoch_time_s"]) == 2
        assert all(_positive(t) for t in f["epoch_time_s"]) and all(0 <= e <= 100 for e in f["test_error"])
    (run,) = steps["flatness"]["items"][0]["figures"]["runs"]
    assert run["run_dir"].endswith("fm_amp") and math.isfinite(run["hessian_top_eigenvalues"][0])
    assert _positive(run["hessian_eig_time_s"]) and _positive(run["hessian_trace_time_s"])
    assert run["hessian_trace_low"] <= run["hessian_trace"] <= run["hessian_trace_high"]
    hvp = steps["flatness"]["items"][1]
    assert hvp["label"] == "hvp" and hvp["figures"]["model"] == "small_cnn"
    assert {"graph", "recompute"} <= set(hvp["figures"]["methods"])
    assert all(_positive(m["ms"]) and m["difference"] < 1e-5 for m in hvp["figures"]["methods"].values())

    table = (out / "results.md").read_text().splitlines()
    start = table.index("| step | item | result | status | s (share) |")
    rows = table[start + 2:]
    assert all(line.startswith("| ") and line.count(" | ") == 4 for line in rows), rows
    for s in steps.values():
        assert f"| {s['title']} | (the step) | {len(s['items'])} item(s) | **ok** (exit 0) |" in "\n".join(rows)
    for label in ("wrn10_1_b8_fp32 amp", "sync_check_pipeline_b4 no host sync", "jpeg_decode", "fm_rwp",
                  "flatness fm_amp", "hvp graph", "hvp recompute"):
        assert any(f" | {label} | " in line for line in rows), label


def test_failed_and_timed_out_steps_are_recorded_and_the_rest_run(tmp_path):
    data = _fashion(tmp_path)
    out = tmp_path / "out"
    proc = _visit(out, "--data_dir", data, "--steps", "train,flatness", "--share", "train=1")
    assert proc.returncode == 1
    steps = {s["step"]: s for s in json.loads((out / "results.json").read_text())["steps"]}
    assert steps["train"]["status"] == "timed out" and steps["train"]["exit_code"] in (124, 137)
    assert steps["flatness"]["status"] == "failed"  # it ran: no trained run to analyse
    assert steps["flatness"]["items"][0]["figures"] == {"note": "no Fashion-MNIST run of step 4 finished"}
    assert steps["flatness"]["items"][1]["exit_code"] == 0  # the product's benchmark needs no trained run
    assert all(steps[s]["status"] == "not run" for s in ("env", "bench", "sync_pipeline"))
    assert "| 4 Fashion-MNIST 2 epochs | (the step) |" in (out / "results.md").read_text()
    assert "--share train=1" in (out / "command.txt").read_text()


@pytest.mark.parametrize("args, message", [
    ([], "OUT_DIR is required"), (["x", "--share", "bench=0"], "--share bench=0"),
    (["x", "--steps", "env,nope"], "--steps: nope"), (["x", "--gpu"], "unknown argument --gpu"),
    (["x", "--data_dir"], "--data_dir needs a value"),
])
def test_bad_arguments_one_line_exit_2(args, message, tmp_path):
    proc = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_visit.sh: error: ") and message in lines[0]
    assert not (tmp_path / "x").exists()


def test_gpu_plan_parses(tmp_path, monkeypatch):
    """The GPU mode's commands (not runnable here) are valid bench.py, main.py and flatness.py arguments."""
    import bench
    import flatness
    from runner import bench_decode
    from runner.config import parse_config
    monkeypatch.chdir(ROOT)
    a = gpu_visit._args(["bench", str(tmp_path), "--data_dir", str(tmp_path)])
    plan = gpu_visit.bench_plan(a) + gpu_visit.sync_pipeline_plan(a)
    assert [label for label, _ in plan] == [
        "wrn28_10_b128_bf16_cl", "preactresnet18_b50_bf16_cl", "wrn28_10_b128_fp32", "wrn28_10_b128_bf16",
        "preactresnet18_b50_fp32", "preactresnet18_b50_bf16_cl_compile", "wrn28_10_b128_bf16_cl_compile",
        "sync_check_pipeline_b50", "pipeline_b128", "jpeg_decode"]
    for label, argv in plan:
        assert argv[argv.index("--device") + 1] == "cuda", label
        if argv[0] == "jpeg_decode":
            bench_decode._check(bench_decode._parser().parse_args(argv[1:]))
            continue
        args, cfg = bench.parse_args(argv)
        assert args.check_sync == label.startswith("sync_check") and cfg.device == "cuda"
        if args.check_sync:
            assert args.optimizers == ["sgd", "amp", "rwp", "sam", "asam"] and args.pipeline_batches > 0
        elif not label.startswith("pipeline"):  # step 2: the label says model, batch, precision, layout, compile
            assert label.startswith(f"{cfg.model}_b{cfg.batch_size}_{cfg.precision}")
            assert (cfg.compile, cfg.channels_last) == ("compile" in label, "_cl" in label), label
    for name in gpu_visit.OPTIMIZERS:
        cfg, _ = parse_config(gpu_visit.train_argv(a, name))
        assert (cfg.optimizer, cfg.model, cfg.epochs, cfg.precision, cfg.device) == (name, "sam_wrn28_10", 2, "bf16", "cuda")
    args = flatness._parser().parse_args(gpu_visit.flatness_argv(a, "run", ["curvature"]))
    assert (args.measures, args.top_k, args.device) == (["curvature"], 1, "cuda")


@pytest.mark.parametrize("argv", [["--workers", "-1"], ["--quality", "0"], ["--samples", "0"], ["--device", "tpu"],
                                  ["--json", "/nonexistent/dir/x.json"]])
def test_jpeg_decode_bad_arguments_one_line_exit_2(argv, capsys):
    import bench
    assert bench.main_cli(["jpeg_decode", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith("bench.py: error: ")
