"""Commands of ``grank features`` owned by this module (added to the group in features.py)."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
