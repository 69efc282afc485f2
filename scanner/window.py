"""Which bytes each site's 5-byte jump may overwrite: the window planner of patch mode.

In patch mode a site is replaced by `jmp rel32` (5 bytes) into its stub. A site shorter
than that needs neighbours: instructions of its basic block, next to it, that move
into the stub and run there (*displaced*). Whatever else is true of the guest, a
window is safe only if no thread can ever arrive at, or be stopped at, an address
strictly inside it: it would execute the tail of the `jmp` or the `int3` padding.
So the planner refuses any window with a known landing point strictly inside, and
trusts nothing it has not seen decoded.

The planner is a pure function of the bytes and of the scan's results (instruction
starts, sites) and a set of known landing points (`targets`); `branch_targets` gives
the part of that set the page's own code reveals, and the monitor adds what it knows
besides (symbols, fault addresses, signal handlers, the instruction pointers of
threads stopped inside the page).

Known gaps (landing points the default target set cannot see, so a window may cover
one; the caller must add them when it learns them, and undo a window that turns out
to hold one):
  - jump-table cases a switch also falls into from the case before (the table is
    data, and the `jmp reg` that uses it names no target);
  - exception landing pads that do not follow a terminator (the unwinder finds them
    in .gcc_except_table, not in the code);
  - direct branches from other pages into this one (known only once those pages are
    scanned, or from a whole-module scan);
  - a jump into the alignment padding that holds an island (see `_island`): compilers
    put labels after their padding, never in it, and a landing the monitor learns
    there demotes the site like any landing inside a window.
"""
from __future__ import annotations

import re
from bisect import bisect_left
from collections import Counter, namedtuple
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from itertools import accumulate

from .decode import Insn, decode_from, decode_one, ending_at
from .jumptable import TableJump
from .sensitive import classify, direct_target, is_terminator
from .x86 import MAX_INSN, conditional_jump

JMP5 = 5        # bytes of `jmp rel32`, the least a window holds
JMP2 = 2        # bytes of `jmp rel8`, a padding window's jump to its island
SLOT_CALL = 4   # bytes of `call qword ptr [rsp - 8]`, which ends a slot call's window
ALIGN = 16      # the alignment a run of padding must end at to hold an island
# The farthest an island lies from its site: `jmp rel8` reaches 128 bytes back and
# 127 on from the end of its 2 bytes, and the island holds a jmp5 there.
ISLAND_REACH = JMP2 + 127 + JMP5
_CHUNK = 256    # bytes handed to capstone at a time when decoding runs of starts

PATCHABLE_KINDS = frozenset({"syscall", "cpuid", "rdtsc", "rdtscp", "branch"})
_CALLS = frozenset({"call", "lcall"})
_ENDBR = frozenset({"endbr64", "endbr32"})
# Instructions that exist to trap, like int3 (already a terminator): whatever catches
# the trap looks at where it came from, so they stay where they are.
_TRAPS = frozenset({"int1", "into"})

# Why no safe window exists. When several tactics fail for different reasons, the
# fallback names the reason earliest in this tuple: the specific obstacles first,
# "basic block too short" (nothing in the way but the block's own ends) last.
KIND_TRAPS = "kind traps in patch mode"
TARGET_INSIDE = "branch target inside window"
RELATIVE_BRANCH = "neighbour not relocatable (relative branch)"
ENDBR = "neighbour not relocatable (endbr)"
OTHER_SITE = "neighbour is another site"
EARLIER_WINDOW = "overlaps an earlier window"
OVERLAPPING = "overlapping instructions"
PAGE_END = "crosses page end"
PAGE_START = "crosses page start"
UNDECODED = "neighbour not decoded"
END_NOT_BOUNDARY = "window end not an instruction boundary"
BLOCK_TOO_SHORT = "basic block too short"
NO_PADDING = "no padding within jmp rel8 reach"
REASONS = (KIND_TRAPS, TARGET_INSIDE, RELATIVE_BRANCH, ENDBR, OTHER_SITE, EARLIER_WINDOW,
           OVERLAPPING, PAGE_END, PAGE_START, UNDECODED, END_NOT_BOUNDARY, BLOCK_TOO_SHORT,
           NO_PADDING)
_RANK = {reason: rank for rank, reason in enumerate(REASONS)}

