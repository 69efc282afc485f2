"""The saved site table: what `sbe run --sites-out FILE` leaves for `sbe sites` to read.

The file outlives the run that wrote it and may come from an older sbe, a run that was
killed, or a user's editor, so `load` trusts nothing and says in one line what is wrong
and where; `save` replaces the file in one rename so a reader never sees half of it.

Layout (JSON, one site per line so the file greps and diffs by site):

    {"format": "sbe-sites", "version": 3, "program": [argv...], "mode": "emulate"|"patch",
     "sites": [row, ...]}

Version 2 added the row field `island`; a version 1 file reads as if each row had
`"island": 0` (version 1 had no islands). Version 3 added `tactic` (how the window
was found, scanner.window.Window.tactic; "" for an int3); older files read with "".

A row is `Site.to_record()` plus `"pid"`, the process the site was in: a site is keyed
by its address only within one address space, and a run may span several.
"""
from __future__ import annotations

import json
import re

from sbe.meta.files import replace_atomically
from sbe.meta.site import KINDS, STRATEGIES

FORMAT = "sbe-sites"
VERSION = 3
READS = (1, 2, 3)
MODES = ("emulate", "patch")

# Row fields and their JSON types, in the order tools print them (the CSV column order).
FIELDS = {
    "pid": int,
    "address": int,
    "module": str,
    "offset": int,
    "kind": str,
    "insn": str,
    "bytes": str,
    "size": int,
    "strategy": str,
    "tactic": str,
    "reason": str,
    "hits": int,
    "window_start": int,
    "window_end": int,
    "island": int,
    "stub": int,
}
# Fields later versions added: the version each came in, and its value before.
ADDED = {"island": (2, 0), "tactic": (3, "")}

# What bytes.hex() writes: at least one byte, no separators (fromhex would allow spaces).
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")


class SitesFileError(Exception):
    """A sites file that cannot be used; the message is one line fit for the user."""


def save(path: str, program: list[str], mode: str, rows: list[dict]) -> None:
    """Write the site table to `path`, replacing any file there.

    The document is checked with the reader's rules first, so a bug in the writer shows
    up in the run that has it, not later as a file `sbe sites` refuses.
    """
    doc = {"format": FORMAT, "version": VERSION, "program": list(program), "mode": mode,
           "sites": list(rows)}
    _check(doc, path)
    head = json.dumps({k: v for k, v in doc.items() if k != "sites"})[:-1]
    body = ",\n".join(json.dumps(row) for row in doc["sites"])
    text = f'{head}, "sites": [\n{body}\n]}}\n'
    replace_atomically(path, text.encode("utf-8"))


def load(path: str) -> dict:
    """The document in `path`, checked field by field; raises SitesFileError."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise SitesFileError(f"{path}: cannot read: {e.strerror}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise SitesFileError(f"{path}: not a sites file (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise SitesFileError(f"{path}: not JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    _check(doc, path)
    for name, (version, value) in ADDED.items():
        if doc["version"] < version:
            for row in doc["sites"]:
                row[name] = value
    return doc


def _check(doc, path: str) -> None:
    problem = _doc_problem(doc)
    if problem:
        raise SitesFileError(f"{path}: {problem}")


def _doc_problem(doc) -> str:
    if not isinstance(doc, dict):
        return f"not a sites file (the top level is {_json_type(doc)}, not an object)"
    if "format" not in doc:
        return "not a sites file (no 'format' field)"
    if doc["format"] != FORMAT:
        return f"not a sites file (format is {doc['format']!r}, expected {FORMAT!r})"
    version = doc.get("version")
    if version not in READS or not _is_int(version):
        return f"unsupported version {version!r} (this sbe reads versions {', '.join(map(str, READS))})"
    program = doc.get("program")
    if not isinstance(program, list) or not all(isinstance(a, str) for a in program):
        return "'program' must be a list of strings"
    if doc.get("mode") not in MODES:
        return f"mode is {doc.get('mode')!r}, expected one of {', '.join(MODES)}"
    sites = doc.get("sites")
    if not isinstance(sites, list):
        return f"'sites' must be a list, not {_json_type(sites)}"
    for number, row in enumerate(sites, 1):
        problem = _row_problem(row, version)
        if problem:
            return f"row {number} of {len(sites)}: {problem}"
    return ""


def _row_problem(row, version: int) -> str:
    if not isinstance(row, dict):
        return f"is {_json_type(row)}, not an object"
    for name, kind in FIELDS.items():
        if name in ADDED and version < ADDED[name][0]:
            continue
        if name not in row:
            return f"missing field {name!r}"
        value = row[name]
        if kind is int:
            if not _is_int(value):
                return f"field {name!r} is {_json_type(value)}, expected an integer"
            if value < 0:
                return f"field {name!r} is negative ({value})"
        elif not isinstance(value, str):
            return f"field {name!r} is {_json_type(value)}, expected a string"
    if not _HEX.fullmatch(row["bytes"]):
        return f"field 'bytes' is not hex ({row['bytes']!r})"
    if row["kind"] not in KINDS:
        return f"unknown kind {row['kind']!r} (expected one of {', '.join(KINDS)})"
    if row["strategy"] not in STRATEGIES:
        return f"unknown strategy {row['strategy']!r} (expected one of {', '.join(STRATEGIES)})"
    return ""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
