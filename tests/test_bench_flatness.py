"""bench.py flatness: our two Hessian-vector product modes and PyHessian's two products timed side
by side and agreeing (PyHessian 0.1 is a test dependency: the README's set-up line), JSON written;
bad arguments and a missing PyHessian are one line and exit code 2."""
import json
import sys

import pytest
import torch

import bench


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny ops on a shared 2-core machine are far slower with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_flatness_mode_times_both_modes_and_they_agree(tmp_path, capsys):
    path = tmp_path / "f.json"
    assert bench.main_cli(["flatness", "--samples", "6", "--batch_size", "4", "--repeats", "1",
                           "--device", "cpu", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["parameters"] > 70_000 and report["samples"] == 6
    assert set(report["methods"]) == {"graph", "recompute"}
    for method in ("graph", "recompute"):
        assert report["methods"][method]["ms"] > 0 and report["methods"][method]["difference"] < 1e-5
    out = capsys.readouterr().out
    assert "| graph |" in out and "| recompute |" in out


def test_our_products_equal_pyhessians(tmp_path, capsys):
    """The same H·v as PyHessian's single-batch and data-loader products on the same model and data."""
    path = tmp_path / "f.json"
    assert bench.main_cli(["flatness", "--model", "small_cnn", "--samples", "12", "--batch_size", "5",
                           "--repeats", "2", "--device", "cpu", "--pyhessian", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["parameters"] == 2178
    methods = report["methods"]
    assert set(methods) == {"graph", "recompute", "pyhessian_batch", "pyhessian_loader"}
    assert all(m["difference"] < 1e-5 for m in methods.values()), methods
    assert methods["pyhessian_batch"]["ratio"] == 1.0 and methods["graph"]["ratio"] > 0
    assert "| pyhessian_loader |" in capsys.readouterr().out


def test_flatness_mode_bad_arguments_are_one_line(capsys, monkeypatch):
    for argv in (["--model", "nope"], ["--samples", "0"], ["--dataset", "nope"], ["--bogus"]):
        assert bench.main_cli(["flatness", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bench.py: error: ") and err.count("\n") == 1, err
    monkeypatch.setitem(sys.modules, "pyhessian", None)            # not installed
    assert bench.main_cli(["flatness", "--pyhessian"]) == 2
    err = capsys.readouterr().err
    assert "pip install pyhessian" in err and err.count("\n") == 1, err
