"""The scan cache in a run: bind each file's code mapping to its cache entry when it
is mapped, plant what the entry knows at once (no fetch fault, no scan, for every
page an earlier run executed), and stage what the run learned when the space ends
(the session stores it all when it ends).

Binding happens while the mapping's pages are either not executable or executable
only by the stopped thread that made it (a fresh image at its exec), so planting them
is as safe as planting a page at its first fetch.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os

from sbe.meta.pagemap import PAGE, PROT_EXEC, PROT_WRITE
from sbe.meta.scancache import key_of
from sbe.patcher.space import Binding

log = logging.getLogger(__name__)


@functools.cache
def maker() -> bytes:
    """A digest of the sources whose output an entry holds (the scanner's decoding,
    the planner's windows, the stub templates and their composition): an entry is
    a function of a mapping's bytes and of this code."""
    digest = hashlib.sha256()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for package in ("scanner", "patcher"):
        directory = os.path.join(root, package)
        for name in sorted(os.listdir(directory)):
            if name.endswith(".py"):
                with open(os.path.join(directory, name), "rb") as f:
                    digest.update(name.encode() + b"\0" + f.read())
    return digest.digest()


def bind(session, thread, start: int, end: int, path: str) -> list[int]:
    """Bind the code mapping [start, end) of `path`; returns the pages planted from
    the cache (the caller makes them executable)."""
    cache, space = session.cache, thread.space
    # Files, and the vDSO (the kernel's, the same for every process); not anonymous
    # code, which a JIT rewrites at will.
    if cache is None or not (path.startswith("/") or path == "[vdso]"):
        return []
    code = space.mem.read_upto(start, end - start)
    binding = Binding(start, start + len(code), key_of(code, maker()), path)
    space.bindings.append(binding)
    entry = cache.load(binding.key)
    if entry is None:
        return []
    planted, pages = session.patcher.apply_cached(space, binding, entry, session.remote(thread),
                                                  session.thread_rips(space), world=session.world(thread))
    session.plant_count(planted)
    log.debug("%s: %d pages from the scan cache", path, len(pages))
    return pages


def runs_of(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted pages as [start, end) runs, one mprotect each."""
    runs: list[tuple[int, int]] = []
    for page in sorted(pages):
        if runs and runs[-1][1] == page:
            runs[-1] = (runs[-1][0], page + PAGE)
        else:
            runs.append((page, page + PAGE))
    return runs


def grant(session, thread, pages: list[int], prot: int) -> None:
    """Make planted pages executable, as a first fetch would."""
    for start, end in runs_of(pages):
        session.protect(thread, start, (prot & ~PROT_WRITE) | PROT_EXEC, end - start)


def save(session, space) -> None:
    """Stage what `space` learned of each bound mapping, for the session's end."""
    if session.cache is None:
        return
    for binding in space.bindings:
        if binding.touched:
            session.cache.stage(space.cache_entry(binding))
            binding.touched.clear()
