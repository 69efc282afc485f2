"""Sites: the guest instructions sbe virtualizes, and the table that finds them.

A site is keyed by its guest address while it lives in one address space, and by
module + offset when it is reported, because a module's base moves from run
to run (ASLR) while its offsets do not.
"""
from __future__ import annotations

import bisect
from collections import namedtuple

from sbe.meta.record import Record

from sbe.meta.pagemap import PAGE, page_of

KINDS = ("syscall", "cpuid", "rdtsc", "rdtscp", "pkru", "privileged", "branch")
STRATEGIES = ("int3", "jmp5")


class Patch(namedtuple("Patch", "window_start window_end window_bytes stub stub_size trap resume displaced guarded "
                       "island island_bytes table", defaults=(0, 0, (), False, 0, b"", ()))):
    """What a jmp5 site's patch is now: the window [window_start, window_end) its
    5-byte jump overwrites (or its `jmp rel8` to the `island`, whose 5 bytes of
    padding, `island_bytes` originally, hold the 5-byte jump), the original bytes
    there, and the stub it lands on;
    `trap`, the stub's int3 ("emulate the site here"), if it has one; `resume`,
    where the stub goes on after that trap (0: the handler decides); `displaced`,
    (stub address, original address) of each displaced instruction; `guarded`, the
    site keeps its bytes and runs after the stub's check; `table`, the [start, end)
    of the jump table a proved table jump's stub trusts (scanner.jumptable), () for
    none: a change to that memory demotes the site. A site's identity never
    changes; its patch is replaced whole (demotion to `int3` is `patch = None`), so
    no field of an old patch can survive into a new one. A tuple: a warm start
    makes thousands, and a frozen dataclass costs five times as much to make."""
    __slots__ = ()


class Site(Record):
    """A site is itself: two sites are equal only when they are the same one."""
    __slots__ = ("address", "size", "kind", "mnemonic", "op_str", "original", "reason", "module", "offset",
                 "hits", "patch", "decoded", "plan", "template")
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __init__(self, address: int, size: int, kind: str, mnemonic: str, op_str: str, original: bytes,
                 reason: str = "", module: str = "", offset: int = 0, hits: int = 0,
                 patch: Patch | None = None, decoded: dict | None = None, plan: object = None,
                 template: object = None) -> None:
        self.address = address
        self.size = size
        self.kind = kind
        self.mnemonic = mnemonic
        self.op_str = op_str
        self.original = original
        self.reason = reason        # why it is an int3 in patch mode
        self.module = module
        self.offset = offset
        self.hits = hits
        self.patch = patch          # None: the site is a one-byte int3
        # What a handler derives once from the instruction (e.g. a branch's operand)
        # and keeps, so a trap does not decode it again.
        self.decoded = {} if decoded is None else decoded
        # The scanner's plan the site was planted from, as the scan cache keeps it
        # (relative to its mapping), when it may (a function of the page's bytes and
        # scan alone); None otherwise.
        self.plan = plan
        # Its stub detached from where it lies, for the scan cache (with the plan).
        self.template = template

    @property
    def strategy(self) -> str:
        return "jmp5" if self.patch is not None else "int3"

    @property
    def tactic(self) -> str:
        """Which of the planner's tactics the patch is (scanner.window.Window.tactic),
        "" for an int3."""
        patch = self.patch
        if patch is None:
            return ""
        if patch.table:
            return "table"
        if patch.guarded:
            return "slot" if "[" in self.op_str else "guard"
        if patch.island:
            return "padding"
        before, after = patch.window_start < self.address, patch.window_end > self.end
        return "both" if before and after else "backward" if before else "forward" if after else "site"

    @property
    def end(self) -> int:
        return self.address + self.size

    @property
    def insn(self) -> str:
        return f"{self.mnemonic} {self.op_str}".strip()

    def to_record(self) -> dict:
        """The site as plain JSON-able data (the sites file's row)."""
        patch = self.patch
        return {
            "address": self.address,
            "module": self.module,
            "offset": self.offset,
            "kind": self.kind,
            "insn": self.insn,
            "bytes": self.original.hex(),
            "size": self.size,
            "strategy": self.strategy,
            "tactic": self.tactic,
            "reason": self.reason,
            "hits": self.hits,
            "window_start": patch.window_start if patch else 0,
            "window_end": patch.window_end if patch else 0,
            "island": patch.island if patch else 0,
            "stub": patch.stub if patch else 0,
        }

    @property
    def patched_spans(self) -> tuple[tuple[int, bytes], ...]:
        """Where the patch lies and the original bytes under it: the window, and the
        island if it has one."""
        patch = self.patch
        if patch is None:
            return ((self.address, self.original[:1]),)
        if patch.island:
            return (patch.window_start, patch.window_bytes), (patch.island, patch.island_bytes)
        return ((patch.window_start, patch.window_bytes),)

    def twin(self) -> "Site":
        """A copy for a forked child (whose memory holds the same patches), slot by
        slot: a fork copies every site."""
        twin = object.__new__(Site)
        for name in Site.__slots__:
            setattr(twin, name, getattr(self, name))
        twin.decoded = dict(self.decoded)
        return twin


