"""Inspect and manage the scan cache: what earlier runs scanned, kept by content.

`list` shows one entry a line (the file it came from, its size, pages and sites,
when a run last used it), `stats` the totals, `verify` checks every entry (exit 1
if any is broken: a run would ignore it and scan afresh), `clear` removes them all.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from sbe.meta.scancache import ScanCache, default_directory
from sbe.monitor.table import emit, format_table


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("list", "stats", "verify", "clear"), help="what to do")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="the cache (default $SBE_CACHE_DIR, else $XDG_CACHE_HOME/sbe, else ~/.cache/sbe)")
    p.add_argument("--format", choices=("table", "json"), default="table")


def rows(cache: ScanCache) -> list[dict]:
    out = []
    for key, st in reversed(cache.files()):
        entry, why = cache.inspect(key)
        out.append({
            "key": key, "module": entry.path if entry else None, "bytes": st.st_size,
            "pages": len(entry.pages) if entry else None,
            "sites": sum(len(p.sites) for p in entry.pages.values()) if entry else None,
            "last_used": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_atime)),
            "valid": entry is not None, "problem": why or None,
        })
    return out


def run(args) -> int:
    directory = args.cache_dir or default_directory()
    cache = ScanCache(directory)
    if not cache.usable:
        print(f"sbe: {directory}: not a cache directory sbe can use (see -v of sbe run)", file=sys.stderr)
        return 2
    if args.action == "clear":
        files = cache.files()
        for key, _ in files:
            cache.remove(key)
        return _report(args, {"directory": directory, "removed": len(files)},
                       f"removed {len(files)} entries from {directory}\n")
    entries = rows(cache)
    if args.action == "list":
        if args.format == "json":
            emit(json.dumps({"directory": directory, "entries": entries}, indent=1) + "\n")
        else:
            emit(format_table(["module", "bytes", "pages", "sites", "last used", "key"],
                              [[e["module"] or f"(broken: {e['problem']})", e["bytes"], e["pages"],
                                e["sites"], e["last_used"], e["key"][:12]] for e in entries]) + "\n")
        return 0
    broken = [e for e in entries if not e["valid"]]
    if args.action == "verify":
        _report(args, {"directory": directory, "entries": len(entries), "broken": broken},
                "".join(f"broken: {e['key']}: {e['problem']}\n" for e in broken)
                + f"{len(entries) - len(broken)} of {len(entries)} entries valid\n")
        return 1 if broken else 0
    total = sum(e["bytes"] for e in entries)
    summary = {"directory": directory, "entries": len(entries), "broken": len(broken), "bytes": total,
               "limit": cache.limit, "pages": sum(e["pages"] or 0 for e in entries),
               "sites": sum(e["sites"] or 0 for e in entries)}
    return _report(args, summary, format_table(None, [[k, v] for k, v in summary.items()]) + "\n")


def _report(args, doc: dict, text: str) -> int:
    emit(json.dumps(doc, indent=1) + "\n" if args.format == "json" else text)
    return 0

