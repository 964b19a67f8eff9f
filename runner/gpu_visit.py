"""The steps of the GPU visit (recipes/gpu_visit.sh runs each in its own process under `timeout`).

    python -m runner.gpu_visit STEP OUT_DIR [--cpu] [--tiny] [--data_dir DIR]

STEP is one of STEPS or `report`. Each step calls the project's own commands in this process
(bench.main_cli, main.main, flatness.main: one start of torch and CUDA per step) and rewrites
OUT_DIR/<step>.json after every item, so a step killed for time keeps what it finished. An item:
its label, the command it stands for, exit code, seconds, and where its figures are (a JSON file
under OUT_DIR, or inline). `report` (runner.gpu_visit_report) reads them all.

--cpu runs on the CPU (`--device cpu`), --tiny swaps every size for a tiny one (wrn10_1, batch 8,
a few steps, a 128-image Fashion-MNIST subset; fp32 only): the same items, so a CPU test runs them all.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback

STEPS = ("env", "bench", "sync_pipeline", "train", "flatness")
OPTIMIZERS = ("sgd", "amp", "rwp", "sam")                   # trained on Fashion-MNIST, timed in step 2
PEAK_MATMUL = {"cuda": 16384, "cpu": 512}                    # side of the bf16 matmul timed in `env`


def _args(argv):
    p = argparse.ArgumentParser(prog="python -m runner.gpu_visit")
    p.add_argument("step", choices=STEPS + ("report",))
    p.add_argument("out")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (default: CUDA)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: a test that every item runs")
    p.add_argument("--data_dir", default=".data/fashion-mnist", help="the Fashion-MNIST idx files")
    return p.parse_args(argv)


class Record:
    """OUT/<step>.json: the items done so far, rewritten (atomically) after each one."""

    def __init__(self, out, step):
        self.path, self.data = os.path.join(out, f"{step}.json"), {"step": step, "items": []}
        self.save()

    def save(self):
        from runner.records import write_text
        write_text(self.path, json.dumps(self.data, indent=1) + "\n")

    def item(self, label, command, fn):
        """Run fn() → (exit code, figures or None); record it even when it raises."""
        t0 = time.perf_counter()
        try:
            code, figures = fn()
            error = None
        except (Exception, SystemExit) as e:  # noqa: BLE001 (one item's failure is recorded; the step goes on)
            traceback.print_exc()  # (into the step's log)
            code, figures, error = 1, None, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        entry = dict(label=label, command=command, exit_code=code, seconds=round(time.perf_counter() - t0, 2))
        entry.update({"error": error} if error else {}, **({"figures": figures} if figures is not None else {}))
        self.data["items"].append(entry)
        self.save()
        print(f"gpu_visit: {label}: exit {code} in {entry['seconds']} s" + (f" ({error})" if error else ""), flush=True)
        return code


def _device(a):
    return "cpu" if a.cpu else "cuda"


# ----------------------------------------------------------------------------- 1: environment

def step_env(a, rec):
    def smi():
        try:
            p = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
            return p.returncode, {"nvidia_smi_L": p.stdout.strip() or p.stderr.strip()}
        except (OSError, subprocess.SubprocessError) as e:
            return (0 if a.cpu else 1), {"nvidia_smi_L": f"not run: {e}"}

    def versions():
        import importlib.util
        import platform
        import torch
        import torchvision
        from runner.bench_step import device_name
        from runner.records import git_commit
        commit = git_commit()
        if commit == "unknown":  # a copy without .git: the commit the caller names
            commit = os.environ.get("VISIT_COMMIT", "unknown")
        cuda = torch.cuda.is_available()
        found = {m: importlib.util.find_spec(m) is not None for m in ("scipy",)}  # (step 5 needs it: ARPACK)
        return 0, dict(flatness_modules=found, torch=torch.__version__, torchvision=torchvision.__version__, cuda=torch.version.cuda,
                       cudnn=torch.backends.cudnn.version() if cuda else None, cuda_available=cuda,
                       device=device_name(torch.device(_device(a))), python=platform.python_version(),
                       cpus=os.cpu_count(), commit=commit,
                       date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def matmul_peak():
        """bf16 matmul TFLOP/s: what this device's tensor cores deliver, to set the step rates beside."""
        import torch
        dev = torch.device(_device(a))
        n = PEAK_MATMUL[dev.type] // (8 if a.tiny else 1)
        x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        y = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
        from runner.bench_step import _Timer
        rates = []
        for _ in range(4):
            with _Timer(dev) as t:
                for _ in range(10):
                    x @ y
            rates.append(2 * n ** 3 * 10 / t.seconds / 1e12)
        return 0, {"n": n, "tflops": max(rates[1:]), "tflops_all": rates}

    rec.item("nvidia-smi -L", "nvidia-smi -L", smi)
    rec.item("versions", "python -c 'import torch, torchvision ...'", versions)
    rec.item("bf16 matmul", "torch.randn(n, n, dtype=bf16) @ ... (10 products, best of 3 after 1)", matmul_peak)


