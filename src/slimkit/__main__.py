"""``python -m slimkit``: the command line."""

from slimkit.cli import run

run()
