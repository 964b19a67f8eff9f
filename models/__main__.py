"""`python -m models` prints the parameter table of docs/models.md."""
from . import markdown_table

print(markdown_table())
