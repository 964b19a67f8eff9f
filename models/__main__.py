"""`python -m models` prints the naming rule and the parameter table of docs/models.md.

It takes no arguments (-h/--help print the same); any other is one line on stderr and exit 2. A reader
that stops early (`python -m models | head`) ends it quietly, exit 0."""
import os
import sys

from . import markdown_table

if sys.argv[1:] and sys.argv[1:] not in (["-h"], ["--help"]):
    print(f"python -m models: error: it takes no arguments, got {' '.join(sys.argv[1:])[:80]!r}; it prints "
          f"every model name with its size (then use --model NAME)", file=sys.stderr)
    sys.exit(2)
try:
    print("Models (`--model NAME`). Besides the table's names, `wrn{depth}_{width}` (AMP's WideResNet),\n"
          "`rwp_wrn{depth}_{width}` (RWP's) and `sam_wrn{depth}_{width}` (the SAM code's) accept any\n"
          "depth = 6n+4 (n >= 1) and width >= 1, e.g. wrn10_1\n"
          "(the tests' model), wrn10_2 (the README quick start), wrn16_8, wrn28_10.\n")
    print(markdown_table(), flush=True)
except BrokenPipeError:  # (Python would print a traceback when it flushes stdout at exit)
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
