"""Train a model with SGD, AMP, RWP, SAM or ASAM and log its test error next to the paper's.

    python main.py [--config configs/x.yaml] [--flag value ...]

Settings come from one dataclass, `Config`: defaults in code → YAML file → command-line flags,
each layer overriding the one before. Every run writes `runs/<name>/` (see README.md).

Exit codes: 0 done; 1 runtime failure (loss became NaN/inf, crash); 2 invalid input (flag, config,
value, path, missing data) with one line on stderr; 130/143 stopped by SIGINT/SIGTERM.
"""
from __future__ import annotations

if __name__ == "__main__":  # Ctrl-C while the modules below load: one line, exit 130
    from runner.signals import exit_on_interrupt
    exit_on_interrupt("main.py")

import dataclasses
import json
import os
import shlex
import signal
import sys
import time

from runner.config import EXIT_RUNTIME, EXIT_USAGE, Config, UsageError, _parser, check_launch, parse_config
from runner import rundir
from runner.progress import Progress, TensorBoardLog, require_tensorboard
from runner.records import RunLog, git_commit, resume_config, write_error, write_summary, write_text
from runner.signals import STOP
from runner.training import Diverged, SaveFailed, Trainer, init_distributed


def write_start_records(cfg: Config, run_dir, argv, trainer, world, new):
    """config.yaml (what runs: rewritten on resume, with any device/data_dir change), command.txt
    and git_commit.txt (new runs), metrics.jsonl = the checkpoint's history (drops rows of an epoch
    that was not saved)."""
    import yaml
    write_text(os.path.join(run_dir, "config.yaml"), yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    if new:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        launcher = ["python"] if world == 1 else ["torchrun", "--nnodes", str(world // local), "--nproc_per_node", str(local)]
        write_text(os.path.join(run_dir, "command.txt"), shlex.join([*launcher, "main.py", *argv]) + "\n")
        write_text(os.path.join(run_dir, "git_commit.txt"), git_commit() + "\n")
    write_text(os.path.join(run_dir, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in trainer.history))


def start_run(cfg: Config, explicit: set, argv):
    """Settle the run folder (new, resumed, or nothing to do: runner/rundir.py decides), build the
    Trainer (bad values and data are refused before any folder exists), write the start records and
    the first log line: (cfg, trainer, run_dir, log), or the exit code when there is nothing to train."""
    import torch
    if cfg.tensorboard:
        require_tensorboard()
    rank0 = int(os.environ.get("RANK", "0")) == 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_launch(cfg, explicit)
    action, run_dir = rundir.open_run(cfg, start_group=lambda: init_distributed(cfg))
    ckpt = nothing_to_do = None
    if action == "done":
        nothing_to_do = run_dir
    elif action == "resume":  # (whole: a recipe's row, every setting must agree)
        cfg, ckpt, nothing_to_do = resume_config(cfg, explicit, run_dir, whole=not cfg.resume)
    if nothing_to_do:
        if rank0:
            print(nothing_to_do)
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return 0
    check_launch(cfg, explicit)
    trainer = Trainer(cfg, run_dir or "", ckpt)
    trainer.run_dir = run_dir = rundir.created(cfg, run_dir)  # (a new one: rank 0 creates it now)
    log = RunLog(run_dir, rank0)
    if rank0:
        try:
            rundir.claim(run_dir)
            write_start_records(cfg, run_dir, argv, trainer, world, new=ckpt is None)
        except OSError as e:  # a full disk before the first epoch: nothing to save yet
            print(f"main.py: error: {write_error(e.filename or run_dir, e, 0)}", file=sys.stderr)
            return EXIT_RUNTIME
    n_params = sum(p.numel() for p in trainer.model.parameters())
    steps = (trainer.resume_partial or {}).get("step", 0)  # of a mid-epoch checkpoint
    log.line(("resumed" if cfg.resume else "started") + f" {run_dir}: {cfg.dataset} (from {trainer.data_source}) {cfg.model} "
             f"({n_params:,} params) {cfg.optimizer} on {trainer.device}"
             + (f" ×{world} ranks" if world > 1 else "") + f", {cfg.epochs} epoch{'s' * (cfg.epochs != 1)} from epoch "
             f"{trainer.start_epoch + 1}" + (f" (its first {steps} step(s) done)" if steps else ""))
    for note in trainer.notes:
        log.line(note)
    if cfg.precision == "fp16" and trainer.device.type == "cpu":
        log.line("note: fp16 on a CPU is slow where the CPU has no fp16 convolutions (a wrn10_1 step at batch 50 took 12 s "
                 "instead of 0.07 s on our 2-core machine); bf16 is the fast low-precision mode on CPUs")
    return cfg, trainer, run_dir, log


def epoch_row(trainer, cfg: Config, epoch: int, result, lr: float, epoch_time: float) -> dict:
    """The metrics.jsonl row of a finished epoch (0-based `epoch`; `result` = train loss, error,
    images), evaluating the model first on evaluation epochs (every eval_every-th and the last)."""
    train_loss, train_error, images = result
    test_loss = test_error = test_error5 = criterion_loss = None
    bad_images = trainer.bad_images()
    if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
        test_loss, test_error, test_error5 = trainer.evaluate()
        criterion_loss = trainer.test_criterion_loss
    row = {"epoch": epoch + 1, "train_loss": train_loss, "train_error": train_error,
           "test_loss": test_loss, "test_criterion_loss": criterion_loss,  # NLL; the training criterion
           "test_error": test_error, "test_error_top5": test_error5, "lr": lr,
           "epoch_time_s": round(epoch_time, 3), "images": images}
    if bad_images is not None:  # folder data: unreadable images replaced this epoch
        row["bad_images"] = bad_images
        if test_error is not None:  # ... and left out of this evaluation
            row["bad_test_images"] = trainer.bad_test_images
    if trainer.scaler is not None:  # fp16: steps skipped for overflow, the loss scale now
        row.update(skipped_steps=trainer.scaler.pop_skipped(), loss_scale=trainer.scaler.scale.item())
    return row


def final_line(cfg: Config, history) -> str:
    """The last log line of a completed run: final and best test error, next to the paper's."""
    tested = [r for r in history if r["test_error"] is not None]
    if not tested:
        return "no evaluation"
    best = min(tested, key=lambda r: r["test_error"])
    paper = (f"  (paper: {cfg.paper_error:.2f}" + (f" ± {cfg.paper_spread:g}" if cfg.paper_spread is not None else "")
             + f", {cfg.paper_ref})") if cfg.paper_error is not None else f"  ({cfg.paper_ref})" * bool(cfg.paper_ref)
    return (f"final test error {tested[-1]['test_error']:.2f}%{paper}; best {best['test_error']:.2f}% at epoch "
            f"{best['epoch']} (best-epoch error is picked on the test set)")


def train(cfg: Config, explicit: set, argv) -> int:
    import torch
    started = start_run(cfg, explicit, argv)
    if isinstance(started, int):
        return started
    cfg, trainer, run_dir, log = started
    rank0 = int(os.environ.get("RANK", "0")) == 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    STOP.install()
    from data_utils import DataError  # (torch is loaded by now)
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
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            row = epoch_row(trainer, cfg, epoch, result, lr, time.time() - t0)
            trainer.history.append(row)
            if rank0:
                trainer.save_checkpoint(epoch + 1)
                log.metrics(row)
                if board is not None:
                    board.add(row)
            saved = epoch + 1, 0
            test = (f"test loss {row['test_loss']:.4f} err {row['test_error']:.2f}% top-5 {row['test_error_top5']:.2f}%"
                    if row["test_error"] is not None else "test -")
            unreadable = ", ".join(f"{row[k]} {what}" for k, what in (("bad_images", "unreadable training images replaced"),
                                   ("bad_test_images", "unreadable test images left out")) if row.get(k))
            log.line(f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f} err {row['train_error']:.2f}%  "
                     f"{test}  lr {lr:.4g}  {row['epoch_time_s']:.1f}s" + (f"  ({unreadable})" if unreadable else ""))
            train_time += row["epoch_time_s"]
            images_total += row["images"]
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
    except DataError as e:  # the data went bad mid-run (a run of unreadable files): stop, keep the checkpoint
        status, code = "failed", EXIT_RUNTIME
        mend = "restore the unreadable files (training files may also be deleted)"
        message = f"{e}; " + (f"last checkpoint: {saved_at()}; {mend}, then --resume {run_dir}" if saved
                              else f"no checkpoint yet; {mend}, then start the run again")
        if not rank0 and not getattr(e, "agreed", False):  # this rank alone found it (in training):
            print(f"main.py: error: rank {trainer.rank}: {message}", file=sys.stderr)  # torchrun stops the rest
    except SaveFailed as e:  # disk full or failing: stop here, the last checkpoint stays as it was
        status, code = "failed", EXIT_RUNTIME
        message = f"{e}; " + (f"the last checkpoint ({saved_at()}) is intact: make room, then --resume {run_dir}"
                              if saved else "no checkpoint yet; make room, then start the run again")
    except KeyboardInterrupt:  # a second signal (or Ctrl-C) while a step ran: no agreement, no save
        status, code = "interrupted", 128 + (STOP.hard or signal.SIGINT)
        message = f"interrupted; last checkpoint: {saved_at()}" + (f"; resume with --resume {run_dir}" if saved else "")
    finally:
        STOP.escalate = False  # from here on, signals wait for the records to be written
        progress.close()
        if board is not None:
            board.close()
    if rank0:
        try:
            write_summary(run_dir, cfg, trainer.history, status, message, train_time, images_total,
                          trainer.wall_time(), world, trainer.rwp_mode, data_read_from=trainer.data_source,
                          **({"data": trainer.folder.fingerprint} if trainer.folder is not None else {}))
        except OSError as e:
            message += f"; summary.json could not be written either ({e.strerror})"
    if message:
        log.line(message, err=code != 0)
    if status == "completed":
        log.line(final_line(cfg, trainer.history))
    if world > 1:
        import torch.distributed as dist
        if not STOP.hard and status != "failed":  # the ranks agreed on the outcome: leave together, after rank 0 wrote
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
    except KeyboardInterrupt:  # Ctrl-C before training began (in a step, train() saves and returns)
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print("main.py: interrupted while starting; no checkpoint was written", file=sys.stderr)
        return 128 + signal.SIGINT
    except rundir.LockLost as e:  # another process may write the folder now: write nothing more
        print(f"main.py: error: {e}", file=sys.stderr)
        return EXIT_RUNTIME
    except Exception as e:
        from data_utils import DataError
        if not isinstance(e, (UsageError, DataError)):
            raise
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # under torchrun every rank finds it; one per node says it
            print(f"main.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        rundir.release()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (from here on, main() handles Ctrl-C)
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # (while Python imported the modules above)
        sys.exit(128 + signal.SIGINT)
