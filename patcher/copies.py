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
    if space.patched_pages is None:
        space.patched_pages = PatchedPages()
    source = space.patched_pages.updated(space).get(_digest(code))
    if source is None or source == page or space.mem.read_upto(source, PAGE) != code:
        return False
    space.mem.write(page, space.original(source, PAGE))
    return True


class PatchedPages:
    """The digest of each page that holds sites, as it stands in memory, kept up to
    date page by page: only the pages whose sites changed since are read again
    (a warm node run looks here at every fresh page of JIT code, 1,500 pages each
    time when the index was rebuilt whole: 12 ms a look)."""

    def __init__(self) -> None:
        self._of_page: dict[int, bytes] = {}
        self._by_digest: dict[bytes, int] = {}

    def updated(self, space) -> dict[bytes, int]:
        """digest -> page, for the pages of `space` that hold sites."""
        for page in space.sites.take_touched():
            old = self._of_page.pop(page, None)
            if old is not None and self._by_digest.get(old) == page:
                del self._by_digest[old]
            if not space.sites.in_range(page, page + PAGE):
                continue
            chunk = space.mem.read_upto(page, PAGE)
            if len(chunk) == PAGE:
                digest = self._of_page[page] = _digest(chunk)
                self._by_digest.setdefault(digest, page)
        return self._by_digest


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()
