"""`python -m streammerge`: the command line."""

from .cli import entry

entry()
