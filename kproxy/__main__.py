"""``python -m kproxy`` runs the command line."""

from kproxy.cli import console

console()
