"""`python -m models` prints the naming rule and the parameter table of docs/models.md."""
from . import markdown_table

print("Models (`--model NAME`). Besides the table's names, `wrn{depth}_{width}` (AMP's WideResNet),\n"
      "`rwp_wrn{depth}_{width}` (RWP's) and `sam_wrn{depth}_{width}` (the SAM code's) accept any\n"
      "depth = 6n+4 (n >= 1) and width >= 1, e.g. wrn10_1\n"
      "(the tests' model), wrn10_2 (the README quick start), wrn16_8, wrn28_10.\n")
print(markdown_table())
