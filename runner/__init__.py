"""The runner behind main.py: config (Config and its parsing), records (run folder, checkpoints,
logs), training (optimizer, schedule, closure, the loop) and loading (a finished run's model).

`runner.load_run(RUN_DIR) -> (model, config)` is the documented one-call loader; it is imported
on first use, so `import runner.scaler` alone needs nothing else from the runner (`pip install .`
installs only this file and scaler.py, next to amp.py, rwp.py and sam.py).
"""


def __getattr__(name):
    if name in ("load_run", "load_data"):
        from runner import loading
        return getattr(loading, name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")
