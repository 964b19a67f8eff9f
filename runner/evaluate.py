"""`python main.py --evaluate RUN_DIR [--device auto|cpu|cuda]`: the test loss and error of a run's
last checkpoint on the run's own test set, computed by the evaluation code of training
(runner.training.test_totals: same batches, normalisation, channels_last and autocast), so on the
same device it prints the numbers of the run's last metrics.jsonl row. Nothing is written.
"""
from __future__ import annotations

import argparse

from runner.config import CHOICES, Config, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"--evaluate: {message} (usage: python main.py --evaluate RUN_DIR [--device auto|cpu|cuda])")


def evaluate_run(run_dir: str, device: str = "auto"):
    """(cfg, checkpoint, test loss, test error %, test images read, unreadable test images left out)
    of the last checkpoint in `run_dir`."""
    import dataclasses
    import data_utils
    from runner.loading import load_data, load_run_checkpoint
    from runner.training import autocast_for, build_augment, resolve_device, test_totals
    dev = resolve_device(Config(device=device))
    model, cfg, ckpt = load_run_checkpoint(run_dir, dev)
    if cfg.channels_last:
        import torch
        model = model.to(memory_format=torch.channels_last)
    info = data_utils.DATASETS[cfg.dataset]
    if cfg.dataset == "imagenet":  # streamed from its files, as in training
        import data_folder
        folder = data_folder.FolderData(cfg.data_dir, cfg.train_size, cfg.test_size)
        info = dataclasses.replace(info, num_classes=folder.num_classes, size=cfg.image_size)
        aug = build_augment(cfg, info)
        batches = folder.test_batches(cfg.eval_batch_size, cfg.image_size, aug, device=dev, workers=cfg.workers)
    else:
        x, y = load_data(cfg)
        aug = build_augment(cfg, info)
        batches = data_utils.test_batches(x.to(dev), y.to(dev), cfg.eval_batch_size, aug, device=dev)
    run_cfg = dataclasses.replace(cfg, device=device)
    totals = test_totals(model, batches, dev, cfg.channels_last, autocast_for(run_cfg, dev), info.num_classes)
    loss, wrong, n, wrong5 = totals.tolist()
    bad = folder.bad_test_images if cfg.dataset == "imagenet" else 0  # unreadable, left out
    if n == 0:
        raise data_utils.DataError(f"{cfg.dataset}: no readable test image ({bad} unreadable)")
    return cfg, ckpt, loss / n, 100.0 * wrong / n, int(n), bad


def evaluate_command(argv) -> int:
    p = _Parser(prog="main.py --evaluate", add_help=False)
    p.add_argument("--evaluate", metavar="RUN_DIR", required=True)
    p.add_argument("--device", choices=CHOICES["device"], default="auto")
    args = p.parse_args(argv)
    cfg, ckpt, loss, error, n, bad = evaluate_run(args.evaluate, args.device)
    steps = ckpt.get("partial", {}).get("step", 0)
    at = f"epoch {ckpt['epoch']}/{cfg.epochs}" + (f" + {steps} step(s)" if steps else "")
    print(f"{args.evaluate} (checkpoint after {at}): {cfg.dataset} test set ({n} images"
          + (f"; {bad} unreadable, left out" if bad else "") + "): "
          f"test loss {loss:.4f} err {error:.2f}%")
    return 0
