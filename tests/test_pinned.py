"""The pinned run (tests/pinned_run.py): the quick start shrunk to seconds gives exactly the metrics
pinned in tests/pinned_run.json. When a change is meant to move them: `python tests/pinned_run.py
--update`, and re-measure README's quick-start figure in the same commit."""
import json
import os

import pytest

from conftest import FASHION_DIR
import pinned_run


def test_pinned_run_gives_the_pinned_metrics():
    with open(pinned_run.PIN) as f:
        pinned = json.load(f)
    if not os.path.isdir(FASHION_DIR):
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the Debian package dataset-fashion-mnist ({FASHION_DIR})")
        pytest.skip("needs the Debian package dataset-fashion-mnist (CI installs it)")
    got = pinned_run.run()
    assert got["environment"]["threads"] == 1  # ENV reached torch in the child
    diff = pinned_run.differences(pinned, got)
    assert not diff, ("the pinned run moved; if the change is meant to move it, run `python tests/pinned_run.py "
                      "--update` and re-measure README's quick start in the same commit:\n" + "\n".join(diff))


def test_differences_name_each_moved_metric_and_the_environment():
    row = {"epoch": 1, "train_loss": 1.5, "train_error": 50.0, "test_loss": 1.0, "test_error": 30.0}
    pinned = {"metrics": [row], "environment": {"torch": "2.14.1", "cpu_capability": "AVX2", "threads": 1}}
    same = {"metrics": [dict(row)], "environment": {"torch": "2.15.0", "cpu_capability": "AVX2", "threads": 1}}
    assert pinned_run.differences(pinned, same) == []  # equal metrics: another torch is not a difference
    moved = {"metrics": [{**row, "test_error": 30.1}], "environment": same["environment"]}
    assert pinned_run.differences(pinned, moved) == ["epoch 1 test_error: pinned 30.0, got 30.1",
                                                     "environment torch: pinned '2.14.1', here '2.15.0'"]
