"""Print a site table saved by `sbe run --sites-out FILE`.

Reads only the file, never a process, so a table can be studied, filtered and compared
long after the run; json and csv give the same rows to other tools.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import sys
from collections import Counter

from sbe.meta.site import KINDS, STRATEGIES
from sbe.meta.sitesfile import FIELDS, SitesFileError, load
from sbe.monitor.table import emit, format_table

SORT_KEYS = {
    "address": lambda r: (r["address"], r["pid"]),
    "hits": lambda r: (-r["hits"], r["address"], r["pid"]),
    "kind": lambda r: (KINDS.index(r["kind"]), r["address"], r["pid"]),
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="a file written by `sbe run --sites-out`")
    # No argparse `choices` for --kind: a bad value gets sbe's one-line error, not usage.
    parser.add_argument("--kind", action="append", metavar="KIND",
                        help=f"only sites of this kind (repeatable): {', '.join(KINDS)}")
    parser.add_argument("--module", metavar="SUBSTRING",
                        help="only sites in modules whose path contains SUBSTRING")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table")
    parser.add_argument("--sort", choices=tuple(SORT_KEYS), default="address",
                        help="order of the rows (hits: most hit first)")


def run(args) -> int:
    for kind in args.kind or ():
        if kind not in KINDS:
            return _fail(f"unknown kind {kind!r} for --kind (kinds: {', '.join(KINDS)})")
    try:
        doc = load(args.file)
    except SitesFileError as e:
        return _fail(str(e))
    rows = [r for r in doc["sites"]
            if (not args.kind or r["kind"] in args.kind)
            and (args.module is None or args.module in r["module"])]
    rows.sort(key=SORT_KEYS[args.sort])
    if args.format == "json":
        emit(json.dumps(rows, indent=2) + "\n")
    elif args.format == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(FIELDS), extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        emit(out.getvalue())
    else:
        emit(_report(doc, rows))
    return 0


def _report(doc: dict, rows: list[dict]) -> str:
    lines = [f"program: {shlex.join(doc['program'])} (mode {doc['mode']})"]
    if rows:
        lines.append(_table(rows))
    lines.append(_summary(rows, len(doc["sites"])))
    return "\n".join(lines) + "\n"


def _table(rows: list[dict]) -> str:
    # The pid only tells rows apart when the run had several processes, and most sites
    # have no reason; columns that would say nothing are left out.
    with_pid = len({r["pid"] for r in rows}) > 1
    with_reason = any(r["reason"] for r in rows)
    with_stub = any(r["strategy"] == "jmp5" for r in rows)
    headers = ["address", "module+offset", "kind", "instruction", "bytes", "strategy", "hits"]
    align = "><<<<<>"
    if with_pid:
        headers.insert(0, "pid")
        align = ">" + align
    if with_stub:
        headers += ["window", "stub"]
        align += "<<"
    if with_reason:
        headers.append("reason")
        align += "<"
    table = []
    for r in rows:
        cells = [f"{r['address']:#x}", _where(r), r["kind"], r["insn"],
                 bytes.fromhex(r["bytes"]).hex(" "), r["strategy"], r["hits"]]
        if with_pid:
            cells.insert(0, r["pid"])
        if with_stub:
            jmp5 = r["strategy"] == "jmp5"
            window = f"{r['window_start']:#x}-{r['window_end']:#x}" if jmp5 else ""
            if jmp5 and r["island"]:
                window += f" via {r['island']:#x}"
            elif r["tactic"] in ("guard", "slot", "table"):
                window += f" {r['tactic']}"
            cells += [window,
                      f"{r['stub']:#x}" if jmp5 else ""]
        if with_reason:
            cells.append(r["reason"])
        table.append(cells)
    return format_table(headers, table, align)


def _where(row: dict) -> str:
    if not row["module"]:
        return "-"
    return f"{os.path.basename(row['module'])}+{row['offset']:#x}"


def _summary(rows: list[dict], total: int) -> str:
    if len(rows) == total:
        count = f"{total} site" if total == 1 else f"{total} sites"
    else:
        count = f"{len(rows)} of {total} sites"
    if not rows:
        return count
    kinds = _tally(Counter(r["kind"] for r in rows), KINDS, "{n} {name}")
    strategies = _tally(Counter(r["strategy"] for r in rows), STRATEGIES, "{name} {n}")
    return f"{count}: {kinds}; strategies: {strategies}"


def _tally(counts: Counter, order: tuple, shape: str) -> str:
    ranked = sorted(counts.items(), key=lambda item: (-item[1], order.index(item[0])))
    return ", ".join(shape.format(n=n, name=name) for name, n in ranked)


def _fail(message: str) -> int:
    print(f"sbe: {message}", file=sys.stderr)
    return 2
