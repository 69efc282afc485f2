"""The patcher: applies scan results to one live address space and undoes them.

Duties, and when they run:
- scan a page at its first fetch (or extend a scanned page when execution reaches an
  offset no scan has seen), turn each site into a Site with its original bytes, and
  plant it: an `int3` (emulate mode, or a site with no safe window), or a `jmp rel32`
  over its window into a stub in a side cache (patch mode);
- give the original bytes of any range (what the guest image holds under patches);
- invalidate a range before the guest changes it (original bytes back, sites dropped,
  pages back to unscanned);
- re-plant every site in the other mode (a live mode switch);
- restore every patch, leaving code byte-identical to the unpatched image.

Atomicity: a `jmp5` window is written only while its page is non-executable (its
first scan: no thread can be running it), or with every thread of the space stopped
and none inside the window (a mode switch). Sites found later in a page that already
runs get an `int3`: a one-byte store is atomic.
"""
from __future__ import annotations

import os
import time

from sbe.handlers import cpuid as cpuid_model
from sbe.patcher import stubs
from sbe.meta.module import ModuleMap, parse_maps
from sbe.meta.pagemap import PAGE, PROT_EXEC, PROT_READ, PageMap, page_of
from sbe.meta.site import Site, SiteTable
from sbe.meta.syscalls import SYS
from sbe.patcher import gadget
from sbe.patcher.emit import EmitError, compose
from sbe.patcher.sidecache import SideCache, find_gap
from sbe.scanner.decode import Insn, decode_from
from sbe.scanner.region import scan_page
from sbe.scanner.window import Fallback, plan_windows, targets_of

INT3 = b"\xcc"
MAX_INSN = 15
MAX_WINDOW = 2 * MAX_INSN
MAP_PRIVATE, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x02, 0x20, 0x100000
BRANCH_TABLE_SIZE = stubs.BRANCH_TABLE_SLOTS * 8


class PatchPolicy:
    """Which sites patch mode leaves as traps: whole kinds, or single sites named
    module+offset (a module's basename or full path)."""

    def __init__(self, emulate_kinds=(), emulate_sites=(), cache_size: int = 1 << 20) -> None:
        self.emulate_kinds = frozenset(emulate_kinds)
        self.emulate_sites = frozenset(emulate_sites)
        self.cache_size = cache_size

    def forced(self, kind: str, module: str, offset: int) -> bool:
        return (kind in self.emulate_kinds or (module, offset) in self.emulate_sites
                or (os.path.basename(module), offset) in self.emulate_sites)


