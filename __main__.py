"""`python -m sbe`: the same command as the `sbe` console script."""
from sbe.monitor.cli import _entry

_entry()
