"""Load a finished (or stopped) run for analysis: its Config and its model with the last weights.

    from runner.loading import load_run          # or: from runner import load_run
    model, cfg = load_run("runs/quickstart")      # eval mode, on the CPU
    x, y = load_data(cfg)                         # the run's own data, as uint8 tensors

The model comes from the run's `checkpoint.pt` (checked like a resume: a foreign or edited file
is one UsageError) and is built with the run's own `models.build_model` arguments, so nothing has
to be guessed. Nothing in the run folder is changed.
"""
from __future__ import annotations


from runner.config import Config, UsageError
from runner.records import check_config_file, read_checkpoint  # noqa: F401  (also part of this module's API)


def load_run(run_dir: str, device="cpu"):
    """(model, cfg): the run's model with the weights of its last checkpoint, in eval mode on
    `device`, and its Config (the one saved in the checkpoint, i.e. what actually ran)."""
    model, cfg, _ = load_run_checkpoint(run_dir, device)
    return model, cfg


def load_run_checkpoint(run_dir: str, device="cpu"):
    """(model, cfg, checkpoint dict) of load_run; the checkpoint says how far the run got
    (`epoch`, and `partial` when saved mid-epoch)."""
    import torch
    import data_utils
    import models
    ckpt, cfg = read_checkpoint(run_dir)
    info = data_utils.DATASETS[cfg.dataset]
    classes = info.num_classes
    if cfg.dataset == "imagenet":  # the class count came from the train folders: the classifier's rows
        matrices = [v for v in ckpt["model"].values() if torch.is_tensor(v) and v.dim() == 2]
        classes = matrices[-1].shape[0] if matrices else classes
    model = models.build_model(cfg.model, classes, info.channels, dropout=cfg.dropout)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UsageError(f"{run_dir}: checkpoint does not fit model {cfg.model} ({str(e).splitlines()[0][:200]})") from None
    check_config_file(run_dir, cfg, resume=False)  # (as a resume does: a checkpoint copied from another run)
    return model.to(torch.device(device)).eval(), cfg, ckpt


def load_data(cfg: Config, train: bool = False):
    """The run's own data set (its train_size/test_size subset) as uint8 images and int64 labels."""
    import data_utils
    size = cfg.train_size if train else cfg.test_size
    if cfg.dataset == "imagenet":
        raise UsageError("imagenet is streamed from its files, not loaded whole: "
                         "data_folder.FolderData(cfg.data_dir) lists them, its test_batches() streams val")
    return data_utils.load_dataset(cfg.dataset, cfg.data_dir, train, False, size, cfg.seed)
