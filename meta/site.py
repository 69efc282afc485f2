"""Sites: the guest instructions sbe virtualizes, and the table that finds them.

A site is keyed by its guest address while it lives in one address space, and by
module + offset when it is reported or cached, because a module's base moves from run
to run (ASLR) while its offsets do not.
"""
from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("syscall", "cpuid", "rdtsc", "rdtscp", "pkru", "privileged", "branch")
STRATEGIES = ("int3", "jmp5")


@dataclass
class Site:
    address: int
    size: int
    kind: str
    mnemonic: str
    op_str: str
    original: bytes
    strategy: str = "int3"
    reason: str = ""
    module: str = ""
    offset: int = 0
    hits: int = 0
    # jmp5 only: the window [window_start, window_end) the transfer overwrites, its
    # original bytes, and the stub it jumps to.
    window_start: int = 0
    window_end: int = 0
    window_bytes: bytes = b""
    stub: int = 0
    trap: int = 0       # the stub's int3 ("emulate the site here"), if it has one
    resume: int = 0     # where the stub goes on after that trap (0: the handler decides)
    stub_size: int = 0
    displaced: tuple = ()   # (stub address, original address) of each displaced instruction
    # Per-kind data a handler derives once (e.g. a branch's decoded operand) and
    # keeps, so a trap does not decode the instruction again.
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def end(self) -> int:
        return self.address + self.size

    @property
    def insn(self) -> str:
        return f"{self.mnemonic} {self.op_str}".strip()

    def to_record(self) -> dict:
        """The site as plain JSON-able data (the sites file's row)."""
        return {
            "address": self.address,
            "module": self.module,
            "offset": self.offset,
            "kind": self.kind,
            "insn": self.insn,
            "bytes": self.original.hex(),
            "size": self.size,
            "strategy": self.strategy,
            "reason": self.reason,
            "hits": self.hits,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "stub": self.stub,
        }

    @property
    def patched_span(self) -> tuple[int, bytes]:
        """Where the patch lies and the original bytes under it."""
        if self.strategy == "jmp5":
            return self.window_start, self.window_bytes
        return self.address, self.original[:1]


class SiteTable:
    """All sites of one address space, by guest address, with a per-page index so
    range queries (original bytes of a page, invalidation) cost what the range
    holds, not what the table holds.

    Shared by the threads of the address space; copied for a forked child, whose
    memory is a copy too.
    """

    PAGE = 4096

    def __init__(self) -> None:
        self._by_address: dict[int, Site] = {}
        self._by_page: dict[int, set[int]] = {}

    def add(self, site: Site) -> None:
        self._by_address[site.address] = site
        self._by_page.setdefault(site.address & ~(self.PAGE - 1), set()).add(site.address)

    def get(self, address: int) -> Site | None:
        return self._by_address.get(address)

    def remove(self, address: int) -> Site | None:
        site = self._by_address.pop(address, None)
        if site is not None:
            page = address & ~(self.PAGE - 1)
            bucket = self._by_page[page]
            bucket.discard(address)
            if not bucket:
                del self._by_page[page]
        return site

    def in_range(self, start: int, end: int) -> list[Site]:
        found = []
        for page in range(start & ~(self.PAGE - 1), end, self.PAGE):
            for address in self._by_page.get(page, ()):
                if start <= address < end:
                    found.append(self._by_address[address])
        return sorted(found, key=lambda s: s.address)

    def __iter__(self):
        return iter(sorted(self._by_address.values(), key=lambda s: s.address))

    def __len__(self) -> int:
        return len(self._by_address)

    def __contains__(self, address: int) -> bool:
        return address in self._by_address

    def copy(self) -> "SiteTable":
        twin = SiteTable()
        for site in self._by_address.values():
            twin.add(Site(**{**site.__dict__, "cache": dict(site.cache)}))
        return twin
