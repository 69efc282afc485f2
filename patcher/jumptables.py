"""Whether a table jump the scanner recognised (scanner.jumptable) may run unchecked
in this address space, and keeping it true while the guest runs.

The proof has two halves. The table must be memory the guest cannot change: a
private mapping of a file, not writable in the guest's view (sbe's own memory, the
branch table among it, is anonymous, so it never qualifies). And every entry must be
code sbe scans before it runs: a known instruction start no window covers, or a place
in a page not scanned yet, which faults before it runs and is then scanned from there
(the entry is recorded for that scan). The scanner makes most entries known starts
itself: it scans from them (Patcher._scan_one), as it scans from a direct branch's
target.

Either half can stop holding. An mprotect, mmap, munmap or mremap over a table
demotes the sites that trust it (invalidated); a page holding entries that goes back
to unscanned gets them back as entries, and one that is dropped demotes the sites
that jump there. Residual: a write that needs no permission (through
`/proc/self/mem`, which ignores page protections, or to the mapped file itself) can
change a table unseen, as it can change code unseen.
"""
from __future__ import annotations

import struct
from functools import partial

from sbe.meta.pagemap import PROT_WRITE, page_of, pages_in
from sbe.scanner.decode import decode_one
from sbe.scanner.jumptable import ENTRY, TableJump, shape_at


def shapes(code: bytes, base: int, is_start, sites):
    """(site, shape) for each branch site among `sites` ((insn, kind) pairs) that is a
    proved shape (scanner.jumptable), in a page whose original bytes from `base` on
    are `code`, its starts as `is_start` knows them."""
    for insn, kind in sites:
        if kind == "branch":
            shape = shape_at(insn, is_start, partial(decode_one, code, base), base)
            if shape is not None:
                yield insn, shape


def _read(space, start: int, end: int) -> frozenset[int]:
    return frozenset(struct.unpack(f"<{(end - start) // ENTRY}Q", space.mem.read(start, end - start)))


def targets(space, shape: TableJump) -> frozenset[int] | None:
    """Where the jump can go, read from its table, or None when the guest could
    change the table (the first half of the proof)."""
    mapping = space.modules.mapping_at(shape.table)
    if (mapping is None or shape.end > mapping.end or "w" in mapping.perms or not mapping.perms.endswith("p")
            or not mapping.path.startswith("/") or mapping.path.endswith(" (deleted)")):
        return None
    for page in pages_in(page_of(shape.table), shape.end):
        state = space.pages.get(page)
        if state is not None and state.prot & PROT_WRITE:
            return None
    return _read(space, shape.table, shape.end)


def prove(space, page: int, is_start, shape: TableJump) -> frozenset[int] | None:
    """The jump's targets when it may run unchecked from a stub in `page` (whose
    starts `is_start` knows, the scan under way included), else None. Targets in pages
    not scanned yet are recorded there as entries."""
    found = targets(space, shape)
    if found is None:
        return None
    later = []
    for target in found:
        state = space.pages.get(target)
        if state is None or space.in_cache(target):
            return None
        if page_of(target) == page:
            known = is_start(target)
        elif state.scanned:
            known = state.has_start(target)
        else:
            later.append(target)
            continue
        if not known or space.window_around(target) is not None:
            return None
    for target in later:
        space.pages.add_entry(target)
    return found


def register(space, site) -> None:
    """`site` now runs its table jump unchecked: what it trusts is kept, for when its
    table or its targets' pages change."""
    space.tables[site.address] = _read(space, *site.patch.table)


def _trusting(space):
    """(site, its patch's table, its targets) for every planted table jump."""
    for address, found in list(space.tables.items()):
        site = space.sites.get(address)
        if site is None or site.patch is None or not site.patch.table:
            del space.tables[address]
            continue
        yield site, site.patch.table, found


def invalidated(patcher, space, start: int, end: int, pages: list[int], untrack: bool, bytes_change: bool,
                world=None) -> None:
    """[start, end) may change (unless not `bytes_change`: only patches move), and
    `pages`, the tracked code pages in it, went back to unscanned (or away, when
    `untrack`): demote the table jumps that trust what changes, and give the pages
    back the entries the others jump to. `world`: as for Patcher.scan."""
    dropped = set(pages)
    for site, (lo, hi), found in list(_trusting(space)):
        moved = [t for t in found if page_of(t) in dropped]
        if (bytes_change and lo < end and start < hi) or (moved and untrack):
            if world is not None:
                world()
                world = None
            patcher.demote(space, site, "jump table may change" if lo < end and start < hi
                           else "jump table target unmapped")
            del space.tables[site.address]
            continue
        for target in moved:
            space.pages.add_entry(target)
