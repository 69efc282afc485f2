"""Per-page state of guest code: which pages the guest wants executable, which of
those have been scanned, and what each scan learned.

A page the guest maps executable is kept non-executable until scanned (scan before
execute): its first fetch faults, the monitor scans it and only then grants execute.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PAGE = 4096
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4


def page_of(address: int) -> int:
    return address & ~(PAGE - 1)


def pages_in(start: int, end: int) -> range:
    return range(page_of(start), end, PAGE)


@dataclass
class PageState:
    prot: int                                  # what the guest asked for (incl. PROT_EXEC)
    scanned: bool = False
    starts: set = field(default_factory=set)   # instruction starts found so far
    entries: set = field(default_factory=set)  # entries learned before the page was scanned
    roots: set = field(default_factory=set)    # every entry a scan started from: control
                                               # arrives there, so no window may cover one
    targets: set = field(default_factory=set)  # landing points the decoded code reveals

    def copy(self) -> "PageState":
        return PageState(self.prot, self.scanned, set(self.starts), set(self.entries),
                         set(self.roots), set(self.targets))


class PageMap:
    def __init__(self) -> None:
        self.pages: dict[int, PageState] = {}

    def track(self, start: int, end: int, prot: int) -> None:
        for page in pages_in(start, end):
            self.pages[page] = PageState(prot)

    def untrack(self, start: int, end: int) -> list[int]:
        gone = [p for p in pages_in(start, end) if p in self.pages]
        for p in gone:
            del self.pages[p]
        return gone

    def get(self, address: int) -> PageState | None:
        return self.pages.get(page_of(address))

    def tracked_in(self, start: int, end: int) -> list[int]:
        if (end - start) // PAGE < len(self.pages):
            return [p for p in pages_in(start, end) if p in self.pages]
        return sorted(p for p in self.pages if start <= p < end)

    def add_entry(self, address: int) -> None:
        state = self.pages.get(page_of(address))
        if state is not None and not state.scanned:
            state.entries.add(address)

    def __len__(self) -> int:
        return len(self.pages)

    def copy(self) -> "PageMap":
        twin = PageMap()
        twin.pages = {p: s.copy() for p, s in self.pages.items()}
        return twin
