"""The runner behind main.py: config (Config and its parsing), records (run folder, checkpoints,
logs) and training (optimizer, schedule, closure, the loop)."""
