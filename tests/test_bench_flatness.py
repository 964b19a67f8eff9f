"""bench.py flatness: both Hessian-vector product modes timed and agreeing, JSON written; bad
arguments are one line and exit code 2."""
import json

import bench


def test_flatness_mode_times_both_modes_and_they_agree(tmp_path, capsys):
    path = tmp_path / "f.json"
    assert bench.main_cli(["flatness", "--samples", "6", "--batch_size", "4", "--repeats", "1",
                           "--device", "cpu", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["parameters"] > 70_000 and report["samples"] == 6
    assert report["max_relative_difference"] < 1e-5
    for mode in ("graph", "recompute"):
        assert report["modes"][mode]["ms"] > 0
    out = capsys.readouterr().out
    assert "| graph |" in out and "| recompute |" in out


def test_flatness_mode_bad_arguments_are_one_line(capsys):
    for argv in (["--model", "nope"], ["--samples", "0"], ["--dataset", "nope"], ["--bogus"]):
        assert bench.main_cli(["flatness", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bench.py: error: ") and err.count("\n") == 1, err
