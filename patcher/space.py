"""The patcher: applies scan results to one live address space and undoes them.

Duties, and when they run:
- scan a page at its first fetch (or extend a scanned page when execution reaches an
  offset no scan has seen), turn each site into a Site with its original bytes, and
  plant it (an `int3` in emulate mode);
- give the original bytes of any range (what the guest image holds under the patches);
- invalidate a range before the guest changes it (original bytes back, sites dropped,
  pages back to unscanned);
- restore every patch, leaving code byte-identical to the unpatched image.

Writing single `int3` bytes needs no stop of the other threads: a one-byte store is
atomic, and a fresh page is non-executable while it is planted.
"""
from __future__ import annotations

import time

from meta.module import ModuleMap, parse_maps
from meta.pagemap import PAGE, PageMap, page_of
from meta.site import Site, SiteTable
from scanner.decode import decode_from
from scanner.region import scan_page

INT3 = b"\xcc"
MAX_INSN = 15


class AddressSpace:
    def __init__(self, mem, pid: int) -> None:
        self.mem = mem
        self.pid = pid
        self.sites = SiteTable()
        self.pages = PageMap()
        self.users: set[int] = set()
        self._modules: ModuleMap | None = None
        self.scan_seconds = 0.0
        self.pages_scanned = 0
        self.swept = 0

    def fork(self, mem, pid: int) -> "AddressSpace":
        """The state of a child whose memory is a copy of this one's."""
        twin = AddressSpace(mem, pid)
        twin.sites = self.sites.copy()
        twin.pages = self.pages.copy()
        return twin

    # -- modules ---------------------------------------------------------------
    def maps_changed(self) -> None:
        self._modules = None

    @property
    def modules(self) -> ModuleMap:
        if self._modules is None:
            with open(f"/proc/{self.pid}/maps") as f:
                self._modules = ModuleMap(parse_maps(f.read()))
        return self._modules

    # -- bytes -----------------------------------------------------------------
    def original(self, address: int, size: int) -> bytes:
        """Guest bytes with every patch in the range undone."""
        data = bytearray(self.mem.read_upto(address, size))
        for site in self.sites.in_range(address - MAX_INSN, address + len(data)):
            for i, b in enumerate(site.original[:1] if site.strategy == "int3" else site.original):
                j = site.address + i - address
                if 0 <= j < len(data):
                    data[j] = b
        return bytes(data)

    # -- scanning and planting -------------------------------------------------
    def scan(self, address: int) -> list[Site]:
        """Scan (or extend the scan of) the page holding `address`, from `address`
        and the entries learned for that page; plant what it finds. Entries found
        for other pages are recorded there, or extend those pages if already scanned."""
        new_sites: list[Site] = []
        work = [address]
        while work:
            target = work.pop()
            state = self.pages.get(target)
            if state is None:
                continue
            page = page_of(target)
            entries = {target} if state.scanned else state.entries | {target}
            if state.scanned and target in state.starts:
                continue
            t0 = time.perf_counter()
            code = self.original(page, PAGE + MAX_INSN)
            result = scan_page(code, page, entries, known=state.starts, sweep=not state.scanned)
            self.scan_seconds += time.perf_counter() - t0
            if not state.scanned:
                self.pages_scanned += 1
            state.scanned = True
            state.entries.clear()
            state.starts |= result.starts
            self.swept += result.swept
            for insn, kind in result.sites:
                if insn.address in self.sites:
                    continue
                module, offset = self.modules.locate(insn.address)
                site = Site(insn.address, insn.size, kind, insn.mnemonic, insn.op_str,
                            code[insn.address - page:insn.address - page + insn.size],
                            strategy="int3", reason="emulate mode", module=module, offset=offset)
                self.plant(site)
                new_sites.append(site)
            for out in result.outside:
                other = self.pages.get(out)
                if other is None:
                    continue
                if other.scanned:
                    if out not in other.starts:
                        work.append(out)
                else:
                    other.entries.add(out)
        return new_sites

    def knows(self, address: int) -> bool:
        """True when execution may reach `address` without a scan first: it is a
        known instruction start, or its page will fault before it runs."""
        state = self.pages.get(address)
        return state is None or not state.scanned or address in state.starts

    def overlaps(self, address: int) -> bool:
        """True when `address` lies strictly inside an instruction a scan decoded:
        a trap planted there would corrupt that instruction."""
        state = self.pages.get(address)
        if state is None:
            return False
        for start in range(address - 1, address - MAX_INSN, -1):
            if start in state.starts:
                insn = next(decode_from(self.original(start, MAX_INSN), start, start), None)
                return insn is not None and start + insn.size > address
        return False

    def plant(self, site: Site) -> None:
        self.mem.write(site.address, INT3)
        self.sites.add(site)

    def unplant(self, site: Site) -> None:
        self.mem.write(site.address, site.original[:1])

    # -- undoing ---------------------------------------------------------------
    def invalidate(self, start: int, end: int, untrack: bool) -> int:
        """Undo the patches of every tracked page in [start, end) before the guest
        changes or drops it; the pages go back to unscanned (or are forgotten)."""
        pages = self.pages.tracked_in(page_of(start), end)
        if not pages:
            return 0
        lo, hi = pages[0], pages[-1] + PAGE
        for site in self.sites.in_range(lo, hi):
            if page_of(site.address) in pages:
                try:
                    self.unplant(site)
                except OSError:
                    pass  # already unmapped: nothing left to restore
                self.sites.remove(site.address)
        for p in pages:
            if untrack:
                del self.pages.pages[p]
            else:
                state = self.pages.pages[p]
                state.scanned = False
                state.starts.clear()
                state.entries.clear()
        return len(pages)

    def restore_all(self) -> int:
        """Put every original byte back (reversibility). Returns the sites undone."""
        count = 0
        for site in list(self.sites):
            self.unplant(site)
            count += 1
        return count