# rip-relative operand as disasm_lite prints it: "[rip + 0x2ea5]", "[rip - 8]".
_RIP_RELATIVE = re.compile(r"\[rip ([+-]) (0x[0-9a-f]+|\d+)\]")
_PADDING = frozenset({"nop", "int3"})


class Window(namedtuple("Window", "site kind start end before after guard island table",
                        defaults=(False, 0, ()))):
    """The bytes [start, end) a site's `jmp rel32` and int3 padding overwrite;
    `before` and `after`, the instructions displaced before and after the site, in
    order. `guard`: the site keeps its own bytes and runs natively once its stub has
    checked its target: the jump and its padding fill [start, site.address). The
    window still ends at the site's end, so nothing may land on the site itself:
    every way to it goes through the check. A guarded call through memory (a
    *slot call*, see `slot_call`) keeps the call but not its bytes: the window ends
    in `call [rsp - 8]`, where its stub left the target it checked. `island`: where the window (the site
    alone) holds `jmp rel8` to, 5 bytes of alignment padding that hold the `jmp rel32`
    to the stub (VirtualBox's patch manager and E9Patch jump through such
    trampolines when a site is too short for the long jump); 0 for none. `table`: the
    [start, end) of the jump table a proved table jump reads (scanner.jumptable): its
    stub runs the window's instructions, the jump included, unchecked; () for none."""
    __slots__ = ()

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def insns(self) -> tuple[Insn, ...]:
        return (*self.before, self.site, *self.after)

    @property
    def tactic(self) -> str:
        """Which tactic gave the window, as the statistics count it."""
        if self.table:
            return "table"
        if self.guard:
            return "slot" if slot_call(self.site, self.kind) else "guard"
        if self.island:
            return "padding"
        if self.before and self.after:
            return "both"
        if self.before:
            return "backward"
        return "forward" if self.after else "site"


class Fallback(namedtuple("Fallback", "site kind reason")):
    """A site that keeps a one-byte trap, because no safe window exists for it."""
    __slots__ = ()


def branch_targets(code: bytes, base: int, starts: Iterable[int]) -> set[int]:
    """The landing points the instructions at `starts` reveal themselves.

    Direct branch and call targets; the instruction after every call (a return lands
    there); the instruction after every terminator, indirect jmp included (the only
    way in is a jump). Also every address a rip-relative `lea` takes: code that takes
    its own address (function pointers, computed gotos, hand-written dispatch) may
    jump there, and a window planned across it would be entered in the middle. The
    set is a superset on purpose: an extra target costs one site a window at most.
    """
    return targets_of(_decode_starts(code, base, starts))


def targets_of(insns: Iterable[Insn]) -> set[int]:
    """branch_targets for instructions already decoded (a scan's own)."""
    targets: set[int] = set()
    for insn in insns:
        mnemonic, op_str = insn.mnemonic, insn.op_str
        target = direct_target(mnemonic, op_str)
        if target is not None:
            targets.add(target)
        name = mnemonic.rpartition(" ")[2]
        if name in _CALLS or is_terminator(mnemonic, op_str):
            targets.add(insn.end)
        elif name == "lea" and "rip" in op_str:
            match = _RIP_RELATIVE.search(op_str)
            if match:
                displacement = int(match[2], 0)
                targets.add(insn.end + displacement if match[1] == "+" else insn.end - displacement)
    return targets


def _decode_starts(code: bytes, base: int, starts: Iterable[int]) -> Iterator[Insn]:
    """The instruction at each start, decoded in runs: starts mostly follow one another,
    and one capstone call per run costs far less than one per instruction."""
    wanted = {s for s in starts if 0 <= s - base < len(code)}
    seen: set[int] = set()
    for first in sorted(wanted):
        if first in seen:
            continue
        address = first
        while True:
            # One chunk; capstone stops at a chunk's cut-off last instruction (a
            # truncated x86 instruction never decodes as a shorter one), and the next
            # chunk starts from there.
            offset = address - base
            decoded = stopped = False
            for insn in decode_from(code[offset:offset + _CHUNK], address, address):
                if insn.address not in wanted or insn.address in seen:
                    stopped = True
                    break
                seen.add(insn.address)
                yield insn
                address, decoded = insn.end, True
            if stopped or not decoded:
                break


