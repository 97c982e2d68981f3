"""``python -m grank`` runs the CLI (used where the console script is not on PATH)."""

from grank.cli import main

main()
