"""The run folder: exactly one writer, a new folder or an existing one, no stale temporaries.

A process that writes a run folder holds an exclusive OS lock on the file `.lock` in it, from
creating or resuming the folder until it exits; the kernel releases it when the process dies
(SIGKILL included), so a dead run never leaves a stale lock. A second process is refused with one
line naming the holder, and writes nothing. Under torchrun, rank 0 holds the lock.

The lock is a POSIX record lock (`fcntl.lockf`), not `flock`: a `flock` lock is shared with forked
children, so DataLoader workers that outlive a SIGKILLed run for a few seconds would keep its folder
locked; a POSIX lock belongs to the process alone (and works on NFS). Its one trap — closing any
descriptor of the file releases it — is avoided by opening `.lock` once per process.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket

from runner.config import Config, UsageError

LOCK = ".lock"
_held = []          # open lock descriptors of this process (closed by the kernel at exit)
# atomic_write's temporaries of the records main.py writes: NAME.tmp<PID>
_TMP = re.compile(r"(checkpoint\.pt|summary\.json|config\.yaml|metrics\.jsonl|command\.txt|git_commit\.txt)\.tmp[0-9]+")
_RECORDS = {"config.yaml", "command.txt", "log.txt", "summary.json", "checkpoint.pt", "metrics.jsonl", LOCK}
# a SLURM task's stdout and stderr (recipes/slurm_task.sh): it creates the run folder to write them there
# before main.py starts, and they stay with the row's folder over every attempt of the task
TASK_LOGS = ("slurm.out", "slurm.err")
_NAME_MAX = 240     # bytes of a run name: 255 per path component, less room for -N / .failed-N


def default_name(cfg: Config) -> str:
    return cfg.name or f"{cfg.dataset}_{cfg.model}_{cfg.optimizer}_s{cfg.seed}"


def looks_like_run(folder: str) -> bool:
    """Whether a folder holds records of this runner (so it may be locked, resumed or set aside)."""
    return bool((_RECORDS | set(TASK_LOGS)) & set(os.listdir(folder)))


def lock(run_dir: str):
    """Take the run folder's lock or raise UsageError naming the process that holds it. Then
    remove temporaries that a killed writer left (only the lock holder writes, so all are stale).
    A busy lock is tried again for a second (a recipe's probe holds it for milliseconds); on a file
    system without locks (ENOLCK, EOPNOTSUPP: some Lustre/sshfs mounts) the run goes on, with a warning."""
    import fcntl
    import sys
    import time
    path = os.path.join(run_dir, LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UsageError(f"{run_dir}: cannot open its lock file ({e.strerror})") from None
    for attempt in range(11):
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                print(f"main.py: warning: {run_dir}: this file system has no file locks ({e.strerror}); "
                      f"nothing stops a second process from writing this folder", file=sys.stderr)
                break
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise UsageError(f"{run_dir}: cannot lock it ({e.strerror})") from None
            if attempt == 10:
                holder = os.pread(fd, 200, 0).decode(errors="replace").split()
                os.close(fd)
                who = f"process {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "another process"
                raise UsageError(f"{run_dir} is in use by {who}: one run folder has one writer; wait for it to "
                                 f"finish or stop it, then --resume {run_dir}") from None
            time.sleep(0.1)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError as e:  # (a full disk: the lock holds all the same)
        print(f"main.py: warning: {run_dir}: cannot write its lock file ({e.strerror})", file=sys.stderr)
    _held.append(fd)
    for name in os.listdir(run_dir):
        if _TMP.fullmatch(name):
            try:
                os.remove(os.path.join(run_dir, name))
            except OSError:
                pass


def release():
    """Release this process's run-folder locks (main() returns; exiting does the same)."""
    while _held:
        os.close(_held.pop())


def _name_error(name, out_dir, e):
    if e.errno == errno.ENAMETOOLONG:
        return UsageError(f"name: {name[:40]!r}... is too long for a folder name ({len(name.encode())} bytes)")
    return UsageError(f"out_dir: cannot create {os.path.join(out_dir, name)!r} ({e.strerror})")


def make_run_dir(cfg: Config, exact: bool = False) -> str:
    """Create and lock a new run folder. Never reuse one: name, name-1, name-2, ... (atomic
    mkdir); with `exact`, only `name` itself (a taken name is an error, in use or not)."""
    base = default_name(cfg)
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"out_dir: cannot create {cfg.out_dir!r} ({e.strerror})") from None
    if not os.access(cfg.out_dir, os.W_OK):
        raise UsageError(f"out_dir: {cfg.out_dir!r} is not writable; choose another with --out_dir")
    for i in range(1 if exact else 1000):
        name = base if i == 0 else f"{base}-{i}"
        path = os.path.join(cfg.out_dir, name)
        try:
            os.mkdir(path)
        except FileExistsError:
            if exact:
                lock(path)  # raises when a live run holds it (a recipe started twice)
                if holds_only_lock(path):  # created by a process that lost the lock to us: ours now
                    return path
                raise UsageError(f"{path} appeared while this run started; run again to resume it") from None
            continue
        except OSError as e:
            raise _name_error(name, cfg.out_dir, e) from None
        lock(path)
        return path
    raise UsageError(f"name: too many runs named {base!r} in {cfg.out_dir!r}")


def set_aside(run_dir: str) -> str:
    """Move a run folder that holds no checkpoint (it stopped before its first one) to
    run_dir.failed-N, keeping its log; returns the new path. A SLURM task's logs (TASK_LOGS) move
    back into a new run_dir: the task is still writing them, and they belong to the row."""
    n = 1
    while os.path.exists(f"{run_dir}.failed-{n}"):
        n += 1
    aside = f"{run_dir}.failed-{n}"
    shutil.move(run_dir, aside)
    logs = [name for name in TASK_LOGS if os.path.exists(os.path.join(aside, name))]
    if logs:
        os.mkdir(run_dir)
        for name in logs:
            os.replace(os.path.join(aside, name), os.path.join(run_dir, name))
    return aside


def holds_only_lock(run_dir: str) -> bool:
    """Whether the folder holds nothing of a run yet (its lock, a SLURM task's logs)."""
    return set(os.listdir(run_dir)) <= {LOCK, *TASK_LOGS}
