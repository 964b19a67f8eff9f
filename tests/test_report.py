"""report.py on real short main.py runs, and the recipes in dry-run mode (and with a stub launcher)."""
import csv
import glob
import json
import os
import shlex
import shutil
import statistics
import struct
import subprocess
import sys

import pytest

import main
import report
from conftest import FASHION_DIR, ROOT, torch_threads

HAVE_FASHION = os.path.isdir(FASHION_DIR)
DATA = ["--dataset", "fashionmnist", "--data_dir", FASHION_DIR] if HAVE_FASHION else ["--dataset", "synthetic"]
TINY = DATA + ["--model", "wrn10_1", "--train_size", "256", "--test_size", "128", "--batch_size", "64",
               "--epochs", "2", "--eval_batch_size", "128", "--optimizer", "sgd"]
PAPER = ["--paper_error", "4.57", "--paper_spread", "0.07", "--paper_ref", "SAM paper, Table 5, basic, SGD"]
RECIPES = ["amp_table_a", "amp_table_b", "rwp_cifar", "rwp_imagenet", "sam_cifar", "sam_fashionmnist",
           "sam_davda54"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """root/a: 3 completed seeds of config A (with the paper keys) + 1 interrupted after epoch 1;
    root/b: config B (lr 0.05), 2 completed seeds + 1 whose summary.json is gone (crashed)."""
    root = tmp_path_factory.mktemp("report")

    def run(out, name, *args):
        assert main.main([*TINY, *args, "--out_dir", str(root / out), "--name", name]) == 0

    with torch_threads(1):  # much faster than 2 threads on a busy 2-core machine
        for s in (0, 1, 2):
            run("a", f"a_s{s}", *PAPER, "--seed", str(s))
            run("b", f"b_s{s}", "--lr", "0.05", "--seed", str(s))
        real = main.Trainer.train_epoch

        def interrupt_in_epoch_2(self, epoch, progress, partial=None):
            if epoch == 1:
                raise KeyboardInterrupt
            return real(self, epoch, progress, partial)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(main.Trainer, "train_epoch", interrupt_in_epoch_2)
            assert main.main([*TINY, *PAPER, "--seed", "3", "--out_dir", str(root / "a"), "--name", "a_s3"]) == 130
    os.remove(root / "b" / "b_s2" / "summary.json")
    return root


def summaries(root, pattern):
    return [json.load(open(p)) for p in sorted(glob.glob(str(root / pattern / "summary.json")))]


def report_json(tmp_path, *args):
    path = tmp_path / "report.json"
    assert report.main([*map(str, args), "--json", str(path)]) == 0
    return json.load(open(path))


def pm(values):
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


# ----------------------------------------------------------------------------- report.py

def test_means_and_stds_match_the_runs_summaries(runs, tmp_path, capsys):
    csv_path, json_path = tmp_path / "r.csv", tmp_path / "r.json"
    assert report.main([str(runs), "--csv", str(csv_path), "--json", str(json_path)]) == 0
    table = capsys.readouterr().out
    data = json.load(open(json_path))
    a, b = sorted(data["groups"], key=lambda g: g["setting"])  # A: lr at its default, B: "lr=0.05"
    expected = {"a": [s for s in summaries(runs, "a/*") if s["status"] == "completed"],
                "b": summaries(runs, "b/*")}  # b_s2 has no summary.json
    for group, name in ((a, "a"), (b, "b")):
        final = [s["final_test_error"] for s in expected[name]]
        best = [s["best_test_error"] for s in expected[name]]
        assert group["n"] == len(final) == (3 if name == "a" else 2)
        assert group["final_mean"] == pytest.approx(statistics.mean(final), abs=1e-12)
        assert group["final_std"] == pytest.approx(statistics.stdev(final), abs=1e-12)  # sample std, ddof 1
        assert group["best_mean"] == pytest.approx(statistics.mean(best), abs=1e-12)
        assert group["best_std"] == pytest.approx(statistics.stdev(best), abs=1e-12)
        assert group["dataset"] == DATA[1] and group["model"] == "wrn10_1" and group["optimizer"] == "sgd"
        assert f"| {pm(final)} | {pm(best)} |" in table
    assert sorted(a["seeds"]) == [0, 1, 2] and sorted(b["seeds"]) == [0, 1]
    assert (a["setting"], b["setting"]) == ("", "lr=0.05")
    assert (a["paper_error"], a["paper_spread"], a["paper_ref"]) == (4.57, 0.07, "SAM paper, Table 5, basic, SGD")
    assert a["diff_final"] == pytest.approx(a["final_mean"] - 4.57)
    assert b["paper_error"] is None and b["diff_final"] is None
    assert f"| 4.57 ± 0.07 | {a['final_mean'] - 4.57:+.2f} |" in table
    assert "best (picked on test)" in table and "ddof = 1" in table
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 2
    by_setting = {r["setting"]: r for r in rows}
    assert float(by_setting["lr=0.05"]["final_mean"]) == pytest.approx(b["final_mean"])
    assert float(by_setting[""]["best_std"]) == pytest.approx(a["best_std"])
    assert by_setting["lr=0.05"]["paper_error"] == "" and by_setting[""]["seeds"] == "0 1 2"


def test_unfinished_runs_are_listed_apart_and_never_averaged(runs, tmp_path, capsys):
    data = report_json(tmp_path, runs)
    table = capsys.readouterr().out
    apart = {os.path.basename(o["run"]): o for o in data["not_averaged"]}
    assert set(apart) == {"a_s3", "b_s2"}
    assert apart["a_s3"]["status"] == "interrupted" and apart["a_s3"]["epochs_completed"] == 1
    assert apart["b_s2"]["status"].startswith("unfinished") and apart["b_s2"]["epochs_completed"] == 2
    averaged = {os.path.basename(r) for g in data["groups"] for r in g["runs"]}
    assert averaged == {"a_s0", "a_s1", "a_s2", "b_s0", "b_s1"}
    tail = table.split("Not averaged")[1]
    assert "| interrupted | 1/2 |" in tail and "unfinished (no summary.json" in tail
    assert "a_s3" not in table.split("Not averaged")[0]


def test_arguments_run_folders_globs_and_repeats(runs, tmp_path, capsys):
    assert report.main([str(runs / "a" / "a_s0")]) == 0  # one run folder: n = 1, no std
    out = capsys.readouterr().out
    s = json.load(open(runs / "a" / "a_s0" / "summary.json"))
    assert f"| 1 | {s['final_test_error']:.2f} ± – | {s['best_test_error']:.2f} ± – |" in out
    globbed = report_json(tmp_path, runs / "*", runs / "a")  # a glob, and a folder named twice
    assert [g["n"] for g in globbed["groups"]] == [g["n"] for g in report_json(tmp_path, runs)["groups"]]


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing"], "is not a folder and matches no folder"),
    (["{tmp}/empty"], "no run folders"),
    (["{tmp}/nothing*"], "matches no folder"),
    (["{runs}", "--bogus"], "unrecognized arguments: --bogus"),
    (["{runs}", "--csv", "{tmp}/no/such/dir/r.csv"], "--csv: folder"),
    (["{runs}", "--csv", "{runs}"], "--csv: '{runs}' is a folder, not a file"),
    (["{runs}", "--json", "{tmp}/"], "--json: '{tmp}/' is a folder, not a file"),
    (["{runs}", "--plot", "{runs}"], "--plot: '{runs}' is a folder, not a file"),
    pytest.param(["{runs}", "--csv", "/proc/r.csv"], "--csv: folder '/proc' is not writable",
                 marks=pytest.mark.skipif(not os.path.isdir("/proc"), reason="no /proc")),
    (["{runs}", "--plot", "{tmp}/r.xyz"], "--plot: matplotlib cannot write .xyz files; it writes "),
])
def test_bad_arguments_one_line_exit_2(runs, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    assert report.main([a.format(tmp=tmp_path, runs=runs) for a in args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("report.py: error:")
    assert message.format(tmp=tmp_path, runs=runs) in err
    assert os.listdir(tmp_path) == ["empty"]  # nothing written


def test_grouping_ignores_fields_that_do_not_change_results(tmp_path):
    """seed, paths, device, eval batch size, and settings switched off by others (AMP's epsilon
    under SGD, Cutout's size without Cutout, step milestones under cosine) do not split groups."""
    base, _ = main.parse_config(["--optimizer", "sgd", "--schedule", "cosine"])
    import dataclasses
    import yaml

    def key(**changes):
        run = tmp_path / f"r{len(os.listdir(tmp_path))}"
        run.mkdir()
        yaml.safe_dump({**dataclasses.asdict(base), **changes}, open(run / "config.yaml", "w"))
        return report.Run(str(run)).key()

    same = key()
    for neutral in [dict(seed=3, name="x", out_dir="elsewhere", device="cuda", workers=0, eval_batch_size=7,
                         data_dir="/d", paper_error=1.0), dict(epsilon=0.1, rho=0.2, gamma=0.5, bn_update="clean"),
                    dict(cutout_size=8, cutout_prob=0.5), dict(milestones=[5], lr_decay=0.5)]:
        assert key(**neutral) == same
    for relevant in [dict(lr=0.05), dict(cutout=True), dict(optimizer="amp"), dict(schedule="step"),
                     dict(epochs=3), dict(precision="bf16")]:
        assert key(**relevant) != same


def test_plot_writes_a_readable_png(runs, tmp_path, capsys):
    path = tmp_path / "curves.png"
    assert report.main([str(runs), "--plot", str(path)]) == 0
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert len(data) > 10_000 and width >= 600 and height >= 300
    if os.environ.get("REPORT_PNG"):  # keep a copy to look at: REPORT_PNG=/tmp/x.png pytest ...
        shutil.copy(path, os.environ["REPORT_PNG"])


def test_plot_holds_a_legend_wider_than_the_panels(runs, tmp_path):
    """A run at the defaults beside one with many settings changed: the label of the second is wider
    than the figure's panels, and the saved image still holds the whole legend (its border is blank)."""
    import matplotlib.pyplot as plt
    import yaml
    many = dict(batch_size=128, clip_norm=5.0, crop_padding=2, cutout=True, cutout_prob=0.5, cutout_size=8,
                dropout=0.3, lr=0.07, lr_decay=0.2, lr_updates_per_epoch=391, milestones=list(range(10, 200, 10)),
                momentum=0.8, weight_decay=0.0005)
    for name, changes in (("plain", {}), ("many", many)):
        shutil.copytree(runs / "a" / "a_s0", tmp_path / "runs" / name)
        config = yaml.safe_load(open(runs / "a" / "a_s0" / "config.yaml"))
        yaml.safe_dump({**config, **changes}, open(tmp_path / "runs" / name / "config.yaml", "w"))
    path = tmp_path / "long.png"
    assert report.main([str(tmp_path / "runs"), "--plot", str(path)]) == 0
    image = plt.imread(path)[..., :3]
    border = [image[0], image[-1], image[:, 0], image[:, -1]]
    assert all((edge == 1).all() for edge in border)  # white: no legend text cut at an edge
    if os.environ.get("REPORT_PNG"):
        shutil.copy(path, os.environ["REPORT_PNG"])


def test_report_imports_without_matplotlib():
    code = "import sys; import report; assert 'matplotlib' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# ----------------------------------------------------------------------------- recipes

def recipe(name, *args, env=None, check=True):
    p = subprocess.run(["bash", os.path.join(ROOT, "recipes", f"{name}.sh"), *args], capture_output=True,
                       text=True, timeout=60, env={**os.environ, **(env or {})})
    assert not check or p.returncode == 0, p.stderr
    return p


def main_argv(line):
    words = shlex.split(line)
    return words[:words.index("main.py")], words[words.index("main.py") + 1:]


@pytest.fixture
def fast_model_check(monkeypatch):
    """parse_config validates the model by building it on the meta device (0.4 s for a PyramidNet):
    build each (name, classes, channels, dropout) once."""
    import functools
    import models
    monkeypatch.setattr(models, "build_model", functools.lru_cache(maxsize=None)(models.build_model))


def test_recipes_dry_run_print_valid_commands_covering_every_config(tmp_path, fast_model_check):
    covered = []
    for name in RECIPES:
        out = str(tmp_path / name)
        lines = recipe(name, env={"DRY_RUN": "1", "SEEDS": "0 1", "OUT": out}).stdout.splitlines()
        assert lines[-1] == f"python report.py {out}"
        configs = {}
        for line in lines[:-1]:
            launcher, argv = main_argv(line)
            assert launcher == ["python"]
            cfg, explicit = main.parse_config(argv)  # the config loads and validates
            stem = os.path.basename(argv[argv.index("--config") + 1])[:-len(".yaml")]
            assert {"seed", "out_dir", "name"} <= explicit
            assert (cfg.out_dir, cfg.name) == (out, f"{stem}_s{cfg.seed}") and cfg.seed in (0, 1)
            configs.setdefault(argv[argv.index("--config") + 1], []).append(cfg.seed)
        assert all(sorted(seeds) == [0, 1] for seeds in configs.values())
        assert len(lines) - 1 == 2 * len(configs)
        covered += configs
    every = glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
    assert sorted(covered) == sorted(os.path.relpath(p, ROOT) for p in every)


def test_recipe_options_launch_only_extra_args_resume(tmp_path):
    env = {"SEEDS": "0", "OUT": str(tmp_path)}
    launch = {"LAUNCH": "torchrun --nproc_per_node 2", **env}
    lines = recipe("rwp_cifar", "--dry-run", "--data_dir", "/data/cifar", env=launch).stdout.splitlines()[:-1]
    for line in lines:  # the paper's parallel RWP under torchrun; SGD and (m-)ARWP in one process
        launcher, argv = main_argv(line)
        parallel = argv[1].endswith("_rwp.yaml")
        assert launcher == (["torchrun", "--nproc_per_node", "2"] if parallel else ["python"])
        assert argv[-2:] == ["--data_dir", "/data/cifar"]
    assert sum(main_argv(line)[0][0] == "torchrun" for line in lines) == 8
    only = recipe("amp_table_b", env={"DRY_RUN": "1", "ONLY": "svhn_wrn28_10", **env}).stdout.splitlines()
    assert len(only) == 7 and all("svhn_wrn28_10" in line for line in only[:-1])
    # every row names its folder and lets main.py continue it (finished: skipped; other settings: refused)
    assert all(main_argv(line)[1][-4:-2] == ["--on_existing", "resume"] for line in lines)


def test_recipe_goes_on_after_a_failed_run_and_stops_on_ctrl_c(tmp_path):
    """A stub launcher instead of python: exit 1 for seed 1 runs, 130 for the Cutout SAM run."""
    log = tmp_path / "calls.txt"
    stub = tmp_path / "stub.sh"
    stub.write_text(f'echo "$@" >> {log}\ncase "$*" in *cutout_sam*) exit 130;; *_s1*) exit 1;; esac\n')
    env = {"LAUNCH": f"bash {stub}", "OUT": str(tmp_path / "runs"), "ONLY": "basic"}
    p = recipe("sam_fashionmnist", env={"SEEDS": "0 1", **env}, check=False)
    calls = log.read_text().splitlines()
    assert len(calls) == 8 and p.returncode == 1 and "4 run(s) failed" in p.stderr
    assert "report.py: error:" in p.stderr  # the report still ran (and found no runs)
    log.unlink()
    p = recipe("sam_fashionmnist", env={"SEEDS": "0", **{**env, "ONLY": "cutout"}}, check=False)
    assert p.returncode == 130 and len(log.read_text().splitlines()) == 3  # amp, rwp, then sam stops it


# ----------------------------------------------------------------------------- malformed folders

@pytest.mark.parametrize("file,text,reason", [
    ("summary.json", "[1, 2]", "summary.json is a list, not an object"),
    ("summary.json", '{"status": "completed", "final_test_error": "5.0", "best_test_error": 4.0}',
     "summary.json: final_test_error is '5.0', not a number"),
    ("summary.json", '{"status": "completed", "final_test_error": null, "best_test_error": 4.0}',
     "summary.json: final_test_error is None, not a number"),
    ("metrics.jsonl", '{"epoch": 1, "test_error": 5}\n[1, 2]\n{"epoch": 2}\n', "metrics.jsonl line 2 is not a row"),
])
def test_a_malformed_run_folder_is_listed_apart_and_the_rest_reported(runs, tmp_path, capsys, file, text, reason):
    bad = tmp_path / "bad"
    shutil.copytree(runs / "b" / "b_s0", bad)
    (bad / file).write_text(text)
    assert report.main([str(runs / "a"), str(bad)]) == 0
    out = capsys.readouterr().out
    assert "| fashionmnist | wrn10_1 | sgd | 3 |" in out  # config A's group is still reported
    assert f"| {bad} | 0 | unreadable ({reason}" in out, out


def test_a_torn_last_metrics_line_of_a_completed_run_is_averaged_with_a_note(runs, tmp_path, capsys):
    for s in (0, 1):
        shutil.copytree(runs / "b" / f"b_s{s}", tmp_path / f"b_s{s}")
    with open(tmp_path / "b_s1" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| sgd | 2 |" in out and f"- {tmp_path / 'b_s1'}: metrics.jsonl: its torn last line" in out, out


def test_a_smoke_test_of_a_recipe_is_never_taken_as_the_rows_result(tmp_path):
    """recipes/X.sh --epochs 1 --model wrn10_1 lands in the real row's folder; the real recipe later
    refuses that folder (naming the settings that differ), runs nothing into it and exits 1."""
    env = {"OUT": str(tmp_path), "ONLY": "basic_sgd", "SEEDS": "0", "OMP_NUM_THREADS": "1"}
    tiny = ["--model", "wrn10_1", "--epochs", "1", "--train_size", "128", "--test_size", "64", "--batch_size", "64",
            "--eval_batch_size", "64"]
    smoke = recipe("sam_fashionmnist", *tiny, env=env, check=False)
    assert smoke.returncode == 0, smoke.stderr
    row = tmp_path / "wrn28_10_basic_sgd_s0"
    before = sorted(os.listdir(row)), (row / "checkpoint.pt").read_bytes()
    real = recipe("sam_fashionmnist", env=env, check=False)
    assert real.returncode == 1 and "1 run(s) failed" in real.stderr
    assert f"{row} holds a run with other settings (train_size=128 there, 0 here; test_size=64 there, 0 here; " \
           f"model='wrn10_1' there, 'sam_wrn28_10' here;" in real.stderr, real.stderr
    assert (sorted(os.listdir(row)), (row / "checkpoint.pt").read_bytes()) == before
    assert "not comparable" in json.load(open(row / "summary.json"))["paper_ref"]


def test_a_malformed_flatness_record_is_left_out(runs, tmp_path, capsys):
    shutil.copytree(runs / "b" / "b_s0", tmp_path / "b_s0")
    (tmp_path / "b_s0" / "flatness.json").write_text("[1, 2]")
    assert report.main([str(tmp_path)]) == 0 and "λ_max" not in capsys.readouterr().out