class _Planner:
    """One page's planning: the scan's results and the instructions decoded so far."""

    def __init__(self, code: bytes, base: int, end: int, starts: AbstractSet[int],
                 sites: list[tuple[Insn, str]], targets: AbstractSet[int], arrivals: AbstractSet[int],
                 patchable_kinds: AbstractSet[str], rejections: Counter | None,
                 tables: Mapping[int, TableJump]) -> None:
        self.code, self.base, self.end = code, base, end
        self.tables = tables
        self.starts, self.targets, self.arrivals = starts, targets, arrivals
        self.site_addresses = {insn.address for insn, _ in sites}
        self.patchable_kinds = patchable_kinds
        self.rejections = rejections
        self._at: dict[int, Insn | None] = {}
        self.floor = base   # the end of the last window planned: later ones start there or after
        # Each window planned, [start, end) in address order, and each island's start:
        # no island may cover a window or another island, and no window an island.
        self.windows: list[tuple[int, int]] = []
        self.islands: list[int] = []

    def bytes_of(self, insn: Insn) -> bytes:
        offset = insn.address - self.base
        return self.code[offset:offset + insn.size]

    def at(self, address: int) -> Insn | None:
        if address not in self._at:
            self._at[address] = decode_one(self.code, self.base, address)
        return self._at[address]

    def plan(self, site: Insn, kind: str) -> Window | Fallback:
        if kind not in self.patchable_kinds:
            return self._reject(site, kind, "kind", [KIND_TRAPS])
        if site.address < self.base:
            return self._reject(site, kind, "site", [PAGE_START])
        if site.end > self.end:
            return self._reject(site, kind, "site", [PAGE_END])
        if site.address < self.floor:
            return self._reject(site, kind, "site", [EARLIER_WINDOW])
        shape = self.tables.get(site.address)
        if shape is not None:
            # A proved table jump: the bound, the load and the jump move together.
            before, stop = self._backward(site, site.address - shape.bound.address)
            if stop is None and tuple(before) != shape.insns[:-1]:
                stop = UNDECODED
            stop = stop or self._flaw([*before, site])
            if stop is None:
                return self._accept(site, kind, tuple(before), (), table=(shape.table, shape.end))
            self._count("table", stop)
        if guardable(site, kind) or slot_call(site, kind):
            # A guard's jump fits before the site; a slot call's jump and its
            # `call [rsp - 8]` fit before the site's end.
            room = JMP5 if guardable(site, kind) else max(0, JMP5 + SLOT_CALL - site.size)
            before, stop = self._backward(site, room)
            count = _reach(before[::-1], room)
            if stop is None and count is not None:
                chosen = tuple(before[len(before) - count:])
                stop = self._flaw([*chosen, site])
                if stop is None:
                    return self._accept(site, kind, chosen, (), guard=True)
            self._count("slot" if slot_call(site, kind) else "guard", stop)

        need = JMP5 - site.size
        if need <= 0:
            flaw = self._flaw([site])
            if flaw is None:
                return self._accept(site, kind, (), ())
            return self._reject(site, kind, "site", [flaw])

        # A call returns to the instruction after it, which must stay where it is; a
        # jmp (or any terminator) ends its block. Every `branch` site is one or the
        # other, so branch windows only ever extend backwards.
        name = site.mnemonic.rpartition(" ")[2]
        forward_allowed = name not in _CALLS and not is_terminator(site.mnemonic, site.op_str)
        after, after_stop = self._forward(site, need) if forward_allowed else ([], None)
        before, before_stop = self._backward(site, need)
        reasons: list[str] = []
        for tactic, nb, nf, stop in _candidates(before, after, need, before_stop, after_stop):
            if stop is None:
                chosen_before, chosen_after = tuple(before[len(before) - nb:]), tuple(after[:nf])
                stop = self._flaw([*chosen_before, site, *chosen_after])
                if stop is None:
                    return self._accept(site, kind, chosen_before, chosen_after)
            self._count(tactic, stop)
            reasons.append(stop)
        if self._flaw([site]) is None:
            island = self._island(site)
            if island:
                return self._accept(site, kind, (), (), island=island)
            self._count("padding", NO_PADDING)
        return Fallback(site, kind, min(reasons, key=_RANK.__getitem__))

    def _accept(self, site: Insn, kind: str, before: tuple[Insn, ...], after: tuple[Insn, ...],
                guard: bool = False, island: int = 0, table: tuple = ()) -> Window:
        start = before[0].address if before else site.address
        end = after[-1].end if after else site.end
        self.floor = end
        self.windows.append((start, end))
        if island:
            self.islands.append(island)
        return Window(site, kind, start, end, before, after, guard, island, table)

    def _reject(self, site: Insn, kind: str, tactic: str, reasons: list[str]) -> Fallback:
        for reason in reasons:
            self._count(tactic, reason)
        return Fallback(site, kind, min(reasons, key=_RANK.__getitem__))

    def _count(self, tactic: str, reason: str | None) -> None:
        if self.rejections is not None and reason is not None:
            self.rejections[tactic, reason] += 1

    def _island(self, site: Insn) -> int:
        """Where a `jmp rel8` at the site can go on to its stub: the first 5 bytes of
        a run of alignment padding within reach, or 0 when there is none.

        The run must be nops or int3 from an unconditional terminator up to a
        16-byte boundary, as compilers align the function or loop head after it:
        nothing falls into it, and nothing jumps into it, since the label is after
        the padding. Its first byte is a landing point only as every terminator's
        end is one (the superset `targets` holds), so the island may start there
        unless control is known to have arrived there (`arrivals`); it holds no
        other landing point, and no window or other island. The island starts the
        run, so a landing the monitor learns anywhere in it (a branch stub's miss)
        is a landing inside the patch, which demotes the site. The nearest run is
        taken."""
        origin = site.address + JMP2
        low, high = max(self.base, origin - 128), min(self.end - JMP5, origin + 127)
        boundaries = range((low + JMP5 + ALIGN - 1) // ALIGN * ALIGN, high + 2 * ALIGN, ALIGN)
        for boundary in sorted(boundaries, key=lambda b: abs(b - origin)):
            island = self._padding_before(boundary)
            if (island is None or boundary - island < JMP5 or not low <= island <= high
                    or island in self.arrivals or self._covers_island(island, island + JMP5)
                    or any(a in self.targets for a in range(island + 1, island + JMP5))):
                continue
            before = bisect_left(self.windows, (island + JMP5,)) - 1
            if before < 0 or self.windows[before][1] <= island:
                return island
        return 0

    def _padding_before(self, boundary: int) -> int | None:
        """Where the run of padding that ends at `boundary` starts, if one does: the
        end of the nearest decoded instruction before it, an unconditional
        terminator (not an int3, which may be padding itself), from which nops and
        int3 decode end to end up to `boundary`. The padding need not be among the
        scan's starts (nothing branches there, so a scan may not decode it)."""
        for address in range(boundary - 1, max(self.base, boundary - 2 * ALIGN) - 1, -1):
            if address not in self.starts:
                continue
            insn = self.at(address)
            if insn is None or insn.end > boundary:
                return None
            if insn.mnemonic.rpartition(" ")[2] in _PADDING:
                continue
            if not is_terminator(insn.mnemonic, insn.op_str):
                return None
            at = insn.end
            while at < boundary:
                padding = self.at(at)
                if padding is None or padding.mnemonic.rpartition(" ")[2] not in _PADDING:
                    return None
                at = padding.end
            return insn.end if at == boundary else None
        return None

    def _forward(self, site: Insn, need: int) -> tuple[list[Insn], str | None]:
        """The neighbours after the site that may move with it, until `need` bytes,
        and why the walk stopped short (None if it did not)."""
        run: list[Insn] = []
        total, address = 0, site.end
        while total < need:
            if address >= self.end:
                return run, PAGE_END
            if address in self.targets:
                return run, TARGET_INSIDE
            insn = self.at(address) if address in self.starts else None
            if insn is None:
                return run, UNDECODED
            if insn.end > self.end:
                return run, PAGE_END
            obstacle = self._obstacle(insn, forward=True)
            if obstacle is not None:
                return run, obstacle
            run.append(insn)
            total, address = total + insn.size, insn.end
        return run, None

    def _backward(self, site: Insn, need: int) -> tuple[list[Insn], str | None]:
        """The neighbours before the site that may move with it, in address order."""
        run: list[Insn] = []
        total, address = 0, site.address
        while total < need:
            if address <= self.base:
                return run[::-1], PAGE_START
            if address in self.targets:
                return run[::-1], TARGET_INSIDE
            insn = self._previous(address)
            if insn is None:
                return run[::-1], UNDECODED
            if insn.address < self.floor:
                return run[::-1], EARLIER_WINDOW
            obstacle = self._obstacle(insn, forward=False)
            if obstacle is not None:
                return run[::-1], obstacle
            run.append(insn)
            total, address = total + insn.size, insn.address
        return run[::-1], None

    def _previous(self, address: int) -> Insn | None:
        """The decoded instruction that ends at `address`, the nearest if several do."""
        return ending_at(address, self.starts.__contains__, self.at, self.base)

    def _obstacle(self, insn: Insn, forward: bool) -> str | None:
        """Why `insn` cannot be displaced, or None.

        A conditional jump before the site moves: the stub runs it as `jcc rel32` to
        the same target (leaving the stub when taken), and the site is its
        fall-through, which no one else reaches unless it is a known target. Any other
        branch or terminator before the site ends the block before it: the site
        starts its block, so that is the block's edge, not a relocation problem. After
        the site a direct branch does belong to the block, but moving it would need
        retargeting, which stubs do not do. rip-relative operands are fixed up by the
        relocation, and push/pop run the same anywhere, so they move.
        """
        if insn.address in self.site_addresses or classify(insn.mnemonic, insn.op_str) is not None:
            return OTHER_SITE
        name = insn.mnemonic.rpartition(" ")[2]
        if name in _ENDBR:
            return ENDBR
        if direct_target(insn.mnemonic, insn.op_str) is not None:
            if not forward and conditional_jump(self.bytes_of(insn), insn.address) is not None:
                return None
            return RELATIVE_BRANCH if forward else BLOCK_TOO_SHORT
        if is_terminator(insn.mnemonic, insn.op_str) or name in _TRAPS:
            return BLOCK_TOO_SHORT
        return None

    def _covers_island(self, start: int, end: int) -> bool:
        return any(island < end and start < island + JMP5 for island in self.islands)

    def _flaw(self, chain: list[Insn]) -> str | None:
        """What makes the window of the contiguous instructions `chain` unsafe, or None.

        The walks already stop at targets between instructions; this also catches a
        target or another decoded start in the middle of an instruction (code that
        jumps into its own instructions), an instruction from before the window
        running into it, and a window whose end the stub cannot jump back to.
        """
        start, end = chain[0].address, chain[-1].end
        for address in range(start + 1, end):
            if address in self.targets:
                return TARGET_INSIDE
        if self._covers_island(start, end):
            return EARLIER_WINDOW
        boundaries = {insn.address for insn in chain}
        for address in range(start + 1, end):
            if address in self.starts and address not in boundaries:
                return OVERLAPPING
        for address in range(start - MAX_INSN + 1, start):
            if address in self.starts:
                insn = self.at(address)
                if insn is None or insn.end > start:
                    return OVERLAPPING
        last = chain[-1]
        # The stub jumps back to `end`, where the last instruction would have gone on
        # natively: that must be an instruction the scan decoded, or the next page
        # (which the monitor scans before it runs), unless nothing goes on there.
        if end not in self.starts and end != self.end and not is_terminator(last.mnemonic, last.op_str):
            return END_NOT_BOUNDARY
        return None


def guardable(site: Insn, kind: str) -> bool:
    """An indirect jmp/call through a register other than rsp: its stub can check
    the target and let the site itself run, since nothing can change the register
    between the check and the branch. A `call` that runs natively pushes its return
    address as a call does, so the callee's `ret` is predicted; a stub that pushes
    it by hand makes every such `ret` a misprediction (with the return-stack
    predictor out of step for the returns after it). A memory operand is read again
    by the site, after the check, and another thread may have written it between."""
    return kind == "branch" and "[" not in site.op_str and "sp" not in site.op_str


def slot_call(site: Insn, kind: str) -> bool:
    """An indirect call through memory. Its stub cannot let the site run (it would
    read the operand again after the check, and another thread may have written it
    between), nor push the return address by hand (the callee's `ret` then matches
    no `call`, a return-stack misprediction, and the returns after it fall out of
    step). So the stub loads the target, checks it, leaves it at [rsp - 8], where the
    call's own push will go, and jumps to the window's last 4 bytes: `call [rsp -
    8]`, which ends where the site did and so pushes the site's own return address.
    Below rsp at a call is the callee's, dead to the caller; a signal frame is built
    below the red zone."""
    return kind == "branch" and "[" in site.op_str and site.mnemonic.rpartition(" ")[2] == "call"


def _reach(insns: list[Insn], need: int) -> int | None:
    """The fewest of `insns`, taken from the site outwards, that give `need` bytes."""
    if need <= 0:
        return 0
    total = 0
    for count, insn in enumerate(insns, 1):
        total += insn.size
        if total >= need:
            return count
    return None


def _first(*reasons: str | None) -> str:
    return min((r for r in reasons if r is not None), key=_RANK.__getitem__)


def _candidates(before: list[Insn], after: list[Insn], need: int, before_stop: str | None,
                after_stop: str | None) -> Iterator[tuple[str, int, int, str | None]]:
    """(tactic, instructions before, instructions after, None) for each candidate in
    the order they are tried, and (tactic, 0, 0, reason) for a tactic that has none
    because its walks stopped short, for `reason`.

    Forward first: the window then starts at the site, so the site's own address may
    be a landing point and nothing runs in the stub before the site's work. Then
    backward, then both ways, fewest displaced bytes first; every candidate is
    minimal (dropping its outermost instruction on either side leaves under 5 bytes).
    `after_stop` is None when the site may not extend forwards at all.
    """
    if after_stop is not None or after:
        forward = _reach(after, need)
        yield ("forward", 0, forward, None) if forward is not None else ("forward", 0, 0, after_stop)
    backward = _reach(before[::-1], need)
    yield ("backward", backward, 0, None) if backward is not None else ("backward", 0, 0, before_stop)
    if not (before and after):
        return
    sizes_before = list(accumulate((insn.size for insn in reversed(before)), initial=0))
    sizes_after = list(accumulate((insn.size for insn in after), initial=0))
    both = []
    for nb in range(1, len(before) + 1):
        for nf in range(1, len(after) + 1):
            displaced = sizes_before[nb] + sizes_after[nf]
            if (displaced >= need and sizes_before[nb - 1] + sizes_after[nf] < need
                    and sizes_before[nb] + sizes_after[nf - 1] < need):
                both.append((displaced, nb + nf, nb, nf))
    if sizes_before[-1] + sizes_after[-1] < need:
        yield "both", 0, 0, _first(after_stop, before_stop)
    for _, _, nb, nf in sorted(both):
        yield "both", nb, nf, None


def plan_windows(code: bytes, base: int, end: int, starts: AbstractSet[int],
                 sites: list[tuple[Insn, str]], targets: AbstractSet[int],
                 patchable_kinds: AbstractSet[str] = PATCHABLE_KINDS, *,
                 arrivals: AbstractSet[int] = frozenset(),
                 rejections: Counter | None = None,
                 tables: Mapping[int, TableJump] | None = None) -> list[Window | Fallback]:
    """A window or a fallback for each site of [base, end), in address order.

    `code` holds the original bytes of [base, end) and up to 15 more; `starts` and
    `sites` are a scan's; `targets` every address known to be reached other than by
    falling through (branch_targets plus what the monitor knows); `arrivals`, the
    part of it control is known to have reached (roots, threads' instruction
    pointers), not merely guessed from the code. Windows and islands stay inside
    [base, end), so a patch never writes into a page this scan did not see.

    Sites are planned greedily in address order, each window starting at or after
    the end of the one before: the windows never overlap, and no window covers a
    fallback's trap (a window holds exactly one site). `rejections`, if given,
    counts every tactic that failed, by (tactic, reason). `tables`: the table jumps
    among the sites that the caller proved (scanner.jumptable: every entry known
    code, the table unwritable), by site address; each gets the table tactic when
    its window is safe, and their entries must be among `targets`.
    """
    planner = _Planner(code, base, end, starts, sites, targets, arrivals, patchable_kinds, rejections,
                       tables or {})
    unique = {insn.address: (insn, kind) for insn, kind in sites}
    return [planner.plan(insn, kind) for insn, kind in (unique[a] for a in sorted(unique))]
