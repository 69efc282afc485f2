"""Finding the instruction starts and sites of one region of guest code: the
reference scanner. scanner/region.c does the same in C (scanner/scan.py picks it
when it is built); tests hold the two to the same results.

x86 code cannot be decoded reliably from an arbitrary byte: a wrong start yields
plausible instructions that overlap the real ones, and a trap planted there would
corrupt a real instruction. So the scan trusts control flow first (recursive
descent from addresses known to be executed) and decodes the rest only where the
alignment is known and the result looks like code (the sweep).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet

from sbe.meta.record import Record

from .decode import Insn, decode_from
from .sensitive import classify, direct_target, is_terminator
from .window import targets_of
from .x86 import MAX_INSN

_WINDOW = 1024  # bytes handed to capstone at a time
_SWEEP_ROUNDS = 4  # sweep, descend from what the sweep branches to, sweep what is left


class RegionScan(Record):
    __slots__ = ("starts", "sizes", "sites", "outside", "swept", "targets")

    def __init__(self, starts=None, sizes=None, sites=None, outside=None, swept: int = 0, targets=None):
        self.starts: set[int] = set() if starts is None else starts
        self.sizes: dict[int, int] = {} if sizes is None else sizes   # the size of the instruction at each start
        self.sites: list[tuple[Insn, str]] = [] if sites is None else sites
        self.outside: set[int] = set() if outside is None else outside
        self.swept = swept
        self.targets: set[int] = set() if targets is None else targets   # window.targets_of its instructions


class _Decoded:
    """The instruction at each address of the region, decoded once per scan.

    Decoding from one address goes on linearly past branches, so the descent and the
    sweep mostly find later instructions already decoded; a new linear run is needed
    only where control enters at an alignment not seen yet, and it stops as soon as
    it falls into step with instructions decoded before, or reaches a start an
    earlier scan knows (`stops`: an extension scan goes no further, so decoding on
    would be work thrown away).
    """

    def __init__(self, code: bytes, base: int, stops: AbstractSet[int] = frozenset()) -> None:
        self._code = code
        self._base = base
        self._limit = base + len(code)
        self._stops = stops
        self._at: dict[int, Insn | None] = {}

    def at(self, address: int) -> Insn | None:
        """The whole instruction starting at `address` (in the region), or None."""
        if address not in self._at:
            for insn in self._linear(address):
                if insn.address in self._at or (insn.address in self._stops and insn.address != address):
                    break
                self._at[insn.address] = insn
            self._at.setdefault(address, None)
        return self._at[address]

    def zero_at(self, address: int) -> bool:
        return self._code[address - self._base:address - self._base + 2] == b"\0\0"

    def cut_off(self, address: int) -> bool:
        """Whether capstone failing at `address` may just be for want of bytes."""
        return address + MAX_INSN > self._limit

    def _linear(self, address: int) -> Iterator[Insn]:
        # decode_from over windows rather than all remaining bytes: capstone decodes a
        # whole buffer before yielding, and a run that falls into step early would pay
        # for the rest of a large region. Instructions starting in a window's last 15
        # bytes are left to the next window, which sees all of their bytes.
        while True:
            stop = min(address + _WINDOW, self._limit)
            trusted = stop if stop == self._limit else stop - MAX_INSN
            window = self._code[address - self._base:stop - self._base]
            for insn in decode_from(window, address, address):
                if insn.address >= trusted:
                    break
                yield insn
                address = insn.end
            if address < trusted or stop == self._limit:
                return


def _descend(decoded: _Decoded, base: int, end: int, entries: set[int],
             known: AbstractSet[int], covered: AbstractSet[int] = frozenset()
             ) -> tuple[dict[int, Insn], set[int]]:
    """The instructions control flow reaches from `entries`, and where it leaves.
    A path stops before an instruction that would overlap `covered` bytes (those of
    instructions already decoded, other than their first)."""
    found: dict[int, Insn] = {}
    outside: set[int] = set()
    pending = sorted(entries, reverse=True)  # lowest first: one linear run covers most
    while pending:
        address = pending.pop()
        while address not in found and address not in known:
            if not base <= address < end:
                outside.add(address)
                break
            insn = decoded.at(address)
            if insn is None:
                break
            if covered and not covered.isdisjoint(range(insn.address, insn.end)):
                break
            found[address] = insn
            target = direct_target(insn.mnemonic, insn.op_str)
            if target is not None:
                pending.append(target)
            if is_terminator(insn.mnemonic, insn.op_str):
                break
            address = insn.end
    return found, outside


def _gaps(claimed: Iterable[Insn], base: int, end: int) -> Iterator[tuple[int, int]]:
    """The maximal stretches of [base, end) that no claimed instruction covers."""
    edge = base
    for insn in sorted(claimed, key=lambda i: i.address):
        if insn.address > edge:
            yield edge, insn.address
        edge = max(edge, insn.end)
    if edge < end:
        yield edge, end


def _sweep_gap(decoded: _Decoded, start: int, stop: int, end: int) -> list[Insn]:
    """The gap decoded linearly, or nothing if the result does not look like code.

    An undecodable byte means data; an instruction running past `stop` into one
    the descent found means a wrong alignment. Either way every instruction of the
    gap is suspect, not just the last.

    Zero bytes end the sweep, keeping what came before: they are the linker's
    padding between sections (or data), not code, and they decode as
    `add byte ptr [rax], al` two at a time, so an odd run of them pairs its last zero
    with the next real instruction's first byte and falls out of step with it. (A
    false `in al, dx` found that way inside a `sub rsp, 8` turned it into
    `or rsp, 8` once trapped.)
    """
    run: list[Insn] = []
    address = start
    while address < stop:
        if decoded.zero_at(address):
            return run
        insn = decoded.at(address)
        if insn is None:
            cut_off_at_region_end = stop == end and decoded.cut_off(address)
            return run if cut_off_at_region_end else []
        run.append(insn)
        address = insn.end
    return run if address == stop or stop == end else []


def _sweep(decoded: _Decoded, scan: RegionScan, reached: list[Insn], base: int, end: int,
           known: AbstractSet[int]) -> None:
    """Fill the gaps the descent left (`reached` grows with what is swept), then
    descend from what swept code branches to, and sweep again, a few rounds."""
    earlier = [insn for insn in (decoded.at(k) for k in known if base <= k < end) if insn is not None]
    # Every byte of a decoded instruction but its first (`interior`), and every
    # byte (`occupied`), kept up to date as instructions are claimed.
    interior: set[int] = set()
    occupied: set[int] = set()

    def claim(insns) -> None:
        for insn in insns:
            inside = range(insn.address + 1, insn.end)
            interior.update(inside)
            occupied.update(inside)
            occupied.add(insn.address)
    claim(reached + earlier)
    for _ in range(_SWEEP_ROUNDS):
        swept = []
        for start, stop in _gaps(reached + earlier, base, end):
            if start == base:  # nothing decoded ends there: its alignment would be a guess
                continue
            run = _sweep_gap(decoded, start, stop, end)
            if run and run[-1].end >= end and not is_terminator(run[-1].mnemonic, run[-1].op_str):
                scan.outside.add(run[-1].end)   # falls through into the next region
            swept += run
        scan.swept += len(swept)
        scan.starts.update(insn.address for insn in swept)
        reached += swept
        claim(swept)
        # A target inside a decoded instruction would be decoded out of step
        # with it; only clean entries are followed.
        targets = {t for t in (direct_target(i.mnemonic, i.op_str) for i in swept)
                   if t is not None and t not in interior}
        # A new path may join decoded instructions at a start, never overlap them.
        more, out = _descend(decoded, base, end, targets, known | scan.starts, occupied)
        scan.outside |= out
        if not more:
            break
        scan.starts.update(more)
        reached += more.values()
        claim(more.values())


def scan_region(code: bytes, base: int, end: int, entries: Iterable[int],
                known: AbstractSet[int] = frozenset(), sweep: bool = True) -> RegionScan:
    """Scan [base, end); `code` is its bytes plus up to 15 more, `code[0]` at `base`.

    `known` holds instruction starts an earlier scan of the region reported; they
    and what follows them are not reported again. (A set; any other iterable, such
    as the array a page state keeps for the C scan, is made one.) Sweeping fills the gaps the
    descent left, where code reached only by indirect branches lives. A gap is swept
    only from the end of an instruction already decoded, so never at `base` (were
    `base` an entry or known start, it would not be in a gap): sweeping from a
    guessed alignment would plant traps inside real instructions.
    Swept code is taken for code (it was decoded from a known alignment, without
    undecodable bytes, and falls into step with the descent), so its direct branch
    targets are entries like the descent's, in this region (descended, then swept
    again) and in others (`outside`): otherwise a call from swept code would land at
    an offset no scan has decoded, and run unscanned.
    """
    if not isinstance(known, AbstractSet):
        known = set(known)
    entries = {e for e in entries if base <= e < end}
    decoded = _Decoded(code, base, known)
    found, outside = _descend(decoded, base, end, entries, known)
    scan = RegionScan(starts=set(found), outside=outside)
    reached = list(found.values())
    if sweep:
        _sweep(decoded, scan, reached, base, end, known)
    scan.sizes = {insn.address: insn.size for insn in reached}
    scan.targets = targets_of(reached)
    for insn in reached:
        kind = classify(insn.mnemonic, insn.op_str)
        if kind is not None:
            scan.sites.append((insn, kind))
    scan.sites.sort(key=lambda site: site[0].address)
    return scan
