"""Run records: the run folder, atomic writes, checkpoints on disk, log lines, summary.json."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from runner import rundir
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
    rundir.check_held(os.path.dirname(path))  # (a run folder whose lock this process lost: LockLost)
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


def check_output(flag: str, path: str):
    """UsageError "FLAG: why" when no file can be written at `path` (see output_problem)."""
    problem = output_problem(path)
    if problem:
        raise UsageError(f"{flag}: {problem}")


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


class WriteFailed(OSError):
    """An output file could not be written (disk full, quota, ...); str() is one line naming it."""

    def __str__(self):
        return f"cannot write {self.filename}: {self.strerror}"


def save_file(path: str, write):
    """write(file) into a new text file at `path` (in place, not atomic: `path` may be /dev/stdout);
    if that fails, a half-written regular file is removed and WriteFailed is raised."""
    try:
        with open(path, "w", newline="") as f:
            write(f)
    except OSError as e:
        if os.path.isfile(path):
            os.remove(path)
        raise WriteFailed(e.errno, e.strerror, path) from None


def save_json(path: str, data):
    save_file(path, lambda f: f.write(json.dumps(data, indent=2) + "\n"))


def load_checkpoint(path: str, prefix: str = ""):
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or not a plain-data checkpoint
        raise UsageError(f"{prefix}cannot load {path} ({type(e).__name__}); it is corrupt or not ours") from None


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
        _validate(saved, new=False)
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
            and isinstance(ckpt.get("wall_time_s", 0.0), number)
            and type(ckpt.get("world_size", 1)) is int and ckpt.get("world_size", 1) >= 1
            and isinstance(ckpt.get("data", {}), dict)):
        raise foreign
    return saved


# Fields that name a run rather than what it computes (a recipe's row compares the rest).
NAMING = {"name", "out_dir", "resume", "on_existing", "paper_ref", "paper_error", "paper_spread", "paper_nll"}


def read_checkpoint(run_dir: str, prefix: str = "", missing: str = " (the run saved nothing yet)"):
    """(checkpoint dict, its Config) of run folder `run_dir`, checked; else UsageError, one line."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.isdir(run_dir):
        raise UsageError(f"{prefix}{run_dir!r} is not a run folder")
    if not os.path.isfile(path):
        raise UsageError(f"{prefix}{run_dir!r} has no checkpoint.pt{missing}")
    ckpt = load_checkpoint(path, prefix)
    return ckpt, check_checkpoint(ckpt, path)


def resume_config(cfg: Config, explicit: set, run_dir: str, whole: bool = False):
    """(saved Config, checkpoint, message or None) of run folder `run_dir`; the message says why
    there is nothing to do (the run finished; with `whole`, also: it diverged). The settings given
    now must agree with the saved ones: the explicit ones (`--resume DIR --lr 0.1`), or with `whole`
    every setting (a recipe's row: `--on_existing resume`). A run to continue must be continued by
    the process count that trained it, and the folder's config.yaml must still say what ran."""
    ckpt, saved = read_checkpoint(run_dir, "resume: ", " (nothing to resume; start a new run)")
    if whole:
        differ = [f"{k}={getattr(saved, k)!r} there, {getattr(cfg, k)!r} here" for k in FIELDS
                  if k not in RESUME_MAY_CHANGE | NAMING and getattr(saved, k) != getattr(cfg, k)]
        if differ:
            raise UsageError(f"{run_dir} holds a run with other settings ({'; '.join(differ)}), so it is not "
                             f"this run's result; nothing was run into it: move it away (or use another "
                             f"--out_dir) to run these settings")
    else:
        for name in sorted(explicit - RESUME_MAY_CHANGE):
            if getattr(saved, name) != getattr(cfg, name):
                raise UsageError(f"resume: {run_dir} was run with {name}={getattr(saved, name)!r}, not "
                                 f"{getattr(cfg, name)!r}; drop that setting or start a new run")
    for name in RESUME_MAY_CHANGE & explicit:
        setattr(saved, name, getattr(cfg, name))
    saved.resume = run_dir
    if ckpt["epoch"] == saved.epochs and "partial" not in ckpt and rundir.finished(run_dir):
        return saved, ckpt, f"{run_dir} has finished all {saved.epochs} epochs; nothing to resume (its records are unchanged)"
    if whole and rundir.finished(run_dir, "diverged"):
        return saved, ckpt, f"{run_dir} diverged (see its summary.json); skipped, it would diverge again"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if ckpt.get("world_size", world) != world:
        n = ckpt["world_size"]
        how = f"torchrun --nproc_per_node {n} main.py" if n > 1 else "python main.py"
        raise UsageError(f"resume: {run_dir} was trained by {n} process(es) and continues only with {n} "
                         f"(the global batch and RWP's mode depend on it): {how} --resume {run_dir}")
    check_config_file(run_dir, saved)
    return saved, ckpt, None


