from monitor.cli import _entry

_entry()
