"""The pinned run: README's quick-start command, shrunk to seconds, whose metrics are pinned in
tests/pinned_run.json, so that a change that moves the quick start's numbers is noticed
(tests/test_pinned.py compares them).

    python tests/pinned_run.py            # run it and compare with the pin (exit 1 if it moved)
    python tests/pinned_run.py --update   # run it and write the pin (a change meant to move it)

A change that moves the pin moves the quick start's figure too: regenerate the pin and re-measure
README's quick-start number in the same commit.

The flags are the quick start's except the sizes (256 training and 256 test images instead of
10,000 and 10,000: two epochs of 4 steps, a few seconds on one core). On a CPU the run is deterministic, but its floating-point
rounding depends on the torch version, the number of intra-op threads and the instruction set of
the kernels (README "Quick start"), so the run is made in a child process with those fixed:
one thread, and ATen's and oneDNN's kernels limited to AVX2 (ENV below); the torch version and the
CPU capability seen are recorded in the pin.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIN = os.path.join(ROOT, "tests", "pinned_run.json")
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
QUICK_START = ["--dataset", "fashionmnist", "--model", "wrn10_2", "--optimizer", "amp", "--epochs", "2",
               "--batch_size", "64", "--lr", "0.1", "--schedule", "cosine", "--no-augment", "--weight_decay", "5e-4"]
ARGS = QUICK_START + ["--train_size", "256", "--test_size", "256", "--data_dir", FASHION_DIR]
# what the rounding depends on, fixed for the child process (read by torch when it loads)
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2",
       "ONEDNN_MAX_CPU_ISA": "AVX2"}
METRICS = ("train_loss", "train_error", "test_loss", "test_error")


def run(args=ARGS, env=ENV) -> dict:
    """Run main.py with `args` under `env` in a child process; returns {'metrics': one dict per
    epoch (METRICS), 'environment': the torch version, CPU capability and threads it ran with}."""
    with tempfile.TemporaryDirectory() as out:
        seen = os.path.join(out, "environment.json")
        child = (f"import json, runpy, sys, torch\n"  # records what torch sees, then runs main.py as a script
                 f"json.dump({{'torch': torch.__version__, 'cpu_capability': torch.backends.cpu.get_cpu_capability(), "
                 f"'threads': torch.get_num_threads()}}, open({seen!r}, 'w'))\n"
                 f"sys.argv = ['main.py', *{list(args)!r}, '--out_dir', {out!r}, '--name', 'pinned', '--device', 'cpu']\n"
                 f"runpy.run_path({os.path.join(ROOT, 'main.py')!r}, run_name='__main__')\n")
        done = subprocess.run([sys.executable, "-c", child], env={**os.environ, **env, "PYTHONPATH": ROOT},
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"main.py exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        with open(os.path.join(out, "pinned", "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        with open(seen) as f:
            environment = json.load(f)
    return {"metrics": [{k: row[k] for k in ("epoch", *METRICS)} for row in rows], "environment": environment}


def differences(pinned: dict, got: dict) -> list:
    """Lines naming each metric that differs from the pin (exact comparison: the run is
    deterministic), then how the environment differs from the pin's, if it does."""
    lines = [f"epoch {p['epoch']} {k}: pinned {p[k]!r}, got {g[k]!r}"
             for p, g in zip(pinned["metrics"], got["metrics"]) for k in METRICS if p[k] != g[k]]
    if len(pinned["metrics"]) != len(got["metrics"]):
        lines.append(f"epochs: pinned {len(pinned['metrics'])}, got {len(got['metrics'])}")
    if lines:
        lines += [f"environment {k}: pinned {pinned['environment'].get(k)!r}, here {v!r}"
                  for k, v in got["environment"].items() if pinned["environment"].get(k) != v]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="write the run's metrics to the pin")
    a = parser.parse_args(argv)
    got = run()
    if a.update:
        pin = {"command": " ".join(f"{k}={v}" for k, v in ENV.items()) + " python main.py " + " ".join(ARGS),
               **got}
        with open(PIN, "w") as f:
            json.dump(pin, f, indent=1)
            f.write("\n")
        print(f"wrote {os.path.relpath(PIN)}: {got['metrics'][-1]}")
        return 0
    with open(PIN) as f:
        diff = differences(json.load(f), got)
    print("\n".join(diff) if diff else f"the pinned run's metrics equal {os.path.relpath(PIN)}")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