# ----------------------------------------------------------------------------- 2, 3: bench.py

def bench_plan(a):
    """[(label, bench.py argv)] of step 2, in order of value (compile last: it may not fit)."""
    if a.tiny:
        sizes = {"wrn28_10": ("wrn10_1", "8"), "preactresnet18": ("wrn10_1", "4")}
        counts = ["--quick", "--train_size", "64"]
    else:
        sizes = {"wrn28_10": ("wrn28_10", "128"), "preactresnet18": ("preactresnet18", "50")}
        counts = []
    plan = [("wrn28_10", "bf16", True, False, OPTIMIZERS, ["--steps", "20", "--warmup", "5", "--repeats", "3"]),
            ("preactresnet18", "bf16", True, False, OPTIMIZERS, ["--steps", "50", "--warmup", "10", "--repeats", "3"]),
            ("wrn28_10", "fp32", False, False, OPTIMIZERS, ["--steps", "10", "--warmup", "3", "--repeats", "2"]),
            ("wrn28_10", "bf16", False, False, OPTIMIZERS, ["--steps", "20", "--warmup", "5", "--repeats", "2"]),
            ("preactresnet18", "fp32", False, False, OPTIMIZERS, ["--steps", "50", "--warmup", "10", "--repeats", "2"]),
            ("preactresnet18", "bf16", True, True, ("sgd", "amp"), ["--steps", "50", "--warmup", "10", "--repeats", "3"]),
            ("wrn28_10", "bf16", True, True, ("sgd", "amp"), ["--steps", "20", "--warmup", "5", "--repeats", "3"])]
    out = []
    for role, precision, cl, comp, opts, steps in plan:
        if a.tiny and (comp or precision != "fp32"):  # (CPU: compiling takes minutes, bf16 is slow here)
            continue
        model, batch = sizes[role]
        label = f"{model}_b{batch}_{precision}" + ("_cl" if cl else "") + ("_compile" if comp else "")
        argv = ["--device", _device(a), "--model", model, "--batch_size", batch, "--precision", precision,
                *(["--channels_last"] if cl else []), *(["--compile"] if comp else []),
                "--optimizers", *opts, "--pipeline_batches", "0", "--eval_batches", "0",
                *(counts if a.tiny else steps)]
        out.append((label, argv))
    return out


def sync_pipeline_plan(a):
    """[(label, bench.py argv)] of step 3: the sync check of every optimizer (+ the CIFAR pipeline and
    evaluation at batch 50), the pipeline alone at batch 128, JPEG decoding CPU workers vs device."""
    dev = ["--device", _device(a)]
    if a.tiny:
        model, b50, b128 = ["--model", "wrn10_1", "--train_size", "64", "--quick", "--precision", "fp32"], "4", "8"
        counts, pipe = [], ["--pipeline_batches", "2"]
        decode = ["--images", "4", "--samples", "16", "--width", "64", "--height", "48", "--image_size", "32",
                  "--batch_size", "4", "--workers", "2", "--passes", "1"]
    else:
        model, b50, b128 = ["--model", "preactresnet18", "--precision", "bf16", "--channels_last"], "50", "128"
        counts, pipe = ["--steps", "5", "--warmup", "2", "--repeats", "1", "--eval_batches", "5"], ["--pipeline_batches", "500"]
        decode = ["--images", "256", "--samples", "4096", "--batch_size", "128", "--workers", "16", "--passes", "2"]
    return [("sync_check_pipeline_b" + b50, [*dev, *model, "--batch_size", b50, "--optimizers", "sgd", "amp", "rwp",
                                             "sam", "asam", "--check_sync", *counts, *pipe]),
            ("pipeline_b" + b128, [*dev, *model, "--batch_size", b128, "--optimizers", "--eval_batches", "0", *pipe]),
            ("jpeg_decode", ["jpeg_decode", *dev, *decode])]


def _bench_items(a, rec, plan):
    import bench
    os.makedirs(os.path.join(a.out, "bench"), exist_ok=True)
    for label, argv in plan:
        path = os.path.join("bench", f"{label}.json")
        argv = argv + ["--json", os.path.join(a.out, path)]
        rec.item(label, "python bench.py " + " ".join(argv), lambda argv=argv, path=path: (bench.main_cli(argv),
                                                                                         {"json": path}))


def step_bench(a, rec):
    _bench_items(a, rec, bench_plan(a))


def step_sync_pipeline(a, rec):
    _bench_items(a, rec, sync_pipeline_plan(a))


