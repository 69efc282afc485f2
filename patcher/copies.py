"""Copies of patched code: a guest that copies its own code as data copies sbe's
patches with it.

Without protection keys a read of patched code sees the patches (README, known
gaps). A program that copies a page of its code elsewhere and runs the copy then
runs sbe's jumps from the wrong place: their rel32 displacements were computed for
the original address. V8 does this: at start-up it copies node's embedded builtins
(page-aligned in node's `.text`) into its code range, so that JIT code reaches them
with short calls. A cold run has not planted those pages yet when the copy is made;
a warm run has (it plants cached pages before the program starts), and node died of
SIGSEGV in every warm run.

So a fresh page of anonymous code whose bytes are exactly a patched page's, as
they stand, gets that page's original bytes before it is scanned: what the copy
would hold natively. No other bytes can match: a patched page holds rel32
displacements into this run's side caches.
"""
from __future__ import annotations

import hashlib

from sbe.meta.pagemap import PAGE


def undo_copied_patches(space, page: int) -> bool:
    """Give the anonymous page at `page` its source's original bytes if it is a copy
    of a patched page of this space. Returns True when it was one."""
    code = space.mem.read_upto(page, PAGE)
    if len(code) != PAGE or not space.sites:
        return False
    source = _index(space).get(_digest(code))
    if source is None or source == page or space.mem.read_upto(source, PAGE) != code:
        return False
    space.mem.write(page, space.original(source, PAGE))
    return True


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _index(space) -> dict[bytes, int]:
    """The digest of each page that holds sites, as it stands in memory, built again
    whenever the site table changed since."""
    built = space.patched_digests
    if built is not None and built[0] == space.sites.changes:
        return built[1]
    index: dict[bytes, int] = {}
    pages = space.sites.pages()
    run: list[int] = []
    for page in pages + [None]:
        if run and (page is None or page != run[-1] + PAGE):
            data = space.mem.read_upto(run[0], len(run) * PAGE)
            for i, start in enumerate(run):
                chunk = data[i * PAGE:(i + 1) * PAGE]
                if len(chunk) == PAGE:
                    index.setdefault(_digest(chunk), start)
            run = []
        if page is not None:
            run.append(page)
    space.patched_digests = (space.sites.changes, index)
    return index