class AddressSpace:
    def __init__(self, mem, pid: int, mode: str = "emulate", policy: PatchPolicy | None = None,
                 cpu=None) -> None:
        self.mem = mem
        self.pid = pid
        self.mode = mode
        self.policy = policy or PatchPolicy()
        self.cpu = cpu or cpuid_model.HOST
        self.sites = SiteTable()
        self.pages = PageMap()
        self.users: set[int] = set()
        self.caches: list[SideCache] = []
        self.branch_table = 0
        self.stub_traps: dict[int, Site] = {}
        self.syscall = None          # remote syscall in a stopped thread, set by the monitor
        self._modules: ModuleMap | None = None
        self.scan_seconds = 0.0
        self.stub_seconds = 0.0
        self.pages_scanned = 0
        self.swept = 0
        self.fallbacks: dict[str, int] = {}
        self.flushes = 0
        self.false_sites = 0
        self.handlers: dict[int, int] = {}     # signal -> handler address (rt_sigaction)

    def fork(self, mem, pid: int) -> "AddressSpace":
        """The state of a child whose memory is a copy of this one's (side caches and
        branch table included, at the same addresses)."""
        twin = AddressSpace(mem, pid, self.mode, self.policy, self.cpu)
        twin.sites = self.sites.copy()
        twin.pages = self.pages.copy()
        twin.caches = [c.copy() for c in self.caches]
        twin.branch_table = self.branch_table
        twin.stub_traps = {s.trap: s for s in twin.sites if s.trap}
        twin.handlers = dict(self.handlers)
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
        for site in self.sites.in_range(address - MAX_WINDOW, address + len(data) + MAX_WINDOW):
            start, raw = site.patched_span
            for i, b in enumerate(raw):
                j = start + i - address
                if 0 <= j < len(data):
                    data[j] = b
        return bytes(data)

    # -- scanning and planting -------------------------------------------------
    def scan(self, address: int, avoid: frozenset = frozenset(), exclusive: bool = False) -> list[Site]:
        """Scan (or extend the scan of) the page holding `address`, from `address`
        and the entries learned for that page; plant what it finds. Entries found
        for other pages are recorded there, or extend those pages if already scanned.
        `avoid`: addresses no new window may hold strictly inside (threads' rips).
        `exclusive`: every thread of the space is stopped, so windows may be written
        even in pages that already run."""
        new_sites: list[Site] = []
        work = [address]
        while work:
            target = work.pop()
            state = self.pages.get(target)
            if state is None:
                continue
            inside = self.window_around(target)
            if inside is not None:
                self.demote(inside, "branch target inside window")
            if state.scanned and target in state.starts:
                continue
            page = page_of(target)
            fresh = not state.scanned
            entries = (state.entries | {target}) if fresh else {target}
            t0 = time.perf_counter()
            code = self.original(page, PAGE + MAX_INSN)
            result = scan_page(code, page, entries, known=state.starts, sweep=fresh)
            self.scan_seconds += time.perf_counter() - t0
            if fresh:
                self.pages_scanned += 1
            if not fresh:
                self.drop_false_sites(state, result.insns)
            state.scanned = True
            state.entries.clear()
            state.roots |= entries
            state.starts |= result.starts
            state.targets |= targets_of(result.insns)
            self.swept += result.swept
            found = [(i, k) for i, k in result.sites if i.address not in self.sites]
            if self.mode == "patch" and (fresh or exclusive):
                targets = state.targets | state.roots | avoid
                plans = plan_windows(code, page, page + PAGE, state.starts, found, targets)
            else:
                reason = "emulate mode" if self.mode == "emulate" else "found after its page ran"
                plans = [Fallback(i, k, reason) for i, k in found]
            for plan in plans:
                new_sites.append(self.plant(plan, code, page))
            for out in result.outside:
                other = self.pages.get(out)
                if other is None:
                    continue
                if other.scanned:
                    if out not in other.starts or self.window_around(out) is not None:
                        work.append(out)
                else:
                    other.entries.add(out)
        return new_sites

    def drop_false_sites(self, state, insns) -> None:
        """An extension scan starts where execution really goes, so its decoding is
        ground truth: an earlier start (and site) strictly inside one of its
        instructions came from decoding out of step (a call's fall-through into
        padding, say) and is dropped, its patch undone."""
        interior = set()
        for insn in insns:
            interior.update(range(insn.address + 1, insn.end))
        false = interior & state.starts
        if not false:
            return
        state.starts -= false
        for address in false:
            site = self.sites.get(address)
            if site is not None:
                self.unplant(site)
                self.sites.remove(address)
                self.false_sites += 1

    def knows(self, address: int) -> bool:
        """True when execution may reach `address` without a scan first: it is a
        known instruction start (not inside a window), or its page will fault
        before it runs."""
        state = self.pages.get(address)
        return (state is None or not state.scanned
                or (address in state.starts and self.window_around(address) is None))

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

    def site_of_stub(self, address: int) -> Site | None:
        """The site whose stub holds `address` (stub-PC to guest-PC, as
        DynamoRIO's translate does)."""
        if not self.in_cache(address):
            return None
        for site in self.sites:
            if site.stub <= address < site.stub + site.stub_size:
                return site
        return None

    def in_cache(self, address: int) -> bool:
        return any(c.start <= address < c.start + c.size for c in self.caches)

    def window_starting_at(self, address: int) -> Site | None:
        for site in self.sites.in_range(address, address + MAX_WINDOW):
            if site.strategy == "jmp5" and site.window_start == address:
                return site
        return None

    def window_around(self, address: int) -> Site | None:
        """The jmp5 site whose window holds `address` strictly inside, if any."""
        for site in self.sites.in_range(address - MAX_WINDOW, address + MAX_WINDOW):
            if site.strategy == "jmp5" and site.window_start < address < site.window_end:
                return site
        return None

    def plant(self, plan, code: bytes, base: int) -> Site:
        insn, kind = plan.site, plan.kind
        module, offset = self.modules.locate(insn.address)
        raw = code[insn.address - base:insn.address - base + insn.size]
        site = Site(insn.address, insn.size, kind, insn.mnemonic, insn.op_str, raw,
                    module=module, offset=offset)
        if isinstance(plan, Fallback):
            site.reason = plan.reason
        elif self.policy.forced(kind, module, offset):
            site.reason = "forced to emulate"
        else:
            try:
                self._plant_jmp5(site, plan, code[plan.start - base:plan.end - base])
                return site
            except EmitError as e:
                site.reason = str(e)
        self.fallbacks[site.reason] = self.fallbacks.get(site.reason, 0) + 1
        site.strategy = "int3"
        self.mem.write(site.address, INT3)
        self.sites.add(site)
        return site

    def _plant_jmp5(self, site: Site, window, window_bytes: bytes) -> None:
        t0 = time.perf_counter()
        cache = self.cache_for(window.start, window.end, 512)
        stub = compose(site.kind, Insn(site.address, site.size, site.mnemonic, site.op_str),
                       window, window_bytes, cache.next, cache)
        if not cache.room(len(stub.code)):
            raise EmitError("side cache full")
        at = cache.take(len(stub.code))
        self.mem.write(at, stub.code)
        site.strategy, site.stub, site.stub_size = "jmp5", at, len(stub.code)
        site.displaced = tuple((at + off, orig) for off, orig in stub.displaced)
        site.window_start, site.window_end, site.window_bytes = window.start, window.end, window_bytes
        site.trap = at + stub.trap if stub.trap is not None else 0
        site.resume = at + stub.resume if stub.resume is not None else 0
        patch = stubs.jmp5(window.start, at) + INT3 * (window.end - window.start - 5)
        self.mem.write(window.start, patch)
        self.sites.add(site)
        if site.trap:
            self.stub_traps[site.trap] = site
        self.stub_seconds += time.perf_counter() - t0

    def unplant(self, site: Site) -> None:
        start, raw = site.patched_span
        self.mem.write(start, raw)
        self.stub_traps.pop(site.trap, None)

    def demote(self, site: Site, reason: str) -> None:
        """Turn a jmp5 site back into a trap: something will run inside its window."""
        self.unplant(site)
        site.strategy, site.reason, site.trap, site.resume = "int3", reason, 0, 0
        site.window_start = site.window_end = site.stub = site.stub_size = 0
        site.displaced = ()
        site.window_bytes = b""
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
        self.mem.write(site.address, INT3)

    # -- side caches -----------------------------------------------------------
    def cache_for(self, start: int, end: int, size: int) -> SideCache:
        for cache in self.caches:
            if cache.room(size) and cache.reaches(start, end):
                return cache
        full = [c for c in self.caches if not c.retired and c.reaches(start, end)]
        for cache in full:
            self.retire(cache, keep=page_of(start))
        return self.new_cache(start, end)

    def new_cache(self, start: int, end: int) -> SideCache:
        if self.syscall is None:
            raise EmitError("no thread to map a side cache with")
        if not self.branch_table:
            table = self.syscall(SYS.mmap, 0, BRANCH_TABLE_SIZE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            if table < 0:
                raise EmitError("cannot map the branch table")
            self.branch_table = table
            self.maps_changed()
        size = self.policy.cache_size
        place = find_gap(self.modules.maps, start, end, size)
        if place is None:
            raise EmitError("no free memory within reach for a side cache")
        got = self.syscall(SYS.mmap, place, size, PROT_READ | PROT_EXEC,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        self.maps_changed()
        if got != place:
            raise EmitError(f"cannot map a side cache at {place:#x}")
        cache = SideCache(place, size)
        self.mem.write(place, cache.header(gadget.PATCH, self.branch_table, self.cpuid_rows()))
        self.caches.append(cache)
        return cache

    def cpuid_rows(self):
        for (leaf, subleaf), regs in sorted(self.cpu.table().items()):
            any_subleaf = leaf not in cpuid_model.SUBLEAF_LEAVES
            if any_subleaf and subleaf:
                continue
            yield (leaf, subleaf, any_subleaf, regs)

    def retire(self, cache: SideCache, keep: int) -> None:
        """A full cache: no new stubs go there, and the pages it serves are
        invalidated so they re-plant into a new cache at their next fetch. Its memory
        stays as it is: a thread may be inside one of its stubs."""
        cache.retired = True
        self.flushes += 1
        pages = {page_of(s.address) for s in self.sites
                 if s.stub and cache.start <= s.stub < cache.start + cache.size}
        for page in sorted(pages - {keep}):
            state = self.pages.pages.get(page)
            self.invalidate(page, page + PAGE, untrack=False)
            if state is not None and self.syscall is not None:
                self.syscall(SYS.mprotect, page, PAGE, state.prot & ~PROT_EXEC & ~2)

    def insert_branch_target(self, target: int) -> None:
        if self.branch_table:
            slot = self.branch_table + 8 * (target % stubs.BRANCH_TABLE_SLOTS)
            self.mem.write(slot, target.to_bytes(8, "little"))

    def cpuid_learned(self, site: Site, leaf: int, subleaf: int, regs) -> None:
        """A cpuid stub missed: the monitor's answer goes into that stub's table."""
        for cache in self.caches:
            if cache.start <= site.stub < cache.start + cache.size:
                any_subleaf = leaf not in cpuid_model.SUBLEAF_LEAVES
                for address, data in cache.cpuid_append(leaf, 0 if any_subleaf else subleaf,
                                                        any_subleaf, regs) or ():
                    self.mem.write(address, data)

    # -- undoing ---------------------------------------------------------------
    def invalidate(self, start: int, end: int, untrack: bool) -> int:
        """Undo the patches of every tracked page in [start, end) before the guest
        changes or drops it; the pages go back to unscanned (or are forgotten)."""
        pages = self.pages.tracked_in(page_of(start), end)
        if not pages:
            return 0
        lo, hi = pages[0], pages[-1] + PAGE
        dropped = False
        for site in self.sites.in_range(lo - MAX_WINDOW, hi + MAX_WINDOW):
            if page_of(site.address) in pages:
                try:
                    self.unplant(site)
                except OSError:
                    pass  # already unmapped: nothing left to restore
                self.sites.remove(site.address)
                dropped = True
        for p in pages:
            if untrack:
                del self.pages.pages[p]
            else:
                state = self.pages.pages[p]
                state.scanned = False
                for learned in (state.starts, state.entries, state.roots, state.targets):
                    learned.clear()
        if dropped and self.branch_table:
            # Validated targets in these pages are no longer known starts.
            self.mem.write(self.branch_table, bytes(BRANCH_TABLE_SIZE))
        return len(pages)

    def restore_all(self) -> int:
        """Put every original byte back (reversibility). Returns the sites undone."""
        count = 0
        for site in list(self.sites):
            self.unplant(site)
            count += 1
        return count

    def replant(self, mode: str, avoid: frozenset) -> int:
        """Every site again, in `mode` (all threads of the space stopped; `avoid`
        holds their instruction pointers, which no window may cover)."""
        self.mode = mode
        by_page: dict[int, list[Site]] = {}
        for site in list(self.sites):
            self.unplant(site)
            self.sites.remove(site.address)
            by_page.setdefault(page_of(site.address), []).append(site)
        for page, old in sorted(by_page.items()):
            state = self.pages.pages.get(page)
            code = self.original(page, PAGE + MAX_INSN)
            found = [(Insn(s.address, s.size, s.mnemonic, s.op_str), s.kind) for s in old]
            if mode == "patch" and state is not None:
                targets = state.targets | state.roots | avoid
                plans = plan_windows(code, page, page + PAGE, state.starts, found, targets)
            else:
                plans = [Fallback(i, k, "emulate mode") for i, k in found]
            hits = {s.address: s.hits for s in old}
            for plan in plans:
                self.plant(plan, code, page).hits = hits.get(plan.site.address, 0)
        if self.branch_table:
            self.mem.write(self.branch_table, bytes(BRANCH_TABLE_SIZE))
        return sum(len(v) for v in by_page.values())
