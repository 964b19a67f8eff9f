"""The run folder: exactly one writer, a new folder or an existing one, no stale temporaries.

Which folder a run writes is decided once, by rank 0 (the only process under plain `python`):
`decide(cfg)` takes the folder's lock and answers one of
  ("resume", DIR)  continue DIR's checkpoint (--resume DIR, or --on_existing resume finding the
                   row's folder with a checkpoint);
  ("new", DIR)     start in DIR, a locked folder that holds nothing of a run yet;
  ("new", None)    create the folder once the run is built (make_run_dir); with --on_existing
                   resume, a row's folder that stopped before its first checkpoint is first set
                   aside as DIR.failed-N (set_aside);
  ("done", TEXT)   the row's run has finished or diverged: nothing to do, TEXT says so;
  ("error", TEXT)  invalid input (UsageError: one line, exit 2).
`open_run(cfg, start_group)` gives every rank the same answer: the other ranks know it without
asking (with --resume DIR, and with --on_existing new) or, with --on_existing resume under torchrun,
learn rank 0's by broadcast. `created(cfg, run_dir)` then names the folder of a run that has been
built, creating it on rank 0 where it does not exist yet and broadcasting its name.

A process that writes a run folder holds an exclusive OS lock on the file `.lock` in it, from
creating or resuming the folder until it exits; the kernel releases it when the process dies
(SIGKILL included), so a dead run never leaves a stale lock. A second process is refused with one
line naming the holder, and writes nothing. Under torchrun, rank 0 holds the lock.

The lock belongs to the file, not to its name: if `.lock` is removed or replaced (a cleanup script,
a sync tool), a newcomer could lock a new file of that name beside the writer. So the writer checks
before every write (check_held) that `.lock` still names the file it locked (device and inode) and
stops when it does not (LockLost); and it records itself in `writer.txt` (PID, host, process start
time; removed when it exits normally), so a newcomer that gets the lock still refuses a folder whose
writer is alive on this host.

The lock is a POSIX record lock (`fcntl.lockf`), not `flock`: a `flock` lock is shared with forked
children, so DataLoader workers that outlive a SIGKILLed run for a few seconds would keep its folder
locked; a POSIX lock belongs to the process alone (and works on NFS). Its one trap — closing any
descriptor of the file releases it — is avoided by opening `.lock` once per process.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sys

from runner.config import Config, UsageError

LOCK = ".lock"
WRITER = "writer.txt"  # "PID HOST START" of the process writing the folder (START: /proc's start time, or -)
_held = []          # (descriptor, folder's real path, (st_dev, st_ino) of its .lock) per folder this process locked
_claimed = {}       # folder's real path -> the writer.txt text this process wrote there
# atomic_write's temporaries of the records main.py writes: NAME.tmp<PID>
_TMP = re.compile(r"(checkpoint\.pt|summary\.json|config\.yaml|metrics\.jsonl|command\.txt|git_commit\.txt|writer\.txt)"
                  r"\.tmp[0-9]+")
_RECORDS = {"config.yaml", "command.txt", "log.txt", "summary.json", "checkpoint.pt", "metrics.jsonl", LOCK, WRITER}
# a SLURM task's stdout and stderr (recipes/slurm_task.sh): it creates the run folder to write them there
# before main.py starts, and they stay with the row's folder over every attempt of the task
TASK_LOGS = ("slurm.out", "slurm.err")

_NAME_MAX = 240     # bytes of a run name: 255 per path component, less room for -N / .failed-N


class LockLost(Exception):
    """The run folder's `.lock` no longer names the file this process locked: another process may
    write the folder, so this one stops without writing anything more (main.py: one line, exit 1)."""


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
    writer = live_writer(run_dir)
    if writer:
        os.close(fd)
        raise UsageError(f"{run_dir} is in use by {writer} (its {WRITER}; its {LOCK} file was removed or replaced): "
                         f"one run folder has one writer; wait for it to finish or stop it, then --resume {run_dir}")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError as e:  # (a full disk: the lock holds all the same)
        print(f"main.py: warning: {run_dir}: cannot write its lock file ({e.strerror})", file=sys.stderr)
    st = os.fstat(fd)
    _held.append((fd, os.path.realpath(run_dir), (st.st_dev, st.st_ino)))
    for name in os.listdir(run_dir):
        if _TMP.fullmatch(name):
            try:
                os.remove(os.path.join(run_dir, name))
            except OSError:
                pass


def _start_time(pid: int):
    """Process `pid`'s start time (clock ticks after boot, from /proc) as text, '-' where there is no
    /proc; None when no such process is alive (none, or a zombie)."""
    if not os.path.isdir("/proc/self"):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except OSError:
            pass
        return "-"
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # (after the command name, which may hold spaces)
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]  # state; starttime (the 22nd field)


def live_writer(run_dir: str):
    """'process PID on HOST' when the folder's writer.txt names another live process on this host
    (the same PID and start time: a PID used again by another process does not count), else None."""
    try:
        with open(os.path.join(run_dir, WRITER)) as f:
            pid, host, start = f.read().split()
        pid = int(pid)
    except (OSError, ValueError):
        return None
    if host != socket.gethostname() or pid == os.getpid():
        return None  # (another host: its lock is what protects the folder)
    now = _start_time(pid)
    alive = now is not None and (now == start or "-" in (now, start))
    return f"process {pid} on {host}" if alive else None


def claim(run_dir: str):
    """Record this process as the writer of the folder it locked (writer.txt; see live_writer)."""
    text = f"{os.getpid()} {socket.gethostname()} {_start_time(os.getpid()) or '-'}\n"
    tmp = os.path.join(run_dir, f"{WRITER}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(run_dir, WRITER))
    _claimed[os.path.realpath(run_dir)] = text


def check_held(folder: str):
    """LockLost when `folder` is one this process locked and its .lock has been removed or replaced
    since (another file of that name may be locked by another process): called before every write."""
    real = os.path.realpath(folder)
    for _, where, ident in reversed(_held):  # (the latest lock of that path: a folder set aside left one)
        if where != real:
            continue
        try:
            st = os.stat(os.path.join(where, LOCK))
            now = (st.st_dev, st.st_ino)
        except OSError:
            now = None
        if now != ident:
            raise LockLost(f"{folder}: its lock file {LOCK} was {'removed' if now is None else 'replaced'} while this "
                           f"run wrote the folder, so another process may be writing it: stopped (failed) and wrote "
                           f"nothing more; make sure no other run writes it, then --resume {folder}")
        return


def release():
    """Release this process's run-folder locks (main() returns; exiting does the same), removing
    its writer.txt where the lock is still its own."""
    while _held:
        fd, where, _ = _held[-1]
        text = _claimed.pop(where, None)
        try:
            check_held(where)
            with open(os.path.join(where, WRITER)) as f:
                if text is not None and f.read() == text:
                    os.remove(os.path.join(where, WRITER))
        except (LockLost, OSError):
            pass
        _held.pop()
        os.close(fd)


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


def finished(run_dir, status="completed") -> bool:
    """Whether the run folder's summary.json says the run ended with `status` (it is written last:
    a run killed after its final checkpoint but before the summary is not finished)."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            return json.load(f).get("status") == status
    except (OSError, ValueError, AttributeError):
        return False


