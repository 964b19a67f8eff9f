"""Run records: the run folder, atomic writes, checkpoints on disk, log lines, summary.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from runner.config import FIELDS, RESUME_MAY_CHANGE, Config, UsageError, _coerce, _validate


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=os.path.dirname(os.path.abspath(__file__)),
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + (" (modified)" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def atomic_write(path: str, write):
    """write(file) to a temporary file, fsync, then rename over `path`: readers (and a resume after
    a crash or SIGKILL at any moment) see the old file or the new one, never a half-written one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str):
    atomic_write(path, lambda f: f.write(text.encode()))


def output_problem(path: str):
    """Why a file could not be written at `path` (a folder; a missing or unwritable folder), or None.
    Writability is tried by creating a temporary file there (os.access passes for root even in /proc)."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return f"folder {folder!r} does not exist"
    if os.path.isdir(path):
        return f"{path!r} is a folder, not a file"
    if not os.path.basename(path):
        return f"{path!r} names no file"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        return f"folder {folder!r} is not writable"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return f"{path!r} is not writable"
    return None


def make_run_dir(cfg: Config) -> str:
    """Create a new run folder; never reuse one (name, name-1, name-2, ... — atomic mkdir)."""
    base = cfg.name or f"{cfg.dataset}_{cfg.model}_{cfg.optimizer}_s{cfg.seed}"
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"out_dir: cannot create {cfg.out_dir!r} ({e.strerror})") from None
    if not os.access(cfg.out_dir, os.W_OK):
        raise UsageError(f"out_dir: {cfg.out_dir!r} is not writable; choose another with --out_dir")
    for i in range(1000):
        path = os.path.join(cfg.out_dir, base if i == 0 else f"{base}-{i}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
        except OSError as e:
            raise UsageError(f"out_dir: cannot create {path!r} ({e.strerror})") from None
    raise UsageError(f"name: too many runs named {base!r} in {cfg.out_dir!r}")


def load_checkpoint(path: str):
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or not a plain-data checkpoint
        raise UsageError(f"resume: cannot load {path} ({type(e).__name__}); it is corrupt or not ours") from None


def check_checkpoint(ckpt, path) -> Config:
    """The saved Config of a loaded checkpoint, after checking that the checkpoint has every part
    in the form this runner writes (a foreign or edited file is one clear UsageError)."""
    import torch
    foreign = UsageError(f"resume: {path} is not a checkpoint of this runner (or it was edited)")
    parts = {"epoch", "config", "model", "optimizer", "scheduler", "rng", "history"}
    if not isinstance(ckpt, dict) or not parts <= ckpt.keys() or not isinstance(ckpt["config"], dict):
        raise foreign
    try:
        saved = Config(**{k: _coerce(k, v) for k, v in ckpt["config"].items() if k in FIELDS})
        _validate(saved)
    except (UsageError, TypeError) as e:
        raise UsageError(f"resume: the config saved in {path} is invalid ({e})") from None
    number = (int, float)
    history, epoch = ckpt["history"], ckpt["epoch"]
    rows_ok = isinstance(history, list) and all(
        isinstance(r, dict) and isinstance(r.get("epoch_time_s"), number) and isinstance(r.get("train_loss"), number)
        and isinstance(r.get("test_error"), (*number, type(None))) and isinstance(r.get("images", 0), number)
        for r in history)
    if not (type(epoch) is int and 0 <= epoch <= saved.epochs and rows_ok and len(history) == epoch
            and all(isinstance(ckpt[k], dict) for k in ("model", "optimizer", "scheduler", "rng"))
            and torch.is_tensor(ckpt["rng"].get("cpu")) and ckpt["rng"]["cpu"].dtype == torch.uint8
            and isinstance(ckpt.get("wall_time_s", 0.0), number)):
        raise foreign
    return saved


def resume_config(cfg: Config, explicit: set):
    """The saved Config of run folder cfg.resume; explicit settings must agree with it."""
    run_dir = cfg.resume
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isdir(run_dir):
        raise UsageError(f"resume: {run_dir!r} is not a run folder")
    if not os.path.isfile(ckpt_path):
        raise UsageError(f"resume: {run_dir!r} has no checkpoint.pt (nothing to resume; start a new run)")
    ckpt = load_checkpoint(ckpt_path)
    saved = check_checkpoint(ckpt, ckpt_path)
    for name in sorted(explicit - RESUME_MAY_CHANGE):
        if getattr(saved, name) != getattr(cfg, name):
            raise UsageError(f"resume: {run_dir} was run with {name}={getattr(saved, name)!r}, not "
                             f"{getattr(cfg, name)!r}; drop that setting or start a new run")
    for name in RESUME_MAY_CHANGE & explicit:
        setattr(saved, name, getattr(cfg, name))
    saved.resume = run_dir
    return saved, ckpt, run_dir


def finished(run_dir) -> bool:
    """Whether the run folder's summary.json says the run completed (it is written last: a run
    killed after its final checkpoint but before the summary is not finished)."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f).get("status") == "completed"
    except (OSError, ValueError, AttributeError):
        return False


def write_summary(run_dir, cfg, history, status, message, train_time, images, wall, **extra):
    tested = [r for r in history if r["test_error"] is not None]
    best = min(tested, key=lambda r: r["test_error"]) if tested else None
    summary = {
        "status": status, "message": message,
        "final_test_error": tested[-1]["test_error"] if tested else None,
        "best_test_error": best["test_error"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "epochs_completed": len(history), "epochs": cfg.epochs,
        "wall_time_s": round(wall, 3), "train_time_s": round(train_time, 3),
        "images_per_s": round(images / train_time, 1) if train_time > 0 else None,
        "paper_ref": cfg.paper_ref, "paper_error": cfg.paper_error, "paper_spread": cfg.paper_spread,
        **extra,  # data_read_from: the data folder actually read
    }
    write_text(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")


class RunLog:
    """Human lines to stdout and log.txt, one JSON row per epoch to metrics.jsonl (rank 0 only)."""

    def __init__(self, run_dir, active):
        self.run_dir, self.active = run_dir, active

    def line(self, text, err=False):
        if not self.active:
            return
        from tqdm import tqdm
        stream = sys.stderr if err else sys.stdout
        with tqdm.external_write_mode(file=stream):  # above a progress bar, never on its line
            print(text, file=stream, flush=True)
        with open(os.path.join(self.run_dir, "log.txt"), "a") as f:
            f.write(text + "\n")

    def metrics(self, row):
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
