"""runner.load_run: a run's model and Config from its folder, without guessing build arguments."""
import torch

import main
from runner.config import UsageError
from runner.loading import load_data, load_run
from test_main import TINY

import pytest


def test_load_run_gives_the_trained_model_and_its_config(tmp_path):
    out = tmp_path / "runs"
    assert main.main([*TINY, "--epochs", "1", "--optimizer", "sgd", "--out_dir", str(out), "--name", "r"]) == 0
    before = sorted(p.name for p in (out / "r").iterdir())
    model, cfg = load_run(str(out / "r"))
    assert cfg.model == "wrn10_1" and cfg.test_size == 128 and not model.training
    saved = torch.load(out / "r" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    x, y = load_data(cfg)
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.uint8 and len(y) == 128
    assert sorted(p.name for p in (out / "r").iterdir()) == before  # nothing written


def test_load_run_of_a_folder_without_checkpoint_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="has no checkpoint.pt"):
        load_run(str(tmp_path))
    with pytest.raises(UsageError, match="is not a run folder"):
        load_run(str(tmp_path / "nope"))