def decide(cfg: Config):
    """Rank 0's decision on the run folder, taking its lock: ("resume", dir), ("new", dir) for a
    locked empty folder to start in, ("new", None) for a folder to create once the run is built,
    ("done", message) when the row's run has ended, or ("error", message)."""
    try:
        if cfg.resume:
            if not os.path.isdir(cfg.resume):
                raise UsageError(f"resume: {cfg.resume!r} is not a run folder")
            if not os.path.isfile(os.path.join(cfg.resume, "checkpoint.pt")):
                raise UsageError(f"resume: {cfg.resume!r} has no checkpoint.pt (nothing to resume; start a new run)")
            lock(cfg.resume)
            return "resume", cfg.resume
        path = os.path.join(cfg.out_dir, default_name(cfg))
        if cfg.on_existing != "resume" or not os.path.isdir(path):
            return "new", None
        if not looks_like_run(path):
            raise UsageError(f"{path} exists and is not a run folder; choose another --name or --out_dir")
        lock(path)  # (a live run of this row: "in use", exit 2)
        if os.path.isfile(os.path.join(path, "checkpoint.pt")):
            return "resume", path
        for status in ("completed", "diverged"):  # (its checkpoint deleted to save space)
            if finished(path, status):
                return "done", f"{path} has {'finished' if status == 'completed' else status} (summary.json); skipped"
        if holds_only_lock(path):
            return "new", path
        aside = set_aside(path)
        print(f"{path} stopped before its first checkpoint; kept as {aside}, starting it again", file=sys.stderr)
        return "new", None
    except UsageError as e:
        return "error", str(e)


def _from_rank0(value):
    """Rank 0's `value` on every rank (torchrun; the process group is up)."""
    import torch.distributed as dist
    box = [value]
    dist.broadcast_object_list(box, 0)
    return box[0]


def open_run(cfg: Config, start_group):
    """Every rank's copy of rank 0's decision (see decide), less "error", which is raised as
    UsageError: ("resume", dir), ("new", dir or None) or ("done", message). Under torchrun with
    --on_existing resume (and no --resume) only rank 0 knows it: `start_group()` starts the process
    group on every rank and rank 0 broadcasts it."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if rank == 0:
        decision = decide(cfg)
    else:  # (with --resume every rank knows the folder; a refused lock stops rank 0 and torchrun the rest)
        decision = ("resume", cfg.resume) if cfg.resume else ("new", None)
    if world > 1 and cfg.on_existing == "resume" and not cfg.resume:  # only rank 0 knows what to do
        start_group()
        decision = _from_rank0(decision)
    if decision[0] == "error":
        raise UsageError(decision[1])
    return decision


def created(cfg: Config, run_dir):
    """The folder of a run that has been built, the same on every rank: `run_dir` where open_run
    gave one, else rank 0 creates and locks it (make_run_dir; with --on_existing resume exactly the
    row's name) and broadcasts its name (torchrun: the Trainer has started the process group)."""
    if run_dir is not None:
        return run_dir
    run_dir = make_run_dir(cfg, exact=cfg.on_existing == "resume") if int(os.environ.get("RANK", "0")) == 0 else None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        run_dir = _from_rank0(run_dir)
    return run_dir
