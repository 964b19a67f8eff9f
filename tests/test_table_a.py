"""AMP's Table A cells (configs/amp/tableA_*.yaml: 3 datasets × 2 models × 8 methods) train through
main.main on small data written in the real on-disk formats (CIFAR-10/100 pickles, SVHN .mat files;
tests/realformat.py), each with its config's own model and method settings and only size overrides.

All 48 cells with these sizes took 82 s of CPU (122 s wall, one thread, shared 2-core machine,
2026-12-03; all completed): one VGG16 run alone ~2 s (33.6M parameters, their optimizer step and
checkpoint). So eight of them run here: method i on dataset i mod 3 and model i mod 2,
which covers every method, every dataset, both models and every dataset × model pair (i mod 6).
That all 48 cells exist is checked separately."""
import glob
import itertools
import json
import math
import os

import pytest
import yaml

import main
from realformat import trust_cifar, write_cifar, write_svhn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASETS = ("svhn", "cifar10", "cifar100")
MODELS = ("preactresnet18", "vgg16")
METHODS = ("erm", "amp", "dropout", "smoothing", "flooding", "mixup", "adv", "rmp")
SUBSET = [(DATASETS[i % 3], MODELS[i % 2], method) for i, method in enumerate(METHODS)]
SIZES = ["--epochs", "1", "--train_size", "4", "--test_size", "4", "--batch_size", "4",
         "--eval_batch_size", "4", "--progress_every", "0"]


def config_path(dataset, model, method):
    return os.path.join(ROOT, "configs", "amp", f"tableA_{dataset}_{model}_{method}.yaml")


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """CIFAR-10, CIFAR-100 and SVHN side by side in one folder, as --data_dir expects them."""
    root = tmp_path / "data"
    root.mkdir()
    for hundred in (False, True):
        trust_cifar(monkeypatch, hundred, *write_cifar(str(root), hundred, n_per_file=4)[:3])
    write_svhn(str(root), monkeypatch, sizes=(("train", 4), ("test", 4)))
    return str(root)


def test_table_a_has_exactly_its_48_cells():
    found = sorted(glob.glob(os.path.join(ROOT, "configs", "amp", "tableA_*.yaml")))
    assert found == sorted(config_path(*cell) for cell in itertools.product(DATASETS, MODELS, METHODS))
    assert {cell[0] for cell in SUBSET} == set(DATASETS) and {cell[1] for cell in SUBSET} == set(MODELS)
    assert {cell[:2] for cell in SUBSET} == set(itertools.product(DATASETS, MODELS))


def run_cell(path, data_dir, out_dir):
    """One cell through main.main; the run completed, read our files, recorded a finite test NLL and
    every setting of its config (the paper's numbers are dropped: the sizes changed the setting)."""
    name = os.path.basename(path)[:-len(".yaml")]
    assert main.main(["--config", path, "--data_dir", data_dir, "--out_dir", out_dir, "--name", name]
                     + SIZES) == 0, name
    run = os.path.join(out_dir, name)
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["status"] == "completed" and summary["epochs_completed"] == 1, name
    assert math.isfinite(summary["final_test_nll"]), name
    assert summary["data_read_from"] == data_dir, name
    recorded = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    for key, value in yaml.safe_load(open(path)).items():
        if key == "paper_ref":
            assert recorded[key].startswith(value + " [not comparable"), name
        elif key.startswith("paper_"):
            assert recorded[key] is None, (name, key)
        else:
            assert recorded[key] == value, (name, key)


def test_table_a_cells_train_on_real_format_data(data_dir, tmp_path, one_thread):
    for cell in SUBSET:  # (batches of 4 on a shared 2-core machine: a second thread only spins)
        run_cell(config_path(*cell), data_dir, str(tmp_path / "runs"))
