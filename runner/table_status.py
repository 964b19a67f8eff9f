"""Where a submitted table stands: the state of every planned run, per row (report.py prints it).

A recipe submitted with --slurm lists its runs in OUT/slurm/plan.tsv (one `row<TAB>seed` line each;
the run folder is OUT/<row>_s<seed>). Each planned run is in one state:

  finished     summary.json says completed
  running      a process holds the folder's lock (main.py trains there now), or a SLURM task has made
               the folder for its logs and main.py has not written anything yet
  stopped      saved and stopped (summary.json status interrupted: time limit, pre-emption, scancel),
               or killed without a summary (node failure, SIGKILL): continues where it stopped when
               the task is requeued or the recipe submitted again
  failed       diverged or failed (summary.json), or the task ended with an error before main.py
               wrote anything (exit code in the last `# task ended` line of slurm.out, the reason in
               slurm.err): requeueing does not help; see log.txt or slurm.err
  not started  no folder yet (the task is pending)
"""
from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import re

STATES = ("finished", "running", "stopped", "failed", "not started")
PLAN = os.path.join("slurm", "plan.tsv")
_ENDED = re.compile(r"^# task ended \S+: exit (\d+)", re.MULTILINE)  # (recipes/slurm_task.sh)


def find_plans(patterns):
    """(table folder, [(row, seed), ...]) for every folder named by the arguments that holds a plan."""
    plans = []
    for pattern in patterns:
        for top in (sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]):
            path = os.path.join(top, PLAN)
            if os.path.isfile(path):
                with open(path) as f:
                    planned = [tuple(line.rstrip("\n").split("\t")) for line in f if line.strip()]
                plans.append((top, [p for p in planned if len(p) == 2]))
    return plans


def _locked(run_dir) -> bool:
    """Whether another process holds the run folder's lock (as recipes/common.sh's `running`)."""
    try:
        fd = os.open(os.path.join(run_dir, ".lock"), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError as e:
        return e.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)


def _task_exit(run_dir):
    """The exit code in slurm.out's last `# task ended` line, or None (no such line)."""
    try:
        with open(os.path.join(run_dir, "slurm.out"), errors="replace") as f:
            ends = _ENDED.findall(f.read())
    except OSError:
        return None
    return int(ends[-1]) if ends else None


def run_state(run_dir):
    """(state, detail) of one planned run folder (module docstring)."""
    if not os.path.isdir(run_dir):
        return "not started", ""
    if _locked(run_dir):
        return "running", ""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        status, message = summary.get("status"), summary.get("message", "")
    except (OSError, ValueError, AttributeError):
        status = message = None
    if status == "completed":
        return "finished", ""
    if status == "interrupted":
        return "stopped", message
    if status in ("diverged", "failed"):
        return "failed", f"{status}: {message}"
    if os.path.isfile(os.path.join(run_dir, "config.yaml")):
        return "stopped", "no summary.json (killed)"
    code = _task_exit(run_dir)
    if code is None:
        return "running", "starting"
    return ("failed", f"exit {code} before the run began; see slurm.err") if code else ("not started", "")


def status_markdown(table, planned) -> str:
    """A Markdown table, one line per row: the seeds in each state; then every failed run's reason."""
    rows, failed, counts = {}, [], dict.fromkeys(STATES, 0)
    for row, seed in planned:
        run_dir = os.path.join(table, f"{row}_s{seed}")
        state, detail = run_state(run_dir)
        rows.setdefault(row, {s: [] for s in STATES})[state].append(seed)
        counts[state] += 1
        if state == "failed":
            failed.append(f"- {run_dir}: {detail}")
    lines = [f"Status of the {len(planned)} planned run(s) of {table} ({PLAN}): "
             + ", ".join(f"{n} {s}" for s, n in counts.items()), "",
             "| row | " + " | ".join(f"{s} (seeds)" for s in STATES) + " |", "|---" * (len(STATES) + 1) + "|"]
    for row, seeds in rows.items():
        lines.append(f"| {row} | " + " | ".join(" ".join(seeds[s]) or "–" for s in STATES) + " |")
    if failed:
        lines += ["", "Failed (not requeued):", *failed]
    return "\n".join(lines) + "\n"
