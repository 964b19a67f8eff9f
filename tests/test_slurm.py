"""Recipes on a real SLURM cluster that these tests start on localhost (Debian's slurm-wlm and munge,
installed with apt-get when missing; root needed, else skipped with the reason): `recipes/X.sh --slurm`
submits a job array, one task per (row, seed), and the report job after it; a task requeued by SLURM
(scontrol requeue: SIGTERM) or by itself (USR1 before its time limit) continues its run exactly; a task
that fails for good is not requeued. The cluster: munged, slurmctld and slurmd with a minimal config
(2 CPUs, no cgroups: proctrack/linuxproc, task/none; cred_expire=5, its minimum, so that SLURM starts a
requeued task again after 6 s instead of 2 minutes), all in a temporary folder, stopped at the end."""
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import report
from runner.table_status import run_state
from conftest import FASHION_DIR, ROOT

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
ROW_ARGS = ["--gpus-per-process", "0", "--model", "wrn10_1", "--train_size", "256", "--test_size", "128",
            "--batch_size", "32", "--eval_batch_size", "128"]


def _install():
    """Install slurm-wlm and munge if a tool is missing; the reason to skip, or None."""
    if os.geteuid() != 0:
        return "needs root (to install slurm-wlm and munge, and to run slurmd)"
    if not os.path.isdir(FASHION_DIR):
        return f"needs the real Fashion-MNIST in {FASHION_DIR} (apt-get install dataset-fashion-mnist)"
    if all(shutil.which(t, path=SBIN) for t in TOOLS):
        return None
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install slurm-wlm and munge"
    p = subprocess.run("apt-get update -qq && apt-get install -y -qq slurm-wlm munge", shell=True, text=True,
                       capture_output=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, timeout=900)
    if p.returncode != 0 or not all(shutil.which(t, path=SBIN) for t in TOOLS):
        pytest.fail(f"apt-get install slurm-wlm munge failed: {p.stderr[-2000:]}")
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(d, host):
    return f"""ClusterName=test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=30
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def slurm(env, *args):
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=30)


def _ours(d, conf):
    """PIDs of live processes of this cluster: its daemons (the folder in their command line), its
    slurmstepd and its jobs (SLURM_CONF in their environment)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if int(pid) != os.getpid() and (d.encode() in cmd or f"SLURM_CONF={conf}".encode() in env.split(b"\0")):
            pids.append(int(pid))
    return pids


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The environment for SLURM commands of a one-node cluster (2 CPUs) started here; stopped after."""
    reason = _install()
    if reason:
        pytest.skip(reason)
    d = str(tmp_path_factory.mktemp("slurm"))
    for sub in ("munge", "state", "spool"):
        os.makedirs(os.path.join(d, sub))
    os.chmod(os.path.join(d, "munge"), 0o755)
    key = os.path.join(d, "munge", "key")
    with open(os.open(key, os.O_WRONLY | os.O_CREAT, 0o400), "wb") as f:
        f.write(os.urandom(1024))
    host = socket.gethostname().split(".")[0]
    conf = os.path.join(d, "slurm.conf")
    with open(conf, "w") as f:
        f.write(_conf(d, host))
    env = {**os.environ, "SLURM_CONF": conf, "OMP_NUM_THREADS": "1", "PATH": SBIN}
    daemons = []
    start = time.monotonic()
    try:
        m = os.path.join(d, "munge")
        for argv in ([shutil.which("munged", path=SBIN), "-F", "-f", f"--key-file={key}", f"--socket={m}/socket",
                      f"--pid-file={m}/pid", f"--log-file={m}/log", f"--seed-file={m}/seed"],
                     [shutil.which("slurmctld", path=SBIN), "-D", "-c", "-f", conf],
                     [shutil.which("slurmd", path=SBIN), "-D", "-f", conf, "-N", host]):
            daemons.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            while argv[0].endswith("munged") and not os.path.exists(f"{m}/socket"):
                time.sleep(0.05)
        while "idle" not in slurm(env, "sinfo", "-h", "-o", "%T").stdout:
            assert time.monotonic() - start < 60 and all(p.poll() is None for p in daemons), \
                f"the cluster did not start: {open(os.path.join(d, 'slurmctld.log')).read()[-2000:]}"
            time.sleep(0.2)
        print(f"cluster up in {time.monotonic() - start:.1f} s")
        yield env
    finally:
        slurm(env, "scancel", "--full", "--user", "root")
        deadline = time.monotonic() + 60
        while slurm(env, "squeue", "-h").stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.5)
        for p in reversed(daemons):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        left = _ours(d, conf)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes of the test cluster were still running (killed): {left}"


def submit(env, out, only, seeds, *args):
    """recipes/sam_fashionmnist.sh --slurm: (array job id, report job id)."""
    p = subprocess.run(["bash", os.path.join(ROOT, "recipes", "sam_fashionmnist.sh"), "--slurm", "--seeds", seeds,
                        "--max-running", "2", *ROW_ARGS, *args], env={**env, "OUT": str(out), "ONLY": only},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    ids = [line.split("job ")[1].split(",")[0] for line in p.stdout.splitlines() if line.startswith("submitted")]
    assert len(ids) == 2, p.stdout
    return ids


def wait_for(check, what, timeout=600):
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.3)


def ended(env, *jobs):
    return lambda: not slurm(env, "squeue", "-h", "-j", ",".join(jobs)).stdout.strip()


def rows(run_dir):
    """metrics.jsonl without the wall times."""
    return [{k: v for k, v in json.loads(line).items() if k != "epoch_time_s"}
            for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def table(cluster, tmp_path_factory):
    """The tiny recipe: 2 rows (SGD, SAM) x 2 seeds, 1 epoch, submitted and waited for."""
    out = tmp_path_factory.mktemp("table") / "fm"
    start = time.monotonic()
    array, rep = submit(cluster, out, "basic_s", "0-1", "--epochs", "1")
    wait_for(ended(cluster, array, rep), "the array and the report job")
    print(f"2 rows x 2 seeds and the report in {time.monotonic() - start:.1f} s")
    return out


def test_a_recipe_submitted_with_slurm_runs_each_row_and_seed_as_a_task_then_the_report(table, capsys):
    names = [f"wrn28_10_basic_{opt}_s{seed}" for opt in ("sam", "sgd") for seed in (0, 1)]
    assert sorted(n for n in os.listdir(table) if n != "slurm") == names
    for name in names:
        run = table / name
        assert json.load(open(run / "summary.json"))["status"] == "completed"
        out = (run / "slurm.out").read_text()  # the task's stdout and stderr, kept in its run folder
        assert out.startswith("# task ") and " attempt 1 started " in out and "final test error" in out
        assert out.rstrip().endswith(": exit 0") and (run / "slurm.err").is_file()
    md = (table.parent / "fm.md").read_text()  # the report job's table, beside the folder
    assert "| fashionmnist | wrn10_1 | sgd | 2 |" in md and "| fashionmnist | wrn10_1 | sam | 2 |" in md
    assert "4 planned run(s)" in md and "4 finished, 0 running, 0 stopped, 0 failed, 0 not started" in md
    assert "| wrn28_10_basic_sgd | 0 1 | – | – | – | – |" in md
    assert len((table.parent / "fm.csv").read_text().splitlines()) == 3
    assert (table.parent / "fm.png").stat().st_size > 0
    assert report.main([str(table)]) == 0 and capsys.readouterr().out == md


def test_a_requeued_task_continues_its_run_exactly(cluster, table, tmp_path):
    """One SGD task is requeued by SLURM while it trains (scontrol requeue: SIGTERM, the run saves
    mid-epoch, SLURM puts the task back), then by itself (USR1, as --signal=B:USR1@600 sends before the
    time limit): its third attempt finishes, equal to an uninterrupted run of the same command. A task
    with a bad value fails once and is not requeued."""
    epoch_s = json.loads(open(table / "wrn28_10_basic_sgd_s0" / "metrics.jsonl").readline())["epoch_time_s"]
    epochs = str(max(3, math.ceil(4 / max(epoch_s, 1e-3))))  # ≥ 4 s of training: signals land mid-run
    out = tmp_path / "fm"
    array, rep = submit(cluster, out, "basic_sgd", "0", "--epochs", epochs)
    partial = tmp_path / "partial"  # valid flags (the recipe checks them first), data main.py refuses: exit 2
    partial.mkdir()
    shutil.copy(os.path.join(FASHION_DIR, "train-labels-idx1-ubyte.gz"), partial)
    bad = submit(cluster, tmp_path / "bad", "basic_sgd", "0", "--epochs", epochs, "--data_dir", str(partial))
    reference = subprocess.Popen(  # the same command, uninterrupted, outside SLURM
        [sys.executable, "main.py", "--config", "configs/fashionmnist/wrn28_10_basic_sgd.yaml", "--seed", "0",
         "--out_dir", str(tmp_path / "ref"), "--name", "ref", *ROW_ARGS[2:], "--epochs", epochs],
        cwd=ROOT, env=cluster, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = out / "wrn28_10_basic_sgd_s0"
    log = lambda: (run / "log.txt").read_text() if (run / "log.txt").exists() else ""  # noqa: E731
    wait_for(lambda: "started" in log(), "the first attempt to start training")
    assert run_state(str(run))[0] == "running"
    assert slurm(cluster, "scontrol", "requeue", f"{array}_0").returncode == 0
    wait_for(lambda: run_state(str(run))[0] == "stopped", "the run to save and stop")  # (held 6 s by SLURM)
    wait_for(lambda: "resumed" in log(), "the second attempt")
    assert slurm(cluster, "scancel", "--batch", "--signal=USR1", f"{array}_0").returncode == 0
    wait_for(lambda: log().count("resumed") == 2, "the third attempt")
    wait_for(ended(cluster, array, rep, *bad), "the jobs")
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]

    text = log()
    assert text.count("stopped by signal 15; saved after epoch") == 2, text
    assert "(its first" in text  # a mid-epoch checkpoint was continued
    out_log = (run / "slurm.out").read_text()
    assert [f"attempt {n} started" in out_log for n in (1, 2, 3)] == [True] * 3
    assert "exit 143; requeued (time limit)" in out_log and out_log.rstrip().endswith(": exit 0")
    assert rows(run) == rows(tmp_path / "ref" / "ref") and len(rows(run)) == int(epochs)
    final = [json.load(open(r / "summary.json"))["final_test_error"] for r in (run, tmp_path / "ref" / "ref")]
    assert final[0] == final[1]
    assert "1 finished, 0 running, 0 stopped, 0 failed" in (tmp_path / "fm.md").read_text()

    failed = tmp_path / "bad" / "wrn28_10_basic_sgd_s0"  # exit 2 before any record: one attempt, FAILED
    assert "main.py: error: fashionmnist:" in (failed / "slurm.err").read_text()
    assert (failed / "slurm.out").read_text().count("attempt") == 1
    job = slurm(cluster, "scontrol", "show", "job", f"{bad[0]}_0").stdout
    assert "JobState=FAILED" in job and "Restarts=0" in job and "ExitCode=2:0" in job, job
    md = (tmp_path / "bad.md").read_text()
    assert "0 finished, 0 running, 0 stopped, 1 failed, 0 not started" in md
    assert f"- {failed}: exit 2 before the run began; see slurm.err" in md


# ----------------------------------------------------------------------------- without a cluster

def recipe_dry_run(name, *args, env=None):
    return subprocess.run(["bash", os.path.join(ROOT, "recipes", f"{name}.sh"), "--slurm", "--dry-run", *args],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60)


def scripts(stdout):
    """{file: text} of the batch scripts a dry run prints, and its submit commands."""
    parts, name = {}, None
    for line in stdout.splitlines():
        if line.startswith("# ") and line.endswith(".sbatch"):
            name = line[2:]
            parts[name] = []
        elif line.startswith("# submit"):
            name = "submit"
            parts[name] = []
        elif name:
            parts[name].append(line)
    return {k: "\n".join(v) for k, v in parts.items()}


def test_slurm_dry_run_prints_an_array_per_launcher_and_the_report_job(tmp_path):
    out = str(tmp_path / "t")
    p = recipe_dry_run("rwp_cifar", "--seeds", "0-1", "--max-running", "3", "--data_dir", "/d", "--",
                       "--partition", "gpu", env={"OUT": out, "LAUNCH": "torchrun --nproc_per_node 2"})
    assert p.returncode == 0, p.stderr
    parts = scripts(p.stdout)
    one, two, rep = (parts[f"{out}/slurm/{f}.sbatch"] for f in ("rows-1", "rows-2", "report"))
    for text, n, procs in ((one, 20, 1), (two, 16, 2)):  # 10 + 8 rows of configs/rwp, 2 seeds
        tasks = [line for line in text.splitlines() if line.startswith("  ") and "CMD=(" in line]
        assert len(tasks) == n and f"#SBATCH --array=0-{n - 1}%3" in text
        assert f"#SBATCH --gres=gpu:{procs}" in text and f"#SBATCH --cpus-per-task={procs}" in text
        assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@600" in text
        assert text.rstrip().endswith('exec bash recipes/slurm_task.sh "$RUN" "${CMD[@]}"')
        for i, line in enumerate(tasks):  # the command the recipe runs without --slurm
            row, seed = line.split("--name ")[1].split()[0].rsplit("_s", 1)
            assert line.startswith(f"  {i}) RUN={out}/{row}_s{seed}; CMD=(")
            assert (f"main.py --config configs/rwp/{row}.yaml --seed {seed} --out_dir {out} --name {row}_s{seed} "
                    f"--on_existing resume --data_dir /d) ;;") in line
            assert ("CMD=(torchrun --nproc_per_node 2 main.py" in line) == (procs == 2) == row.endswith("_rwp")
    assert f"python report.py {out} --csv {out}.csv --plot {out}.png > {out}.md" in rep
    assert parts["submit"].splitlines() == [
        f"ARRAY_1=$(sbatch --parsable --partition gpu {out}/slurm/rows-1.sbatch)",
        f"ARRAY_2=$(sbatch --parsable --partition gpu {out}/slurm/rows-2.sbatch)",
        f"sbatch --parsable --partition gpu --dependency=afterany:$ARRAY_1:$ARRAY_2 {out}/slurm/report.sbatch"]
    assert not os.path.exists(out)  # a dry run writes nothing


def test_slurm_mode_of_every_recipe_and_its_errors(tmp_path):
    for name in ("amp_table_a", "amp_table_b", "rwp_imagenet", "sam_cifar", "sam_fashionmnist", "sam_davda54"):
        p = recipe_dry_run(name, "--seeds", "0,2", "--gpus-per-process", "0", env={"OUT": str(tmp_path)})
        text = scripts(p.stdout)[f"{tmp_path}/slurm/rows-1.sbatch"]
        configs = [c for c in os.listdir(os.path.join(ROOT, "configs", {"amp_table_a": "amp", "amp_table_b": "amp",
                   "rwp_imagenet": "imagenet", "sam_cifar": "sam", "sam_fashionmnist": "fashionmnist",
                   "sam_davda54": "davda54"}[name])) if not name.startswith("amp_table") or
                   c.startswith("table" + name[-1].upper())]
        assert p.returncode == 0 and text.count("--seed 2 ") == text.count("--seed 0 ") == len(configs), name
        assert "--gres" not in text and "(no GPUs: --gpus-per-process 0)" in text
    for args, message in ((["--seeds", "3-1"], "--seeds: 3-1 is not a seed list"),
                          (["--max-running", "0"], "--max-running: 0 is not a positive whole number"),
                          (["--gpus-per-process"], "--gpus-per-process needs a value")):
        p = recipe_dry_run("sam_davda54", *args)
        assert p.returncode == 2 and p.stderr.startswith(f"sam_davda54.sh: {message}") and p.stderr.count("\n") == 1, p.stderr
    p = subprocess.run(["bash", os.path.join(ROOT, "recipes", "sam_davda54.sh"), "--dry-run", "--max-running", "2"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "need --slurm" in p.stderr
    p = recipe_dry_run("sam_davda54", env={"ONLY": "nothing"})
    assert p.returncode == 2 and "no rows to submit (ONLY=nothing matches no config)" in p.stderr


def test_report_shows_a_submitted_table_that_has_not_started(tmp_path, capsys):
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "plan.tsv").write_text("row_a\t0\nrow_a\t1\nrow_b\t0\n")
    assert report.main([str(tmp_path)]) == 0  # (no run folders yet: not an error)
    out = capsys.readouterr().out
    assert "No completed runs." in out and "0 finished, 0 running, 0 stopped, 0 failed, 3 not started" in out
    assert "| row_a | – | – | – | – | 0 1 |" in out and "| row_b | – | – | – | – | 0 |" in out


def test_a_tasks_logs_stay_with_the_row_when_a_run_without_checkpoint_is_set_aside(tmp_path):
    """slurm_task.sh makes the run folder for slurm.out/slurm.err before main.py starts: such a folder is
    one to start in, and a run that stopped before its first checkpoint goes to NAME.failed-1 while the
    logs (still being written) stay in NAME."""
    from runner import rundir
    run = tmp_path / "row_s0"
    run.mkdir()
    for name in ("slurm.out", "slurm.err"):
        (run / name).write_text(f"{name} of attempt 1\n")
    assert rundir.looks_like_run(str(run)) and rundir.holds_only_lock(str(run))
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "log.txt").write_text("started\n")
    assert not rundir.holds_only_lock(str(run))
    with open(run / "slurm.out", "a") as out:  # (the task's open file follows the rename)
        aside = rundir.set_aside(str(run))
        out.write("attempt 2\n")
    assert sorted(os.listdir(aside)) == ["config.yaml", "log.txt"] and rundir.holds_only_lock(str(run))
    assert (run / "slurm.out").read_text() == "slurm.out of attempt 1\nattempt 2\n"
