"""List the sites of a program without running it.

The file is scanned as the runtime scans pages (the same scan_region), starting from
its entry point, its function symbols and its unwind table: what `sbe run` would patch
in this file, by module offset.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter


from sbe.meta.site import KINDS
from sbe.monitor.launch import LaunchError, resolve
from sbe.monitor.table import emit, format_table
from sbe.scanner.elf import scan_elf


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("program", metavar="PROGRAM", help="an x86-64 ELF program or shared library")
    parser.add_argument("--kind", action="append", metavar="KIND", choices=KINDS,
                        help="only sites of this kind (repeatable)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--no-sweep", action="store_true",
                        help="recursive descent only, no linear sweep of the gaps")


def run(args) -> int:
    try:
        path = resolve(args.program)
        with open(path, "rb") as f:
            if f.read(2) == b"#!":
                raise LaunchError(f"{args.program}: is a script; scan its interpreter instead", 2)
        sites = scan_elf(path, sweep=not args.no_sweep)
    except LaunchError as e:
        print(f"sbe: {e}", file=sys.stderr)
        return e.status
    except (OSError, ValueError) as e:
        print(f"sbe: {args.program}: cannot scan: {e}", file=sys.stderr)
        return 2
    if args.kind:
        sites = [s for s in sites if s.kind in args.kind]
    if args.format == "json":
        emit(json.dumps({"program": path, "sites": [
            {"offset": s.offset, "kind": s.kind, "insn": f"{s.mnemonic} {s.op_str}".strip(),
             "bytes": s.bytes.hex()} for s in sites]}, indent=1) + "\n")
        return 0
    rows = [(f"{s.offset:#x}", s.kind, f"{s.mnemonic} {s.op_str}".strip(), s.bytes.hex()) for s in sites]
    counts = Counter(s.kind for s in sites)
    summary = f"{len(sites)} sites in {path}: " + (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none")
    emit((format_table(["offset", "kind", "instruction", "bytes"], rows) + "\n" if rows else "") + summary + "\n")
    return 0