def check_config_file(run_dir, saved: Config, resume: bool = True):
    """The folder's config.yaml must agree with the checkpoint's config (what ran, what a resume
    continues and what --evaluate, flatness.py and load_run report on): a checkpoint copied from
    another run, or an edited config.yaml, is one UsageError. A missing or unreadable config.yaml
    is not checked (a resume rewrites it)."""
    import yaml
    from runner.config import _unique_key_loader, shown
    try:
        with open(os.path.join(run_dir, "config.yaml"), "rb") as f:
            data = yaml.load(f, Loader=_unique_key_loader())
    except (OSError, yaml.YAMLError, UsageError):
        return
    if not isinstance(data, dict):
        return
    for k, v in data.items():
        if k in FIELDS and k not in RESUME_MAY_CHANGE | NAMING:
            if v is None and getattr(saved, k) in ("", []):  # `key:` (empty) for '' or []
                continue
            try:
                same = _coerce(k, v) == getattr(saved, k)
            except UsageError:
                same = False
            if same:
                continue
            if resume:
                raise UsageError(f"resume: {run_dir}/config.yaml was edited ({k}: {shown(v)} there, {shown(getattr(saved, k))} "
                                 f"in checkpoint.pt, which is what ran and what a resume continues); undo the edit, "
                                 f"or start a new run with that setting")
            plain = [x[:80] if isinstance(x, str) else shown(x) for x in (getattr(saved, k), v)]
            raise UsageError(f"{run_dir}/checkpoint.pt is not the run its config.yaml describes (checkpoint.pt is of "
                             f"{k} {plain[0]}, but config.yaml says {plain[1]}): copied from another run, or "
                             f"config.yaml was edited")


def write_summary(run_dir, cfg, history, status, message, train_time, images, wall, world=1, rwp_mode=None, **extra):
    """summary.json: status (completed, diverged, interrupted, failed), final and best test error,
    time, how the run was launched (process count; RWP's parallel or sequential mode), and `extra`
    (data_read_from: the data folder actually read)."""
    tested = [r for r in history if r["test_error"] is not None]
    best = min(tested, key=lambda r: r["test_error"]) if tested else None
    top5 = [r["test_error_top5"] for r in tested if r.get("test_error_top5") is not None]
    summary = {
        "status": status, "message": message,
        "final_test_error": tested[-1]["test_error"] if tested else None,
        "best_test_error": best["test_error"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        # top-5 error % (null where the rows have none: runs from before it was recorded): last and lowest
        "final_test_error_top5": tested[-1].get("test_error_top5") if tested else None,
        "best_test_error_top5": min(top5) if top5 else None,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        # test NLL and the training criterion's test loss (smoothing, flooding) after the last evaluation
        "final_test_nll": tested[-1]["test_loss"] if tested else None,
        "final_test_criterion_loss": tested[-1].get("test_criterion_loss") if tested else None,
        "epochs_completed": len(history), "epochs": cfg.epochs,
        "wall_time_s": round(wall, 3), "train_time_s": round(train_time, 3),
        "images_per_s": round(images / train_time, 1) if train_time > 0 else None,
        "world_size": world, **({"rwp_mode": rwp_mode} if rwp_mode else {}),
        "paper_ref": cfg.paper_ref, "paper_error": cfg.paper_error, "paper_spread": cfg.paper_spread,
        "paper_nll": cfg.paper_nll,
        **extra,  # data_read_from: the data folder actually read
    }
    write_text(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=2) + "\n")


def _file_size_limit(error: Exception, needed: int):
    """The process's file-size limit (RLIMIT_FSIZE, `ulimit -f`) in bytes when it explains a failed
    write of about `needed` bytes (EFBIG "File too large"; torch.save reports it without an errno),
    else None."""
    import errno
    import resource
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    if getattr(error, "errno", None) == errno.EFBIG or (not isinstance(error, OSError) and needed >= limit):
        return limit
    return None


def write_error(path: str, error: Exception, needed: int) -> str:
    """One line for a failed write of about `needed` bytes to `path` (disk full, quota, I/O error, the
    file-size limit: that one is not a disk-space problem, so the free space is not shown)."""
    limit = _file_size_limit(error, needed)
    if limit is not None:
        return (f"cannot write {path} (File too large: this process may write files of at most {limit:,} bytes, "
                f"its file-size limit, ulimit -f" + (f"; it needs about {needed / 2**20:.1f} MB" if needed else "")
                + "); raise the limit")
    reason = error.strerror if isinstance(error, OSError) and error.strerror else "write failed"
    try:
        free = shutil.disk_usage(os.path.dirname(path) or ".").free
        space = (f"; it needs about {needed / 2**20:.1f} MB and " if needed else "; ") + f"{free / 2**20:.1f} MB are free there"
        if not isinstance(error, OSError) and free < needed:
            reason = "no space left on device"
    except OSError:
        space = ""
    return f"cannot write {path} ({reason}){space}"


class RunLog:
    """Human lines to stdout and log.txt, one JSON row per epoch to metrics.jsonl (rank 0 only).
    A failed append (disk full) is said once on stderr and does not stop the run: checkpoint.pt
    holds the history, and metrics.jsonl is rewritten from it on resume."""

    def __init__(self, run_dir, active):
        self.run_dir, self.active, self.warned = run_dir, active, False

    def _append(self, name, text, sync=False):
        path = os.path.join(self.run_dir, name)
        rundir.check_held(self.run_dir)
        try:
            with open(path, "a") as f:
                f.write(text)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            if not self.warned:
                self.warned = True
                print(f"main.py: warning: {write_error(path, e, len(text))}", file=sys.stderr, flush=True)

    def line(self, text, err=False):
        if not self.active:
            return
        from tqdm import tqdm
        stream = sys.stderr if err else sys.stdout
        with tqdm.external_write_mode(file=stream):  # above a progress bar, never on its line
            print(text, file=stream, flush=True)
        self._append("log.txt", text + "\n")

    def metrics(self, row):
        self._append("metrics.jsonl", json.dumps(row) + "\n", sync=True)
