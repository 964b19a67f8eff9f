"""flatness.py across runs: test error and gap from the run folders, Kendall τ per measure, scatter."""
import json

import pytest

from runner import flatness_across as across
from runner.flatness_plots import fmt


def _runs(tmp_path, errors, lam, sam):
    rows = []
    for i, (e, l, s) in enumerate(zip(errors, lam, sam)):
        d = tmp_path / f"r{i}"
        d.mkdir()
        if i == 0:                                                   # no summary.json yet: last metrics row
            (d / "metrics.jsonl").write_text(json.dumps({"test_error": e + 5}) + "\n" + json.dumps({"test_error": e}) + "\n")
        else:
            (d / "summary.json").write_text(json.dumps({"final_test_error": e}))
        rows.append({"run_dir": str(d), "optimizer": "sgd" if i % 2 else "sam", "error": 1.0, "loss": 0.1 * i,
                     "hessian_top_eigenvalues": [l, l / 2], "sam_sharpness": s})
    return rows


def test_kendall_tau_and_gap_per_measure(tmp_path):
    rows = _runs(tmp_path, [10.0, 12.0, 15.0, 11.0], [1.0, 2.0, 3.0, 4.0], [0.4, 0.3, 0.2, 0.1])
    across.add_targets(rows)
    assert [r["test_error"] for r in rows] == [10.0, 12.0, 15.0, 11.0]
    assert rows[2]["gap"] == 14.0
    corr = {(c["measure"], c["target"]): c for c in across.correlations(rows)}
    # λ_max order 1<2<3<4 against errors 10,12,15,11: concordant pairs 4, discordant 2 → τ = 2/6
    assert corr[("lambda_max", "test_error")]["tau"] == pytest.approx(1 / 3)
    assert corr[("sam_sharpness", "test_error")]["tau"] == pytest.approx(-1 / 3)
    assert corr[("lambda_max", "gap")]["n"] == 4 and ("hessian_trace", "test_error") not in corr
    text = across.markdown(across.correlations(rows), fmt)
    assert "| λ_max | 4 | 0.33 (" in text and "| SAM sharpness | 4 | -0.33 (" in text
    assert across.scatter(rows, tmp_path / "c.png") and (tmp_path / "c.png").stat().st_size > 10_000


def test_fewer_than_three_runs_give_no_correlation(tmp_path):
    rows = _runs(tmp_path, [10.0, 12.0], [1.0, 2.0], [0.4, 0.3])
    across.add_targets(rows)
    assert across.correlations(rows) == []
    (tmp_path / "r1" / "summary.json").write_text("not json")
    assert across.test_error(str(tmp_path / "r1")) is None
