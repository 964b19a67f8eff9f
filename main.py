"""Train a model with SGD, AMP, RWP, SAM or ASAM and log its test error next to the paper's.

    python main.py [--config configs/x.yaml] [--flag value ...]

Settings come from one dataclass, `Config`: defaults in code → YAML file → command-line flags,
each layer overriding the one before. Every run writes `runs/<name>/` (see README.md).

Exit codes: 0 done; 1 runtime failure (loss became NaN/inf, crash); 2 invalid input (flag, config,
value, path, missing data) with one line on stderr; 130/143 stopped by SIGINT/SIGTERM.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time

from runner.config import EXIT_RUNTIME, EXIT_USAGE, Config, UsageError, _parser, check_launch, parse_config
from runner.progress import Progress, TensorBoardLog, require_tensorboard
from runner.records import RunLog, finished, git_commit, make_run_dir, resume_config, write_summary, write_text
from runner.training import STOP, Diverged, Trainer


def train(cfg: Config, explicit: set, argv) -> int:
    import torch
    ckpt = None
    if cfg.resume:
        cfg, ckpt, run_dir = resume_config(cfg, explicit)
        if ckpt["epoch"] == cfg.epochs and "partial" not in ckpt and finished(run_dir):
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"{run_dir} has finished all {cfg.epochs} epochs; nothing to resume (its records are unchanged)")
            return 0
    check_launch(cfg, explicit)
    if cfg.tensorboard:
        require_tensorboard()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    missing = []  # out_dir and its ancestors that do not exist yet (removed again if nothing is written)
    path = os.path.abspath(cfg.out_dir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    if world > 1:
        run_dir = run_dir if cfg.resume else None
    else:
        run_dir = cfg.resume or make_run_dir(cfg)
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir or "", ckpt)
        if world > 1:  # rank 0 creates the folder, everyone learns its name
            import torch.distributed as dist
            box = [run_dir or (make_run_dir(cfg) if rank0 else None)]
            dist.broadcast_object_list(box, 0)
            run_dir = trainer.run_dir = box[0]
    except BaseException:
        if not cfg.resume and run_dir and rank0 and not os.listdir(run_dir):
            os.rmdir(run_dir)  # nothing written: leave nothing behind
            for folder in missing:
                if os.path.isdir(folder) and not os.listdir(folder):
                    os.rmdir(folder)
        raise
    log = RunLog(run_dir, rank0)
    if not cfg.resume and rank0:
        import yaml
        write_text(os.path.join(run_dir, "config.yaml"), yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        write_text(os.path.join(run_dir, "command.txt"), " ".join(["python", "main.py", *argv]) + "\n")
        write_text(os.path.join(run_dir, "git_commit.txt"), git_commit() + "\n")
    if rank0:  # metrics.jsonl = history of the checkpoint (drops rows of an epoch that was not saved)
        write_text(os.path.join(run_dir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in trainer.history))
    n_params = sum(p.numel() for p in trainer.model.parameters())
    log.line(("resumed" if cfg.resume else "started") + f" {run_dir}: {cfg.dataset} (from {trainer.data_source}) {cfg.model} "
             f"({n_params:,} params) {cfg.optimizer} on {trainer.device}"
             + (f" ×{world} ranks" if world > 1 else "") + f", {cfg.epochs} epochs from epoch {trainer.start_epoch + 1}")
    if cfg.precision == "fp16" and trainer.device.type == "cpu":
        log.line("note: fp16 on a CPU is slow where the CPU has no fp16 convolutions (a wrn10_1 step at batch 50 took 12 s "
                 "instead of 0.07 s on our 2-core machine); bf16 is the fast low-precision mode on CPUs")
    STOP.install()
    status, message, code = "completed", "", 0
    train_time = sum(r["epoch_time_s"] for r in trainer.history)
    images_total = sum(r.get("images", 0) for r in trainer.history)
    done_steps = (trainer.resume_partial or {}).get("step", 0)
    progress = Progress(total=trainer.steps_per_epoch * (cfg.epochs - trainer.start_epoch) - done_steps,
                        steps_per_epoch=trainer.steps_per_epoch, epochs=cfg.epochs,
                        done=trainer.steps_per_epoch * trainer.start_epoch + done_steps, active=rank0,
                        images_per_step=cfg.batch_size * len(trainer.loaders) * world, every_s=cfg.progress_every)
    board = TensorBoardLog(run_dir, trainer.start_epoch) if cfg.tensorboard and rank0 else None
    signum, partial = 0, None
    # (epoch, step) of the checkpoint on disk; None before the first one
    saved = (trainer.start_epoch, (trainer.resume_partial or {}).get("step", 0)) if cfg.resume else None

    def saved_at():
        if saved is None:
            return "none yet (start the run again)"
        epoch, step = saved
        return f"epoch {epoch}" + (f" + {step} step(s) of epoch {epoch + 1}" if step else "")

    try:
        for epoch in range(trainer.start_epoch, cfg.epochs):
            partial, trainer.resume_partial = trainer.resume_partial, None  # a mid-epoch checkpoint's
            t0 = time.time() - (partial["time_s"] if partial else 0.0)
            lr = partial["lr"] if partial else trainer.optimizer.param_groups[0]["lr"]
            result = trainer.train_epoch(epoch, progress, partial)
            if result is None:  # stopped mid-epoch: save the steps done, to finish the epoch later
                partial = dict(trainer.partial, lr=lr, time_s=time.time() - t0)
                if rank0:
                    trainer.save_checkpoint(epoch, partial)
                saved, signum = (epoch, partial["step"]), trainer.stop_signal
                break
            partial = None
            train_loss, train_error, images = result
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            epoch_time = time.time() - t0
            test_loss = test_error = None
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                test_loss, test_error = trainer.evaluate()
            row = {"epoch": epoch + 1, "train_loss": train_loss, "train_error": train_error,
                   "test_loss": test_loss, "test_error": test_error, "lr": lr,
                   "epoch_time_s": round(epoch_time, 3), "images": images}
            if trainer.scaler is not None:  # fp16: steps skipped for overflow, the loss scale now
                row.update(skipped_steps=trainer.scaler.pop_skipped(), loss_scale=trainer.scaler.scale.item())
            trainer.history.append(row)
            if rank0:
                trainer.save_checkpoint(epoch + 1)
                log.metrics(row)
                if board is not None:
                    board.add(row)
            saved = epoch + 1, 0
            test = f"test loss {test_loss:.4f} err {test_error:.2f}%" if test_error is not None else "test -"
            log.line(f"epoch {epoch + 1}/{cfg.epochs}  train loss {train_loss:.4f} err {train_error:.2f}%  "
                     f"{test}  lr {lr:.4g}  {epoch_time:.1f}s")
            train_time += epoch_time
            images_total += images
            if epoch + 1 < cfg.epochs:  # (a signal after the last epoch's work changes nothing)
                signum = trainer.agree()[0]
                if signum:
                    STOP.escalate = False
                    break
        if signum:
            status, code = "interrupted", 128 + signum
            message = f"stopped by signal {signum}; saved after {saved_at()}; resume with --resume {run_dir}"
    except Diverged as e:
        status, message, code = "diverged", f"{e}; last good checkpoint: {saved_at()}", EXIT_RUNTIME
    except KeyboardInterrupt:  # a second signal (or Ctrl-C) while a step ran: no agreement, no save
        status, code = "interrupted", 128 + (STOP.hard or signal.SIGINT)
        message = f"interrupted; last checkpoint: {saved_at()}" + (f"; resume with --resume {run_dir}" if saved else "")
    finally:
        STOP.escalate = False  # from here on, signals wait for the records to be written
        progress.close()
        if board is not None:
            board.close()
    if rank0:
        write_summary(run_dir, cfg, trainer.history, status, message, train_time, images_total,
                      trainer.wall_time(), data_read_from=trainer.data_source)
    if message:
        log.line(message, err=code != 0)
    if status == "completed":
        tested = [r for r in trainer.history if r["test_error"] is not None]
        final = tested[-1]["test_error"] if tested else float("nan")
        best = min(tested, key=lambda r: r["test_error"]) if tested else None
        paper = (f"  (paper: {cfg.paper_error:.2f}" + (f" ± {cfg.paper_spread:g}" if cfg.paper_spread is not None else "")
                 + f", {cfg.paper_ref})") if cfg.paper_error is not None else f"  ({cfg.paper_ref})" * bool(cfg.paper_ref)
        log.line(f"final test error {final:.2f}%{paper}; best {best['test_error']:.2f}% at epoch {best['epoch']} "
                 f"(best-epoch error is picked on the test set)" if best else "no evaluation")
    if world > 1:
        import torch.distributed as dist
        if not STOP.hard:  # the ranks agreed on the outcome: leave together, after rank 0 wrote
            dist.barrier()           # (torchrun stops the others as soon as one rank exits non-zero)
        dist.destroy_process_group()
    return code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        _parser().print_help()
        return 0
    try:
        if "--evaluate" in argv:  # a finished run's test error; writes nothing
            from runner.evaluate import evaluate_command
            return evaluate_command(argv)
        cfg, explicit = parse_config(argv)
        return train(cfg, explicit, argv)
    except Exception as e:
        from data_utils import DataError
        if not isinstance(e, (UsageError, DataError)):
            raise
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # under torchrun every rank finds it; one per node says it
            print(f"main.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
