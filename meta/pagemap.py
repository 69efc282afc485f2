"""Per-page state of guest code: which pages the guest wants executable, which of
those have been scanned, and what each scan learned.

A page the guest maps executable is kept non-executable until scanned (scan before
execute): its first fetch faults, the monitor scans it and only then grants execute.
"""
from __future__ import annotations

from array import array

from sbe.meta.record import Record

PAGE = 4096
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000


def page_of(address: int) -> int:
    return address & ~(PAGE - 1)


def pages_in(start: int, end: int) -> range:
    return range(page_of(start), end, PAGE)


class PageState(Record):
    """One code page's life: tracked (the guest mapped it executable) -> entries
    learned while it is unscanned (`add_entry`) -> scanned (`learn`, again for each
    extension scan) -> back to unscanned (`reset`: its code changed or its patches
    moved) or untracked (unmapped, made non-executable)."""
    __slots__ = ("prot", "scanned", "_starts", "_cached", "_known", "entries", "roots", "targets", "exits")

    def __init__(self, prot: int, scanned: bool = False, starts=None, entries=None, roots=None,
                 targets=None, exits=None) -> None:
        self.prot = prot                        # what the guest asked for (incl. PROT_EXEC)
        self.scanned = scanned
        self._starts: set = set() if starts is None else starts     # instruction starts found so far
        # The scan cache record (meta.scancache.PageRecord) whose starts are not made
        # addresses yet, and the mapping's base its offsets count from: most cached
        # pages of a warm run are never asked for all their starts.
        self._cached: tuple | None = None
        self._known: array | None = None     # see known_array
        self.entries: set = set() if entries is None else entries   # learned before the page was scanned
        # Every entry a scan started from: control arrives there, so no window may
        # cover one.
        self.roots: set = set() if roots is None else roots
        self.targets: set = set() if targets is None else targets   # landing points the code reveals
        self.exits: set = set() if exits is None else exits         # entries it gives other pages

    @property
    def starts(self) -> set:
        if self._cached is not None:
            base, record = self._cached
            self._cached = None
            self._starts.update(map(base.__add__, record.starts))
        return self._starts

    def known_array(self) -> array:
        """The starts as the C scan takes them (an array, in any order, repeats
        allowed): kept, and extended as scans add starts, since every extension
        scan of a page hands over all of its thousand, and building the array each
        time was half of such a scan's cost."""
        if self._known is None:
            self._known = array("Q", self.starts)
        return self._known

    def has_start(self, address: int) -> bool:
        """`address in self.starts`, without making the cached starts addresses."""
        if address in self._starts:
            return True
        return self._cached is not None and self._cached[1].has_start(address - self._cached[0])

    def learn_cached(self, base: int, record) -> None:
        """A scan cache record of the page (offsets relative to `base`) is applied:
        as `learn` from it, its starts kept as the record has them."""
        moved = base.__add__
        self.learn(set(map(moved, record.roots)), (), set(map(moved, record.targets)),
                   set(map(moved, record.exits)))
        self._known = None
        if self._cached is not None or self._starts:
            self._starts.update(map(moved, record.starts))
        else:
            self._cached = (base, record)

    def add_entry(self, address: int) -> None:
        self.entries.add(address)

    def learn(self, entries, starts, targets, exits=()) -> None:
        """A scan from `entries` decoded `starts`, revealing `targets`, and `exits`
        into other pages."""
        self.scanned = True
        self.entries.clear()
        self.roots |= entries
        if starts:
            self.starts.update(starts)
            if self._known is not None:
                self._known.extend(starts)
        self.targets |= targets
        self.exits |= set(exits)

    def arrived(self, address: int) -> None:
        """Control reached `address` (a validated indirect branch target): it is a
        root, for later windows and for the runs the scan cache serves."""
        self.roots.add(address)

    def drop_starts(self, false) -> None:
        """Starts a later scan showed to lie inside real instructions."""
        self.starts.difference_update(false)
        self._known = None

    def reset(self) -> None:
        self.scanned = False
        self._cached = self._known = None
        for learned in (self._starts, self.entries, self.roots, self.targets, self.exits):
            learned.clear()

    def copy(self) -> "PageState":
        twin = PageState(self.prot, self.scanned, set(self._starts), set(self.entries),
                         set(self.roots), set(self.targets), set(self.exits))
        twin._cached = self._cached     # never changed in place: shared as it is
        return twin


class PageMap:
    """The tracked code pages of one address space, by page address.

    A forked child's map shares the parent's PageStates until either side asks for
    one (copy on access, as the kernel copies pages on write): a shell forks a
    thousand subshells, each with hundreds of pages and thousands of starts, and
    most subshells touch a few of them before they exit."""

    def __init__(self) -> None:
        self._pages: dict[int, PageState] = {}
        self._shared: set[int] = set()    # pages whose state another map holds too

    def _state(self, page: int) -> PageState | None:
        if page in self._shared:
            self._shared.discard(page)
            self._pages[page] = self._pages[page].copy()
        return self._pages.get(page)

    def track(self, start: int, end: int, prot: int) -> None:
        for page in pages_in(start, end):
            self._pages[page] = PageState(prot)
            self._shared.discard(page)

    def untrack(self, start: int, end: int) -> list[int]:
        gone = [p for p in pages_in(start, end) if p in self._pages]
        for p in gone:
            del self._pages[p]
            self._shared.discard(p)
        return gone

    def get(self, address: int) -> PageState | None:
        return self._state(page_of(address))

    def tracked_in(self, start: int, end: int) -> list[int]:
        if (end - start) // PAGE < len(self._pages):
            return [p for p in pages_in(start, end) if p in self._pages]
        return sorted(p for p in self._pages if start <= p < end)

    def add_entry(self, address: int) -> None:
        """Execution will reach `address`: a scan of its page starts there too."""
        state = self._state(page_of(address))
        if state is not None and not state.scanned:
            state.add_entry(address)

    def mark_scanned(self, page: int) -> None:
        """A page known to hold nothing reachable (the vDSO's headers and data)."""
        self._state(page).scanned = True

    def __contains__(self, page: int) -> bool:
        return page in self._pages

    def __len__(self) -> int:
        return len(self._pages)

    def copy(self) -> "PageMap":
        twin = PageMap()
        twin._pages = dict(self._pages)
        twin._shared = set(self._pages)
        self._shared = set(self._pages)
        return twin
