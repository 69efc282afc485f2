"""Plain aligned text tables for the subcommands' reports, and writing them out.

Aligned columns without box drawing, like `ps`, so the output stays greppable and
`cut`-able.
"""
from __future__ import annotations

import os
import sys

GAP = "  "


def format_table(headers, rows, align=None) -> str:
    """The table as lines of text, without a trailing newline.

    `headers` None leaves out the header line (for a list of facts, say). `align` is
    one "<" or ">" per column; without it a column whose cells are all numbers is
    right-aligned, so digits of the same weight line up. A None cell is blank.
    """
    width = len(headers) if headers is not None else len(rows[0]) if rows else 0
    for row in rows:
        if len(row) != width:
            raise ValueError(f"row has {len(row)} cells, the table has {width} columns: {row!r}")
    if align is None:
        align = [">" if _numeric([row[i] for row in rows]) else "<" for i in range(width)]
    elif len(align) != width or any(a not in "<>" for a in align):
        raise ValueError(f"align must be one '<' or '>' per column, not {align!r}")
    text = [["" if c is None else str(c) for c in row] for row in rows]
    if headers is not None:
        text.insert(0, [str(h) for h in headers])
    widths = [max((len(line[i]) for line in text), default=0) for i in range(width)]
    return "\n".join(
        GAP.join(f"{cell:{a}{w}}" for cell, a, w in zip(line, align, widths)).rstrip()
        for line in text
    )


def _numeric(cells) -> bool:
    present = [c for c in cells if c is not None]
    return bool(present) and all(
        isinstance(c, (int, float)) and not isinstance(c, bool) for c in present)


def emit(text: str) -> None:
    """Write `text` to stdout now.

    A reader that stops early (`sbe sites F | head -1`) closes the pipe; the write then
    fails with BrokenPipeError, which propagates for the dispatcher to turn into exit
    status 141. Stdout is pointed at /dev/null first: whatever stayed in its buffer
    would make the interpreter's final flush fail again and print a warning.
    """
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise
