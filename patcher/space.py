"""One guest address space as sbe models it: its sites, its code pages, its modules,
its side caches and branch table, and the questions asked of them.

State and queries only. The acts that change the guest's code (scan, plant, demote,
retire, invalidate, re-plant, restore) are the Patcher's (patcher/patcher.py), which
is handed the space; the guest's signal dispositions are the monitor's. Threads and
vfork children share one space; a forked child gets a copy, at the same addresses.
"""
from __future__ import annotations

from sbe.meta.module import ModuleMap, parse_maps
from sbe.meta.pagemap import PAGE, PageMap
from sbe.meta.record import Record
from sbe.meta.scancache import Entry, PageRecord
from sbe.meta.site import Site, SiteTable
from sbe.patcher import cachedplan
from sbe.patcher.sidecache import SideCache
from sbe.scanner.decode import decode_from
from sbe.scanner.window import ISLAND_REACH, JMP5, SLOT_CALL, slot_call
from sbe.scanner.x86 import MAX_INSN

# The farthest from its site a patch writes: a window spans the site and its
# displaced neighbours; an island lies within `jmp rel8` reach.
PATCH_REACH = max(2 * MAX_INSN, ISLAND_REACH)


class Binding(Record):
    """A file's code mapped at [start, end), whose bytes, as mapped, have the scan
    cache key `key`. `touched`: its pages this space scanned, so there is something
    to save. A binding goes as soon as the mapping's bytes may change."""
    __slots__ = ("start", "end", "key", "path", "touched")

    def __init__(self, start: int, end: int, key: str, path: str, touched: set | None = None) -> None:
        self.start = start
        self.end = end
        self.key = key
        self.path = path
        self.touched = set() if touched is None else touched


