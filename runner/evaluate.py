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
        raise UsageError(f"--evaluate: {message} (usage: python main.py --evaluate RUN_DIR [--device auto|cpu|cuda] "
                         "[--data_dir DIR])")


def evaluate_run(run_dir: str, device: str = "auto", data_dir: str | None = None) -> dict:
    """The last checkpoint in `run_dir` on the run's test set (from `data_dir` when given: the same
    data moved; a folder dataset whose classes or files differ is refused): {cfg, ckpt, loss, error,
    error_top5 (%), images (read), bad (unreadable test images left out)}."""
    import dataclasses
    import data_utils
    from runner.loading import load_data, load_run_checkpoint
    from runner.training import autocast_for, build_augment, check_data, resolve_device, test_totals
    dev = resolve_device(Config(device=device))
    model, cfg, ckpt = load_run_checkpoint(run_dir, dev)
    if data_dir is not None:
        cfg = dataclasses.replace(cfg, data_dir=data_dir)
    if cfg.channels_last:
        import torch
        model = model.to(memory_format=torch.channels_last)
    info = data_utils.DATASETS[cfg.dataset]
    folder = None
    if cfg.dataset == "imagenet":  # streamed from its files, as in training
        import data_folder
        folder = data_folder.FolderData(cfg.data_dir, cfg.train_size, cfg.test_size)
        check_data(cfg.data_dir, ckpt.get("data"), folder.fingerprint, resume=False)
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
    bad = folder.bad_test_images if folder is not None else 0  # unreadable, left out
    if n == 0:
        raise data_utils.DataError(f"{cfg.dataset}: no readable test image ({bad} unreadable)")
    return dict(cfg=cfg, ckpt=ckpt, loss=loss / n, error=100.0 * wrong / n, error_top5=100.0 * wrong5 / n,
                images=int(n), bad=bad)


def evaluate_command(argv) -> int:
    p = _Parser(prog="main.py --evaluate", add_help=False)
    p.add_argument("--evaluate", metavar="RUN_DIR", required=True)
    p.add_argument("--device", choices=CHOICES["device"], default="auto")
    p.add_argument("--data_dir", help="where the run's data is now (default: the run's data_dir)")
    args = p.parse_args(argv)
    r = evaluate_run(args.evaluate, args.device, args.data_dir)
    cfg, ckpt = r["cfg"], r["ckpt"]
    steps = ckpt.get("partial", {}).get("step", 0)
    at = f"epoch {ckpt['epoch']}/{cfg.epochs}" + (f" + {steps} step(s)" if steps else "")
    print(f"{args.evaluate} (checkpoint after {at}): {cfg.dataset} test set ({r['images']} images"
          + (f"; {r['bad']} unreadable, left out" if r["bad"] else "") + "): "
          f"test loss {r['loss']:.4f} err {r['error']:.2f}% top-5 {r['error_top5']:.2f}%")
    return 0