class SiteTable:
    """All sites of one address space: by guest address, with a per-page index so
    range queries (original bytes of a page, invalidation) cost what the range
    holds, not what the table holds; and by stub address, so a stub PC (a signal
    inside a stub, a stub's trap) finds its site and the patch that stub is of
    without a scan of the table.

    A stub outlives its patch: a thread may be inside it when the site is re-planted
    (a mode switch, a demotion, a side cache retired, an invalidation), and it runs
    on to its continuation or its trap, which must still mean "emulate this site".
    Side-cache memory is never reused, so the stub's bytes stay as they were; the
    index keeps such a retired stub until `prune` is told no thread can be in it.
    A site's patch changes only through `set_patch` (or `remove`), which keep the
    indexes true. Shared by the threads of the address space; copied for a forked
    child, whose memory is a copy too.
    """

    def __init__(self) -> None:
        self._by_address: dict[int, Site] = {}
        self._by_page: dict[int, set[int]] = {}
        self._stub_starts: list[int] = []      # sorted; stubs never overlap
        self._by_stub: dict[int, tuple[Site, Patch]] = {}
        self._by_trap: dict[int, tuple[Site, Patch]] = {}
        self._retired: set[int] = set()        # starts of stubs whose patch is gone
        # Pages whose sites changed (added, removed, patched) since a reader last
        # took them (sbe.patcher.copies keeps a digest of each page that holds sites).
        self.touched: set[int] = set()

    def take_touched(self) -> set[int]:
        touched, self.touched = self.touched, set()
        return touched

    def add(self, site: Site) -> None:
        self.touched.add(page_of(site.address))
        self._by_address[site.address] = site
        self._by_page.setdefault(page_of(site.address), set()).add(site.address)
        self._index(site)

    def remove(self, address: int) -> Site | None:
        site = self._by_address.pop(address, None)
        if site is not None:
            page = page_of(address)
            self.touched.add(page)
            bucket = self._by_page[page]
            bucket.discard(address)
            if not bucket:
                del self._by_page[page]
            self._retire(site.patch)
        return site

    def set_patch(self, site: Site, patch: Patch | None) -> None:
        self.touched.add(page_of(site.address))
        if site.address in self._by_address:
            self._retire(site.patch)
        site.patch = patch
        self._index(site)

    def _index(self, site: Site) -> None:
        patch = site.patch
        if patch is None or site.address not in self._by_address:
            return
        if patch.stub not in self._by_stub:
            bisect.insort(self._stub_starts, patch.stub)
        self._by_stub[patch.stub] = site, patch
        self._retired.discard(patch.stub)
        if patch.trap:
            self._by_trap[patch.trap] = site, patch

    def _retire(self, patch: Patch | None) -> None:
        if patch is not None and patch.stub in self._by_stub:
            self._retired.add(patch.stub)

    def prune(self, keep) -> int:
        """Forget the retired stubs that hold none of the addresses `keep` (where
        every thread of the space stands, or will return to); returns how many."""
        gone = [stub for stub in self._retired
                if not any(stub <= a < stub + self._by_stub[stub][1].stub_size for a in keep)]
        for stub in gone:
            _, patch = self._by_stub.pop(stub)
            del self._stub_starts[bisect.bisect_left(self._stub_starts, stub)]
            self._by_trap.pop(patch.trap, None)
            self._retired.discard(stub)
        return len(gone)

    def get(self, address: int) -> Site | None:
        return self._by_address.get(address)

    def by_trap(self, address: int) -> tuple[Site, Patch] | None:
        """The site whose stub's int3 is at `address`, and the patch of that stub
        (the site's own, or one it had before)."""
        return self._by_trap.get(address)

    def by_stub(self, address: int) -> tuple[Site, Patch] | None:
        """The site whose stub holds `address` and the patch of that stub (stub PC
        to guest PC, as DynamoRIO's translate does)."""
        i = bisect.bisect_right(self._stub_starts, address) - 1
        if i < 0:
            return None
        found = self._by_stub[self._stub_starts[i]]
        return found if address < found[1].stub + found[1].stub_size else None

    def in_range(self, start: int, end: int) -> list[Site]:
        found = []
        for page in range(page_of(start), end, PAGE):
            for address in self._by_page.get(page, ()):
                if start <= address < end:
                    found.append(self._by_address[address])
        return sorted(found, key=lambda s: s.address)

    def ordered(self) -> list[Site]:
        """By address, for reports and for work whose order shows."""
        return sorted(self._by_address.values(), key=lambda s: s.address)

    def __iter__(self):
        return iter(list(self._by_address.values()))

    def __len__(self) -> int:
        return len(self._by_address)

    def __contains__(self, address: int) -> bool:
        return address in self._by_address

    def copy(self) -> "SiteTable":
        twin = SiteTable()
        twin._by_address = {address: site.twin() for address, site in self._by_address.items()}
        twin._by_page = {page: set(addresses) for page, addresses in self._by_page.items()}
        twin._stub_starts = list(self._stub_starts)
        def twin_of(site: Site) -> Site:
            # A retired stub's site may be gone from the table: the child gets its own copy.
            if self._by_address.get(site.address) is site:
                return twin._by_address[site.address]
            return site.twin()
        twin._by_stub = {stub: (twin_of(site), patch) for stub, (site, patch) in self._by_stub.items()}
        twin._by_trap = {trap: twin._by_stub[patch.stub] for trap, (_, patch) in self._by_trap.items()}
        twin._retired = set(self._retired)
        twin.touched = set(self._by_page)    # the child's reader starts from nothing
        return twin