class AddressSpace:
    def __init__(self, mem, pid: int, mode: str = "emulate") -> None:
        self.mem = mem                   # GuestMemory of one task of the space
        self.pid = pid
        self.mode = mode
        self.sites = SiteTable()
        self.pages = PageMap()
        self.users: set[int] = set()     # the tasks running in it
        self.caches: list[SideCache] = []
        self.branch_table = 0
        self.bindings: list[Binding] = []
        self._modules: ModuleMap | None = None
        # The scan cache's view of which program runs here, and what it runs:
        self.program = ""                # a tag of the executable (see image.program_tag)
        self.deferred: dict[int, tuple] = {}   # page -> (binding, record): cached, planted at its fetch
        self.executed: set[int] = set()  # pages that faulted at a fetch: this program runs them
        self.patched_pages = None        # sbe.patcher.copies.PatchedPages, made at first use
        # Table jumps planted to run unchecked: site address -> the targets they trust
        # (patcher.jumptables).
        self.tables: dict[int, frozenset] = {}

    def fork(self, mem, pid: int) -> "AddressSpace":
        """The state of a child whose memory is a copy of this one's (side caches and
        branch table included, at the same addresses)."""
        twin = AddressSpace(mem, pid, self.mode)
        twin.sites = self.sites.copy()
        twin.pages = self.pages.copy()
        twin.caches = [c.copy() for c in self.caches]
        twin.branch_table = self.branch_table
        twin.bindings = [Binding(b.start, b.end, b.key, b.path) for b in self.bindings]
        twin.program = self.program
        twin.deferred = {page: (twin.binding_of(page), record) for page, (_, record) in self.deferred.items()}
        twin.executed = set(self.executed)
        twin.tables = dict(self.tables)
        return twin

    def close(self) -> None:
        """No task runs in it any more: let go of its memory file."""
        self.mem.close()

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
        for site in self.sites.in_range(address - PATCH_REACH, address + len(data) + PATCH_REACH):
            for start, raw in site.patched_spans:
                for i, b in enumerate(raw):
                    j = start + i - address
                    if 0 <= j < len(data):
                        data[j] = b
        return bytes(data)

    # -- what is known ---------------------------------------------------------
    def knows(self, address: int) -> bool:
        """True when execution may reach `address` without a scan first: it is a
        known instruction start (not inside a window), or its page will fault
        before it runs."""
        state = self.pages.get(address)
        return (state is None or not state.scanned
                or (state.has_start(address) and self.window_around(address) is None))

    def overlaps(self, address: int) -> bool:
        """True when `address` lies strictly inside an instruction a scan decoded:
        a trap planted there would corrupt that instruction."""
        state = self.pages.get(address)
        if state is None:
            return False
        for start in range(address - 1, address - MAX_INSN, -1):
            if state.has_start(start):
                insn = next(decode_from(self.original(start, MAX_INSN), start, start), None)
                return insn is not None and start + insn.size > address
        return False

    # -- scan cache bindings ---------------------------------------------------
    def binding_of(self, address: int) -> Binding | None:
        return next((b for b in self.bindings if b.start <= address < b.end), None)

    def learned(self, address: int) -> None:
        """Something was learned of the code at `address`: its mapping's cache entry
        has news to save."""
        binding = self.binding_of(address)
        if binding is not None:
            binding.touched.add(address & ~(PAGE - 1))

    def unbind(self, start: int, end: int) -> None:
        """The bytes of [start, end) may change: what was learned there is no longer
        the cached mapping's."""
        self.bindings = [b for b in self.bindings if b.end <= start or end <= b.start]
        for page in [p for p in self.deferred if start < p + PAGE and p < end]:
            del self.deferred[page]

    def cache_entry(self, binding: Binding) -> Entry:
        """What this space learned of a bound mapping (its touched pages; the others
        are as the cache or an earlier save has them), relative to its start."""
        entry = Entry(binding.key, binding.path, binding.end - binding.start)
        for page in sorted(binding.touched):
            state = self.pages.get(page)
            if state is None or not state.scanned:
                continue
            base = binding.start
            entry.pages[page - base] = PageRecord(
                map((-base).__add__, state.starts), {r - base for r in state.roots},
                {t - base for t in state.targets},
                {s.address - base: (s.size, s.kind, s.mnemonic, s.op_str, s.plan,
                                    cachedplan.template_to_record(s.template) if s.plan is not None else None)
                 for s in self.sites.in_range(page, page + PAGE)},
                {x - base for x in state.exits}, [self.program] if page in self.executed else [])
        return entry

    # -- side caches -----------------------------------------------------------
    def in_cache(self, address: int) -> bool:
        return self.cache_holding(address) is not None

    def cache_holding(self, address: int) -> SideCache | None:
        return next((c for c in self.caches if c.start <= address < c.start + c.size), None)

    def stub_at(self, address: int):
        """(site, patch) of the stub that holds `address` (the site's patch now, or
        one it had before: see SiteTable), or None."""
        return self.sites.by_stub(address) if self.in_cache(address) else None

    def trap_at(self, address: int):
        """(site, patch) when `address` holds an int3 of a site's: its own (patch
        None), or its stub's trap (the patch of that stub: the site's now or an
        earlier one); else None."""
        site = self.sites.get(address)
        if site is not None and site.patch is None:
            return site, None
        return self.sites.by_trap(address)

    # -- windows ---------------------------------------------------------------
    def window_starting_at(self, address: int) -> Site | None:
        for site in self.sites.in_range(address, address + PATCH_REACH):
            if site.patch is not None and site.patch.window_start == address:
                return site
        return None

    def window_around(self, address: int) -> Site | None:
        """The jmp5 site whose window holds `address` strictly inside, or whose island
        holds it at all (code landing there would run the jump to the stub), if any."""
        for site in self.sites.in_range(address - PATCH_REACH, address + PATCH_REACH):
            patch = site.patch
            if patch is not None and (patch.window_start < address < patch.window_end
                                      or 0 < patch.island <= address < patch.island + JMP5):
                return site
        return None

    def slot_call_at(self, address: int):
        """(site, patch) of the slot call (scanner.window.slot_call) that `address`
        holds the window's `call [rsp - 8]` of, or None: a thread standing there has
        run the site's stub, which left the target it checked at [rsp - 8]."""
        for site in self.sites.in_range(address + SLOT_CALL - MAX_INSN, address + SLOT_CALL):
            patch = site.patch
            if (patch is not None and patch.guarded and patch.window_end - SLOT_CALL == address
                    and slot_call(site, site.kind)):
                return site, patch
        return None

    def island_site(self, address: int) -> Site | None:
        """The site whose island starts at `address`: a thread standing there has run
        the site's `jmp rel8` and nothing else."""
        for site in self.sites.in_range(address - PATCH_REACH, address + PATCH_REACH):
            if site.patch is not None and site.patch.island == address:
                return site
        return None
