"""The `sbe` command: parses the command line and dispatches to one subcommand module.

Each subcommand lives in its own `monitor/cmd_<name>.py` with `configure(parser)` and
`run(args) -> int`; this file only wires them together, the way rr's main does.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from sbe import __version__

SUBCOMMANDS = {
    "run": "run a program under sbe",
    "sites": "print a saved site table",
    "scan": "list the sites of a program without running it",
    "doctor": "check what this machine supports (ptrace, seccomp, PKU, CPUID/TSC faulting)",
    "cache": "list, check or clear the scan cache",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser, with only the chosen subcommand's module imported and configured
    (the first word of `argv` that names one): a
    subcommand's imports (capstone, cffi) cost tens of milliseconds that
    `sbe --help` or another subcommand should not pay."""
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    parser = argparse.ArgumentParser(
        prog="sbe",
        description="Scan-before-execute virtualizer: runs an unmodified x86-64 Linux "
        "program with its sensitive instructions and indirect branches virtualized.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, help_text in SUBCOMMANDS.items():
        if name != chosen:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(f"sbe.monitor.cmd_{name}")
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip().splitlines()[0])
        module.configure(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return args._module.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 141


def _entry() -> None:
    logging.basicConfig(format="sbe: %(message)s")
    sys.exit(main())


if __name__ == "__main__":
    _entry()
