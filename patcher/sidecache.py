"""Side caches: guest memory, mapped by the monitor within rel32 reach (±2 GiB) of the
code it serves, holding that code's stubs.

Layout: a header (the patch gadget's address, the branch table's address), the cpuid
table (the virtual CPU model, copied in for the cpuid stubs), then stubs, allocated by
bumping a pointer. A full cache is retired, never reused: a thread may still be inside
one of its stubs (blocked in a syscall, say), so its memory stays mapped and
unchanged; the pages it served are invalidated and re-planted into a new cache when
they next run.
"""
from __future__ import annotations

import struct

from sbe.patcher.stubs import CPUID_ANY_SUBLEAF, CPUID_END, CPUID_ENTRY
from sbe.meta.module import Mapping
from sbe.meta.pagemap import PAGE

REACH = (1 << 31) - (1 << 24)         # rel32 reach, less a margin for the stub's own size
GADGET_SLOT, BRANCH_SLOT = 0, 8
CPUID_TABLE = 64
CPUID_CAPACITY = 256
STUBS = CPUID_TABLE + CPUID_ENTRY * (CPUID_CAPACITY + 1)
LOWEST = 0x10000
HIGHEST = 0x7FFF_FFFF_F000


class SideCache:
    def __init__(self, start: int, size: int) -> None:
        self.start = start
        self.size = size
        self.next = start + STUBS
        self.retired = False
        self.cpuid_count = 0

    def copy(self) -> "SideCache":
        twin = SideCache(self.start, self.size)
        twin.next, twin.retired, twin.cpuid_count = self.next, self.retired, self.cpuid_count
        return twin

    @property
    def gadget_slot(self) -> int:
        return self.start + GADGET_SLOT

    @property
    def branch_slot(self) -> int:
        return self.start + BRANCH_SLOT

    @property
    def cpuid_table(self) -> int:
        return self.start + CPUID_TABLE

    def reaches(self, start: int, end: int) -> bool:
        return (abs(self.start - start) < REACH and abs(self.start + self.size - end) < REACH
                and abs(self.start - end) < REACH and abs(self.start + self.size - start) < REACH)

    def room(self, size: int) -> bool:
        return not self.retired and self.next + size <= self.start + self.size

    def take(self, size: int) -> int:
        at = self.next
        self.next += (size + 15) & ~15
        return at

    def header(self, gadget: int, branch_table: int, cpuid_rows) -> bytes:
        """The header and cpuid table as first written."""
        rows = list(cpuid_rows)[:CPUID_CAPACITY]
        self.cpuid_count = len(rows)
        data = struct.pack("<QQ", gadget, branch_table).ljust(CPUID_TABLE, b"\0")
        for leaf, subleaf, any_subleaf, regs in rows:
            data += cpuid_entry(leaf, subleaf, *regs, flags=CPUID_ANY_SUBLEAF if any_subleaf else 0)
        return data + cpuid_entry(0, 0, 0, 0, 0, 0, flags=CPUID_END)

    def cpuid_append(self, leaf, subleaf, any_subleaf, regs) -> list[tuple[int, bytes]] | None:
        """Writes that add one leaf: the new end marker first, then the entry, whose
        flags byte (written last) makes it visible."""
        if self.cpuid_count >= CPUID_CAPACITY:
            return None
        at = self.cpuid_table + CPUID_ENTRY * self.cpuid_count
        self.cpuid_count += 1
        entry = cpuid_entry(leaf, subleaf, *regs, flags=CPUID_ANY_SUBLEAF if any_subleaf else 0)
        return [(at + CPUID_ENTRY, cpuid_entry(0, 0, 0, 0, 0, 0, flags=CPUID_END)),
                (at, entry[:8] + b"\x02" + entry[9:]), (at + 8, entry[8:9])]


def cpuid_entry(leaf, subleaf, eax, ebx, ecx, edx, flags=0) -> bytes:
    return struct.pack("<IIIIIIII", leaf, subleaf, flags, eax, ebx, ecx, edx, 0)


def find_gap(maps: list[Mapping], start: int, end: int, size: int) -> int | None:
    """The free address for `size` bytes closest to [start, end) that keeps the whole
    cache within rel32 reach of it, or None."""
    best, best_distance = None, None
    edges = [(LOWEST, LOWEST)] + [(m.start, m.end) for m in sorted(maps, key=lambda m: m.start)] \
        + [(HIGHEST, HIGHEST)]
    for (_, gap_start), (gap_end, _) in zip(edges, edges[1:]):
        gap_start = max(gap_start + PAGE, LOWEST)      # a guard page from the neighbour
        gap_end = gap_end - PAGE
        if gap_end - gap_start < size:
            continue
        place = min(max(start - size, gap_start), gap_end - size) & ~(PAGE - 1)
        if place < gap_start:
            continue
        distance = max(abs(place - end), abs(place + size - start))
        if distance < REACH and (best_distance is None or distance < best_distance):
            best, best_distance = place, distance
    return best