# ----------------------------------------------------------------------------- 4: Fashion-MNIST

def train_argv(a, name):
    sizes = (["--model", "wrn10_1", "--train_size", "128", "--test_size", "64", "--batch_size", "32",
              "--eval_batch_size", "64", "--lr_updates_per_epoch", "4"] if a.tiny
             else ["--precision", "bf16", "--channels_last"])
    return ["--config", f"configs/fashionmnist/wrn28_10_basic_{name}.yaml", "--epochs", "2", "--device", _device(a),
            "--data_dir", a.data_dir, "--out_dir", os.path.join(a.out, "runs"), "--name", f"fm_{name}",
            "--on_existing", "resume", "--progress_every", "0", *sizes]  # (a rerun continues or keeps the run)


def step_train(a, rec):
    import main
    for name in OPTIMIZERS:
        argv = train_argv(a, name)

        def run(argv=argv, name=name):
            code = main.main(argv)
            run_dir = os.path.join(a.out, "runs", f"fm_{name}")
            return code, {"run_dir": os.path.relpath(run_dir, a.out)} if os.path.isdir(run_dir) else None

        code = rec.item(f"fm_{name}", "python main.py " + " ".join(argv), run)
        for sig in (signal.SIGINT, signal.SIGTERM):  # main.py's graceful stop is for its own run
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # stopped by the visit's time limit
            break


# ----------------------------------------------------------------------------- 5: flatness

def flatness_argv(a, run_dir, measures):
    sizes = (["--samples", "16", "--trace_matvecs", "2", "--eig_tol", "0.1"] if a.tiny
             else ["--samples", "512", "--trace_matvecs", "10", "--eig_tol", "1e-2"])
    out = os.path.join(a.out, "flatness")
    return [run_dir, "--measures", *measures, "--top_k", "1", *sizes, "--device", _device(a),
            "--data_dir", a.data_dir, "--out", out, "--json", os.path.join(out, "rows.json")]


def hvp_argv(a):
    """bench.py flatness: our Hessian-vector products (and PyHessian's, where it is installed)."""
    sizes = (["--model", "small_cnn", "--samples", "8", "--batch_size", "4", "--repeats", "1"] if a.tiny
             else ["--model", "wrn16_4", "--samples", "1024", "--batch_size", "256", "--repeats", "5"])
    try:
        import pyhessian  # noqa: F401
        sizes.append("--pyhessian")
    except ImportError:
        pass
    return ["flatness", *sizes, "--device", _device(a), "--json", os.path.join(a.out, "flatness", "hvp.json")]


def step_flatness(a, rec):
    """Hessian top eigenvalue and trace of the AMP run (else the first run that finished), then the
    Hessian-vector product's time and memory (bench.py flatness)."""
    import bench
    import flatness
    runs = [os.path.join(a.out, "runs", f"fm_{n}") for n in ("amp",) + tuple(o for o in OPTIMIZERS if o != "amp")]
    done = [r for r in runs if _completed(r)]
    if not done:
        rec.item("flatness", "python flatness.py RUN", lambda: (1, {"note": "no Fashion-MNIST run of step 4 finished"}))
    else:
        try:
            import scipy  # noqa: F401
            measures, note = ["curvature"], None
        except ImportError as e:
            measures, note = ["sharpness"], f"curvature not measured: {e} (pip install scipy)"
        argv = flatness_argv(a, done[0], measures)
        rows = os.path.join("flatness", "rows.json")

        def run():
            code = flatness.main(argv)  # without the curvature (what this step is for) the item fails
            return (code if note is None else max(code, 1)), {"json": rows, **({"note": note} if note else {})}
        rec.item("flatness", "python flatness.py " + " ".join(argv), run)
    argv = hvp_argv(a)
    os.makedirs(os.path.join(a.out, "flatness"), exist_ok=True)
    rec.item("hvp", "python bench.py " + " ".join(argv),
             lambda: (bench.main_cli(argv), {"json": os.path.join("flatness", "hvp.json")}))


def _completed(run_dir):
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f).get("status") == "completed"
    except (OSError, ValueError):
        return False


def main(argv=None):
    a = _args(sys.argv[1:] if argv is None else argv)
    os.makedirs(a.out, exist_ok=True)
    if a.step == "report":
        from runner.gpu_visit_report import write_report
        return write_report(a.out)
    rec = Record(a.out, a.step)
    {"env": step_env, "bench": step_bench, "sync_pipeline": step_sync_pipeline, "train": step_train,
     "flatness": step_flatness}[a.step](a, rec)
    return 0 if all(i["exit_code"] == 0 for i in rec.data["items"]) else 1


if __name__ == "__main__":
    sys.exit(main())
