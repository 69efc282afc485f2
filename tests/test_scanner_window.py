"""The window planner: which bytes a site's 5-byte jump may overwrite, and why not.

Code is assembled with keystone where it gets the encoding right and written by hand
where it does not (loop, jrcxz, xbegin); every hand-written encoding is checked
against capstone, the decoder the scanner uses.
"""
from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from hypothesis import given, settings
from hypothesis import strategies as st
from keystone import KS_ARCH_X86, KS_MODE_64, Ks

from sbe.scanner.decode import Insn, decode_from
from sbe.scanner.sensitive import classify, direct_target, is_terminator
from sbe.scanner.window import (BLOCK_TOO_SHORT, EARLIER_WINDOW, END_NOT_BOUNDARY, ENDBR, JMP5,
                            KIND_TRAPS, NO_PADDING, OTHER_SITE, OVERLAPPING, PAGE_END, PAGE_START,
                            PATCHABLE_KINDS, REASONS, RELATIVE_BRANCH, SLOT_CALL, TARGET_INSIDE,
                            UNDECODED, Fallback, Window, branch_targets, plan_windows)

KS = Ks(KS_ARCH_X86, KS_MODE_64)
CS = Cs(CS_ARCH_X86, CS_MODE_64)
BASE = 0x400000
LIBC = Path("/usr/lib/x86_64-linux-gnu/libc.so.6")


def asm(text: str, address: int = BASE) -> bytes:
    return bytes(KS.asm(text, address)[0])


def decode_one(code: bytes, base: int, address: int) -> Insn | None:
    offset = address - base
    if not 0 <= offset < len(code):
        return None
    return next(decode_from(code[offset:offset + 15], address, address), None)


def hand(hex_bytes: str, mnemonic: str) -> bytes:
    """Hand-encoded bytes, checked to be exactly one instruction `mnemonic`."""
    code = bytes.fromhex(hex_bytes)
    (_, size, name, _), = CS.disasm_lite(code, BASE)
    assert (size, name) == (len(code), mnemonic)
    return code


ENDBR64 = hand("f30f1efa", "endbr64")   # keystone does not know it


class Page:
    """Code at BASE decoded linearly, as a scan of straight-line code finds it."""

    def __init__(self, code: bytes, end: int | None = None, drop=(), extra_starts=(), starts=None):
        self.code = code
        self.end = BASE + len(code) if end is None else end
        if starts is None:
            starts = {i.address for i in decode_from(code, BASE, BASE) if i.address < self.end}
        self.starts = (set(starts) - set(drop)) | set(extra_starts)
        self.insns = {a: decode_one(code, BASE, a) for a in sorted(self.starts)}
        self.sites = [(i, classify(i.mnemonic, i.op_str)) for i in self.insns.values()
                      if classify(i.mnemonic, i.op_str)]
        self.targets = branch_targets(code, BASE, self.starts)

    def plan(self, targets=(), kinds=PATCHABLE_KINDS, rejections=None, arrivals=()):
        plans = plan_windows(self.code, BASE, self.end, self.starts, self.sites,
                             self.targets | set(targets) | set(arrivals), kinds,
                             arrivals=frozenset(arrivals), rejections=rejections)
        check_plans(self.code, BASE, self.end, self.starts, self.sites, self.targets | set(targets),
                    kinds, plans)
        return plans

    def site(self, mnemonic: str) -> Insn:
        (insn,) = [i for i, _ in self.sites if i.mnemonic == mnemonic]
        return insn

    def insn(self, mnemonic: str, op_str: str = "") -> Insn:
        (insn,) = [i for i in self.insns.values() if (i.mnemonic, i.op_str) == (mnemonic, op_str)]
        return insn


def plan_of(plans, site: Insn):
    (plan,) = [p for p in plans if p.site == site]
    return plan


def only(page: Page, mnemonic: str, **kw):
    return plan_of(page.plan(**kw), page.site(mnemonic))


# -- the invariants every plan keeps, checked after every planning in this file

def forward_allowed(site: Insn, kind: str) -> bool:
    name = site.mnemonic.rpartition(" ")[2]
    return (kind != "branch" and name not in ("call", "lcall")
            and not is_terminator(site.mnemonic, site.op_str))


def movable(insn: Insn, site_addresses, before: bool = False) -> bool:
    """May `insn` be displaced (before the site: a prefix-free jcc may)."""
    name = insn.mnemonic.rpartition(" ")[2]
    jcc = (before and name.startswith("j") and name not in ("jmp", "jrcxz", "jecxz", "jcxz")
           and insn.size in (2, 6))
    return not (insn.address in site_addresses or classify(insn.mnemonic, insn.op_str)
                or name in ("endbr64", "endbr32", "int1", "into")
                or (direct_target(insn.mnemonic, insn.op_str) is not None and not jcc)
                or is_terminator(insn.mnemonic, insn.op_str))


def window_flaws(code, base, end, starts, site_addresses, targets, chain) -> list[str]:
    """What, by the rules, is wrong with a window of the contiguous instructions `chain`."""
    start, stop = chain[0].address, chain[-1].end
    flaws = []
    if start < base or stop > end:
        flaws.append("outside the page")
    for a, b in zip(chain, chain[1:]):
        if a.end != b.address:
            flaws.append("gap")
    for insn in chain:
        if insn.address not in starts or decode_one(code, base, insn.address) != insn:
            flaws.append("not a decoded start")
    if any(t in targets for t in range(start + 1, stop)):
        flaws.append("target inside")
    if sum(1 for a in range(start, stop) if a in site_addresses) != 1:
        flaws.append("not exactly one site")
    boundaries = {insn.address for insn in chain}
    if any(a in starts and a not in boundaries for a in range(start + 1, stop)):
        flaws.append("start inside")
    for a in range(start - 14, start):
        if a in starts:
            other = decode_one(code, base, a)
            if other is None or other.end > start:
                flaws.append("instruction runs in")
    last = chain[-1]
    if stop not in starts and stop != end and not is_terminator(last.mnemonic, last.op_str):
        flaws.append("end not a boundary")
    return flaws


def island_flaws(code, base, end, starts, targets, window) -> list[str]:
    """What, by the rules, is wrong with a padding window's island: 5 bytes within
    `jmp rel8` reach from the site's 2, at the start of a run of nops and int3 that
    follows an unconditional terminator and reaches a 16-byte boundary, with no
    landing point inside."""
    island, flaws = window.island, []
    if not -128 <= island - (window.start + 2) <= 127:
        flaws.append("out of rel8 reach")
    if island < base or island + JMP5 > end:
        flaws.append("outside the page")
    if any(t in targets for t in range(island + 1, island + JMP5)):
        flaws.append("target inside")
    before = [a for a in range(island - 15, island) if a in starts
              and decode_one(code, base, a) is not None and decode_one(code, base, a).end == island]
    if not before or not is_terminator(*decode_one(code, base, before[-1])[2:]) \
            or decode_one(code, base, before[-1]).mnemonic in ("nop", "int3"):
        flaws.append("not after a terminator")
    at = island
    while at < island + JMP5 or at % 16:
        insn = decode_one(code, base, at)
        if insn is None or insn.mnemonic not in ("nop", "int3"):
            flaws.append("not padding up to a 16-byte boundary")
            break
        at = insn.end
    return flaws


def check_plans(code, base, end, starts, sites, targets, kinds, plans):
    site_addresses = {insn.address for insn, _ in sites}
    spans = []
    assert [p.site.address for p in plans] == sorted(site_addresses)
    last_end = base
    for plan in plans:
        assert (plan.site, plan.kind) in sites
        if isinstance(plan, Fallback):
            assert plan.reason in REASONS
            assert (plan.reason == KIND_TRAPS) == (plan.kind not in kinds)
            continue
        window = plan
        chain = list(window.insns)
        assert (window.start, window.end) == (chain[0].address, chain[-1].end)
        assert window.kind in kinds
        assert window.start >= last_end, "windows overlap"
        last_end = window.end
        spans.append((window.start, window.end))
        if window.island:
            spans.append((window.island, window.island + JMP5))
            assert window.before == window.after == () and not window.guard
            assert window_flaws(code, base, end, starts, site_addresses, targets, chain) == []
            assert island_flaws(code, base, end, starts, targets, window) == []
            continue
        assert window.size >= JMP5
        assert window_flaws(code, base, end, starts, site_addresses, targets, chain) == []
        assert all(movable(insn, site_addresses, before=True) for insn in window.before)
        assert all(movable(insn, site_addresses) for insn in window.after)
        if window.site.size >= JMP5 and not window.guard:
            assert window.before == window.after == ()
        if not forward_allowed(window.site, window.kind):
            assert window.after == ()
        if window.guard and "[" in window.site.op_str:
            # A slot call: the jump and `call [rsp - 8]` fit, and no fewer
            # instructions before the site would give them room.
            assert window.site.mnemonic.split()[-1] == "call" and window.after == ()
            assert window.size >= JMP5 + SLOT_CALL
            assert not window.before or window.size - window.before[0].size < JMP5 + SLOT_CALL
            continue
        if window.guard:
            # The site keeps its bytes: the jump and its padding lie before it, and the
            # site is a branch through a register the stub's check reads.
            assert window.kind == "branch" and window.after == ()
            assert JMP5 <= window.site.address - window.start < JMP5 + window.before[0].size
            continue
        # Minimal: without its outermost displaced instruction it would be too short.
        if window.before:
            assert window.size - window.before[0].size < JMP5
        if window.after:
            assert window.size - window.after[-1].size < JMP5
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "windows and islands overlap"


# -- each tactic

def test_site_of_five_bytes_or_more_is_its_own_window():
    page = Page(asm("nop; call qword ptr [rip + 0x100]; ret"))
    window = only(page, "call")
    assert isinstance(window, Window) and window.tactic == "site"
    assert (window.start, window.end, window.before, window.after) == (BASE + 1, BASE + 7, (), ())


def test_forward_displaces_the_instruction_after_the_site():
    page = Page(asm("nop; syscall; cmp rax, -4095; ret"))
    window = only(page, "syscall")
    assert window.tactic == "forward"
    assert window.after == (page.insn("cmp", "rax, -0xfff"),)
    assert (window.start, window.end) == (BASE + 1, BASE + 9)


def test_forward_takes_the_fewest_neighbours():
    page = Page(asm("syscall; nop; nop; nop; nop; nop; ret"))
    window = only(page, "syscall")
    assert [i.mnemonic for i in window.after] == ["nop"] * 3
    assert window.size == 5


def test_forward_is_tried_before_backward():
    page = Page(asm("mov eax, 1; syscall; mov rdx, rax; ret"))
    window = only(page, "syscall")
    assert window.tactic == "forward" and window.before == ()


def test_backward_when_the_block_ends_after_the_site():
    page = Page(asm("nop; mov eax, 0x27; syscall; ret"))
    window = only(page, "syscall")
    assert window.tactic == "backward"
    assert window.before == (page.insn("mov", "eax, 0x27"),)
    assert (window.start, window.end) == (BASE + 1, BASE + 8)


def test_backward_takes_the_fewest_neighbours():
    page = Page(asm("nop; push rbx; push rbp; push r12; rdtsc; ret"))
    window = only(page, "rdtsc")
    assert [i.op_str for i in window.before] == ["rbp", "r12"]   # r12 takes a REX byte
    assert window.size == 5


def test_both_ways_when_neither_alone_is_enough():
    page = Page(asm("ret") + ENDBR64 + asm("push rbx; push rcx; cpuid; nop; nop; ret"))
    window = only(page, "cpuid")
    assert window.tactic == "both"
    # Two one-byte pushes or two nops: equal bytes, so the fewer displaced before the site.
    assert [i.mnemonic for i in window.before] == ["push"] and window.before[0].op_str == "rcx"
    assert [i.mnemonic for i in window.after] == ["nop", "nop"]
    assert window.size == 5


def test_both_ways_prefers_fewest_displaced_bytes():
    # A one-byte site needs 4 more. Before it: xor (2), push (1); after it: xor (2),
    # nop (1). push+xor+nop = 4 bytes beats xor+push+xor = 5, though it takes more after.
    page = Page(asm("ret") + ENDBR64 + asm("xor eax, eax; push rbx; in al, dx; xor ecx, ecx; nop; ret"))
    window = only(page, "in", kinds=PATCHABLE_KINDS | {"privileged"})
    assert window.tactic == "both"
    assert [(i.mnemonic, i.op_str) for i in window.before] == [("push", "rbx")]
    assert [(i.mnemonic, i.op_str) for i in window.after] == [("xor", "ecx, ecx"), ("nop", "")]


def test_window_may_start_at_a_target():
    page = Page(asm("mov eax, 0x27; syscall; ret"))
    window = only(page, "syscall", targets={BASE})
    assert window.start == BASE


@pytest.mark.parametrize("neighbour", [
    "mov rax, qword ptr [rip + 0x100]",   # rip-relative: the relocation fixes it up
    "lea rdi, [rip + 0x100]",
    "push rbx",
    "pop rbx",
    "mov rax, qword ptr fs:[0x28]",
    "lock xadd qword ptr [rdx], rcx",
    "mov qword ptr [rsp + 8], rax",
])
def test_relocatable_neighbours_move(neighbour):
    page = Page(asm(f"syscall; {neighbour}; push rbx; push rbx; push rbx; ret"))
    window = only(page, "syscall")
    assert isinstance(window, Window) and window.after[0].address == BASE + 2


# -- each reason to fall back

@pytest.mark.parametrize("code, mnemonic", [
    ("0f01ee" "c3", "rdpkru"),
    ("0f01ef" "c3", "wrpkru"),
    ("f4" "c3", "hlt"),
    ("0f20c0" "c3", "mov"),   # mov rax, cr0
])
def test_kinds_that_trap_fall_back(code, mnemonic):
    fallback = only(Page(bytes.fromhex("48c7c000000000") + bytes.fromhex(code)), mnemonic)
    assert fallback == Fallback(fallback.site, fallback.kind, KIND_TRAPS)


def test_patchable_kinds_is_the_callers():
    page = Page(asm("cpuid; mov rdx, rax; ret"))
    assert only(page, "cpuid", kinds={"syscall"}).reason == KIND_TRAPS


def test_target_between_neighbour_and_site():
    page = Page(asm("test edi, edi; je L; mov eax, 0x27; L: syscall; ret"))
    assert only(page, "syscall").reason == TARGET_INSIDE


def test_target_between_site_and_neighbour():
    page = Page(asm("jne L; syscall; nop; ret; L: ret"))
    assert only(page, "syscall", targets={BASE + 4}).reason == TARGET_INSIDE


def test_target_inside_a_long_site():
    page = Page(asm("nop; call qword ptr [rip + 0x100]; ret"))
    assert only(page, "call", targets={BASE + 3}).reason == TARGET_INSIDE


def test_return_address_is_a_target():
    page = Page(asm("call f; syscall; ret; f: ret"))
    assert only(page, "syscall").reason == TARGET_INSIDE


def test_block_too_short():
    page = Page(asm("jrcxz L; syscall; ret; L: ret"))
    assert only(page, "syscall").reason == BLOCK_TOO_SHORT


@pytest.mark.parametrize("encoding, mnemonic", [
    ("7300", "jae"), ("eb00", "jmp"), ("e900000000", "jmp"), ("e800000000", "call"),
    ("e300", "jrcxz"), ("e200", "loop"), ("e100", "loope"), ("e000", "loopne"),
    ("c7f800000000", "xbegin"),
])
def test_relative_branch_after_the_site_does_not_move(encoding, mnemonic):
    page = Page(bytes.fromhex("0f05") + hand(encoding, mnemonic) + bytes.fromhex("c3"))
    assert only(page, "syscall").reason == RELATIVE_BRANCH


@pytest.mark.parametrize("encoding", ["7503", "0f8503000000"])
def test_a_conditional_jump_before_the_site_moves_with_it(encoding):
    # It branches over the syscall and its ret, to a second ret: outside the window.
    page = Page(bytes.fromhex("90") + hand(encoding, "jne") + bytes.fromhex("0f05c3c3"))
    window = only(page, "syscall")
    assert isinstance(window, Window) and [i.mnemonic for i in window.before][-1] == "jne"


def test_a_conditional_jump_into_the_window_does_not_move():
    # jne to itself: a target inside the window.
    page = Page(bytes.fromhex("90" "75fe" "0f05" "c3"))
    assert only(page, "syscall").reason == TARGET_INSIDE


@pytest.mark.parametrize("encoding, mnemonic", [("e303", "jrcxz"), ("e203", "loop")])
def test_relative_branch_before_the_site_starts_its_block(encoding, mnemonic):
    # Each branches over the syscall and its ret, to a second ret.
    page = Page(bytes.fromhex("90") + hand(encoding, mnemonic) + bytes.fromhex("0f05c3c3"))
    assert only(page, "syscall").reason == BLOCK_TOO_SHORT


@pytest.mark.parametrize("encoding, mnemonic", [("f30f1efa", "endbr64"), ("f30f1efb", "endbr32")])
def test_endbr_does_not_move(encoding, mnemonic):
    page = Page(bytes.fromhex("90") + hand(encoding, mnemonic) + bytes.fromhex("0f05c3"))
    assert only(page, "syscall").reason == ENDBR


@pytest.mark.parametrize("encoding, mnemonic", [("c3", "ret"), ("0f0b", "ud2"), ("cc", "int3"),
                                                ("f1", "int1")])
def test_terminators_and_traps_do_not_move(encoding, mnemonic):
    stop = hand(encoding, mnemonic)
    page = Page(bytes.fromhex("90") + stop + bytes.fromhex("0f05") + stop)
    assert only(page, "syscall").reason in (BLOCK_TOO_SHORT, TARGET_INSIDE)
    # With the target that follows a terminator removed, the block's edges remain.
    plans = plan_windows(page.code, BASE, page.end, page.starts, page.sites, set())
    assert plan_of(plans, page.site("syscall")).reason == BLOCK_TOO_SHORT


def test_neighbouring_sites_do_not_share_a_window():
    page = Page(asm("nop; cpuid; syscall; ret"))
    plans = page.plan()
    assert [p.reason for p in plans] == [OTHER_SITE, OTHER_SITE]


def test_later_site_does_not_take_an_earlier_window():
    page = Page(asm("cpuid; mov rdx, rax; syscall; ret"))
    cpuid, syscall = page.plan()
    assert cpuid.after == (page.insn("mov", "rdx, rax"),)
    assert syscall.reason == EARLIER_WINDOW


def test_later_site_tries_other_tactics_next_to_an_earlier_window():
    page = Page(asm("cpuid; mov rdx, rax; syscall; mov rdi, rax; ret"))
    cpuid, syscall = page.plan()
    assert cpuid.end == syscall.start and syscall.tactic == "forward"


def test_start_inside_a_neighbour():
    # A start in the middle of `mov rdx, rax` (89 c2 is `mov edx, eax`): the bytes
    # are two instructions at once, and the window would cut one of them.
    code = asm("nop; syscall; mov rdx, rax; ret")
    page = Page(code, extra_starts={BASE + 4})
    assert only(page, "syscall", targets=set()).reason == OVERLAPPING


def test_instruction_running_into_the_window():
    # `jmp +1` lands on the mov inside `push 0x27b8`, and something else reaches the
    # push: it runs four bytes into a window that would start at the mov.
    code = bytes.fromhex("eb01" "68" "b827000000" "0f05" "c3")
    page = Page(code, starts={BASE, BASE + 2, BASE + 3, BASE + 8, BASE + 10})
    assert page.insns[BASE + 2].mnemonic == "push" and page.insns[BASE + 3].mnemonic == "mov"
    assert only(page, "syscall").reason == OVERLAPPING


def test_neighbour_in_the_next_page():
    code = asm("jne L; syscall; mov rdx, rax; L: ret")
    page = Page(code, end=BASE + 4)
    assert only(page, "syscall").reason == PAGE_END


def test_neighbour_across_the_page_end():
    code = asm("jne L; syscall; mov rdx, rax; L: ret")
    page = Page(code, end=BASE + 6)
    assert only(page, "syscall").reason == PAGE_END


def test_site_across_the_page_end():
    code = asm("mov eax, 0x27; syscall; ret")
    page = Page(code, end=BASE + 6)
    assert only(page, "syscall").reason == PAGE_END
    long_site = Page(asm("nop; call qword ptr [rip + 0x100]; ret"), end=BASE + 4)
    assert only(long_site, "call").reason == PAGE_END


def test_window_may_end_at_the_page_end():
    code = asm("jne L; syscall; mov rdx, rax; L: ret")
    page = Page(code, end=BASE + 7)
    assert only(page, "syscall").end == BASE + 7


def test_neighbour_in_the_page_before():
    page = Page(asm("syscall; ret"))
    assert only(page, "syscall").reason == PAGE_START


def test_neighbour_the_scan_did_not_decode():
    before = Page(asm("mov eax, 0x27; syscall; ret"), drop={BASE})
    assert only(before, "syscall").reason == UNDECODED
    after = Page(asm("jrcxz L; syscall; mov rdx, rax; L: ret"), drop={BASE + 4})
    assert only(after, "syscall").reason == UNDECODED


def test_window_must_end_where_the_stub_can_return():
    # After the call: bytes no scan decoded. Its return would land there natively,
    # but the window's end is no instruction the scan knows.
    code = asm("nop; mov rax, qword ptr [rdi + 8]; call rax") + bytes.fromhex("06" "c3")
    page = Page(code, drop={BASE + 7, BASE + 8})
    assert only(page, "call").reason == END_NOT_BOUNDARY
    # A jmp never comes back: its window may end anywhere.
    code = asm("nop; mov rax, qword ptr [rdi + 8]; jmp rax") + bytes.fromhex("06" "c3")
    page = Page(code, drop={BASE + 7, BASE + 8})
    assert isinstance(only(page, "jmp"), Window)


# -- branch sites extend only backwards

@pytest.mark.parametrize("branch", ["call rax", "jmp rax", "call qword ptr [rax + 8]",
                                    "jmp qword ptr [rax + 8]"])
def test_branch_site_extends_backwards(branch):
    page = Page(asm(f"nop; mov rax, qword ptr [rdi + 8]; {branch}; mov rdi, rax; ret"))
    window = only(page, branch.split()[0])
    assert window.after == ()
    # Through a register: the stub checks, and the site itself branches. (A call
    # through memory has 5 bytes before it here, one short of a slot call's room.)
    assert window.tactic == ("backward" if "[" in branch else "guard")


@pytest.mark.parametrize("branch, before", [
    ("call qword ptr [rax + 0x30]", "mov rax, qword ptr [rdi + 8]; mov esi, ebx"),   # 3 bytes: 6 before
    ("call qword ptr [rax + 0xe0]", "mov esi, ebx; xor edx, edx"),                   # 6 bytes: 3 before
    ("call qword ptr [rip + 0x1000]", "mov esi, ebx; xor edx, edx"),
    ("call qword ptr [rsp + 0x10]", "mov rax, qword ptr [rdi + 8]; mov esi, ebx"),
])
def test_a_slot_call_needs_room_for_the_jump_and_its_call(branch, before):
    """The window holds the jump to the stub and, at its end, `call [rsp - 8]`:
    9 bytes with the site's, from as few instructions before it as give them."""
    window = only(Page(asm(f"nop; {before}; {branch}; ret")), "call")
    assert window.tactic == "slot" and window.end == window.site.end and window.after == ()
    assert window.size >= JMP5 + SLOT_CALL
    assert window.size - window.before[0].size < JMP5 + SLOT_CALL
    # Short of the room (the page starts 2 bytes before the site): other tactics.
    short = only(Page(asm(f"xor edx, edx; {branch}; ret")), "call")
    assert not (isinstance(short, Window) and short.tactic == "slot")


def test_no_slot_call_when_control_may_land_on_the_site():
    page = Page(asm("mov rax, qword ptr [rdi + 8]; mov esi, ebx; call qword ptr [rax + 0x30]; ret"))
    site = page.site("call")
    assert only(page, "call", targets={site.address}).reason == TARGET_INSIDE


@pytest.mark.parametrize("branch", ["call rax", "jmp rdx", "call r8"])
def test_a_guard_needs_five_bytes_before_the_site(branch):
    guarded = only(Page(asm(f"mov rdi, rbx; mov rax, qword ptr [rdi + 8]; {branch}; ret")), branch.split()[0])
    assert guarded.tactic == "guard" and guarded.end == guarded.site.end
    assert guarded.site.address - guarded.start == 7
    short = only(Page(asm(f"nop; mov rdi, rbx; {branch}; ret")), branch.split()[0])
    assert short.tactic == "backward"


def test_no_guard_when_control_may_land_on_the_site():
    page = Page(asm("mov rdi, rbx; mov rax, qword ptr [rdi + 8]; call rax; ret"))
    site = page.site("call")
    assert only(page, "call", targets={site.address}).reason == TARGET_INSIDE


def test_no_guard_through_rsp():
    page = Page(asm("mov rdi, rbx; mov rax, qword ptr [rdi + 8]; call rsp; ret"))
    assert only(page, "call").tactic == "backward"


@pytest.mark.parametrize("branch", ["call rax", "jmp rax"])
def test_branch_site_never_extends_forwards(branch):
    page = Page(asm(f"{branch}; mov rdi, rax; mov rdx, rax; ret"))
    fallback = only(page, branch.split()[0])
    assert fallback.reason == PAGE_START


# -- order and overlap

# -- the jmp rel8 to padding

def loop_head(before: str = "ret", padding: int | None = None) -> bytes:
    """A 2-byte site no window fits: an rdtsc at a loop head (a target) whose next
    instruction is a target too, after `before` and nop padding (up to BASE + 16
    unless `padding` says how much)."""
    head = asm(before)
    head += b"\x90" * (16 - len(head) if padding is None else padding)
    return head + asm("rdtsc; dec rcx; jne 0x%x; jmp 0x%x; ret" % (BASE + len(head), BASE + len(head) + 2),
                      BASE + len(head))


def test_a_site_no_window_fits_jumps_to_padding():
    page = Page(loop_head())
    window = only(page, "rdtsc")
    assert window.tactic == "padding" and (window.start, window.end) == (BASE + 16, BASE + 18)
    assert window.island == BASE + 1      # the run's first byte, after the ret


def test_no_island_where_control_arrived():
    page = Page(loop_head())
    fallback = only(page, "rdtsc", arrivals={BASE + 1})
    assert isinstance(fallback, Fallback) and fallback.reason == TARGET_INSIDE
    assert isinstance(only(page, "rdtsc", targets={BASE + 3}), Fallback)


@pytest.mark.parametrize("before, padding", [
    ("mov eax, 1", None),   # padding that control falls into is not padding
    ("ret", 3),             # too short for the jump, and no 16-byte boundary after it
])
def test_no_island_without_padding_after_a_terminator(before, padding):
    page = Page(loop_head(before, padding))
    rejections = Counter()
    fallback = only(page, "rdtsc", rejections=rejections)
    assert isinstance(fallback, Fallback) and fallback.reason != NO_PADDING
    assert rejections["padding", NO_PADDING] == 1


def test_padding_the_scan_did_not_decode_holds_an_island():
    page = Page(loop_head(), drop=range(BASE + 1, BASE + 16))
    assert only(page, "rdtsc").island == BASE + 1


def test_an_island_is_used_once():
    # two loop heads after one run of padding: the second site finds no other
    code = loop_head()
    second = len(code)
    code += asm("rdtsc; dec rcx; jne 0x%x; jmp 0x%x; ret" % (BASE + second, BASE + second + 2), BASE + second)
    page = Page(code)
    first, other = [plan_of(page.plan(), insn) for insn, _ in page.sites]
    assert first.tactic == "padding" and isinstance(other, Fallback)


def test_plans_come_in_address_order_one_per_site():
    page = Page(asm("mov eax, 1; syscall; mov eax, 2; syscall; rdtsc; mov rdx, rax; ret"))
    plans = plan_windows(page.code, BASE, page.end, page.starts, page.sites[::-1] + page.sites[:1],
                         page.targets)
    assert [p.site for p in plans] == [i for i, _ in page.sites]


def test_rejections_are_counted_by_tactic_and_reason():
    page = Page(asm("nop; mov eax, 0x27; syscall; ret; rdpkru"))
    counts = Counter()
    page.plan(rejections=counts)
    assert counts == {("forward", BLOCK_TOO_SHORT): 1, ("kind", KIND_TRAPS): 1}


# -- branch_targets

def test_branch_targets():
    code = asm("""
        jne A
        call B
        nop
        jmp rax
    A:  nop
        ret
    B:  lea rdi, [rip + C]
        nop
    C:  cmp eax, 1
        ud2
        nop
    """)
    insns = list(decode_from(code, BASE, BASE))
    assert [(i.address - BASE, i.mnemonic) for i in insns] == [
        (0, "jne"), (2, "call"), (7, "nop"), (8, "jmp"), (10, "nop"), (11, "ret"),
        (12, "lea"), (19, "nop"), (20, "cmp"), (23, "ud2"), (25, "nop")]
    assert insns[6].op_str == "rdi, [rip + 1]"
    targets = branch_targets(code, BASE, {i.address for i in insns})
    assert targets == {BASE + 10,   # jne's target, and after an indirect jmp
                       BASE + 12,   # call's target, and after a ret
                       BASE + 7,    # after a call
                       BASE + 20,   # the address lea takes
                       BASE + 25}   # after ud2
    assert BASE + 2 not in targets  # a conditional's fall-through is not a target


def test_branch_targets_of_runs_with_gaps():
    code = asm("nop; ret; nop; nop; call 0x400000")
    starts = {BASE, BASE + 1, BASE + 3, BASE + 4}   # BASE + 2 left out: the run breaks there
    assert branch_targets(code, BASE, starts) == {BASE + 2, BASE, BASE + 9}


# -- properties over generated code

def fixed(hex_bytes: str):
    return st.just(bytes.fromhex(hex_bytes))


def with_operand(opcode: str, operand_bytes: int):
    return st.binary(min_size=operand_bytes, max_size=operand_bytes).map(lambda b: bytes.fromhex(opcode) + b)


MOVABLE = ["90", "53", "59", "50", "c9", "31c0", "89c2", "4889c2", "4801d0", "b827000000", "488b0510000000",
           "488d05f0ffffff", "488b4708", "483d01f0ffff", "0f1f4000", "64488b042528000000"]
SITES = ["0f05", "0fa2", "0f31", "0f01f9", "ffd0", "ffe0", "ff1510000000", "ff6008", "0f01ee",
         "f4", "cd80", "ec"]
CONTROL = ["c3", "0f0b", "cc", "f1", "f30f1efa", "f30f1efb"]
BRANCHES = st.one_of(with_operand("75", 1), with_operand("eb", 1), with_operand("e3", 1),
                     with_operand("e2", 1), with_operand("e8", 4), with_operand("c7f8", 4))
# Mostly instructions that may move, so that windows are common and each rule has
# neighbours to refuse.
INSNS = st.integers(0, 19).flatmap(
    lambda n: st.sampled_from(MOVABLE).map(bytes.fromhex) if n < 13
    else st.sampled_from(SITES).map(bytes.fromhex) if n < 16
    else st.sampled_from(CONTROL).map(bytes.fromhex) if n < 18 else BRANCHES)
# Only short instructions: sites need neighbours on both sides.
SHORT_INSNS = st.integers(0, 19).flatmap(
    lambda n: st.sampled_from(["90", "53", "59", "c9", "31c0", "89c2"]).map(bytes.fromhex) if n < 15
    else st.sampled_from(["0f05", "0fa2", "0f31", "ffd0", "ffe0"]).map(bytes.fromhex) if n < 18
    else st.sampled_from(["c3", "f30f1efa"]).map(bytes.fromhex) if n < 19 else with_operand("75", 1))


@st.composite
def pages(draw):
    code = b"".join(draw(st.lists(draw(st.sampled_from([INSNS, SHORT_INSNS])), min_size=6, max_size=40)))
    cut = draw(st.one_of(st.just(0), st.integers(0, min(6, len(code) - 1))))
    end = BASE + len(code) - cut
    code += draw(st.binary(max_size=15 - cut))
    linear = {i.address for i in decode_from(code, BASE, BASE) if i.address < end}
    dropped = draw(st.sets(st.sampled_from(sorted(linear)), max_size=2))
    extra = draw(st.sets(st.integers(BASE, end - 1), max_size=2))
    starts = (linear - dropped) | {a for a in extra if decode_one(code, BASE, a) is not None}
    insns = [decode_one(code, BASE, a) for a in sorted(starts)]
    sites = [(i, classify(i.mnemonic, i.op_str)) for i in insns if classify(i.mnemonic, i.op_str)]
    targets = branch_targets(code, BASE, starts) if draw(st.booleans()) else set()
    targets |= draw(st.sets(st.integers(BASE - 2, end + 2), max_size=3))
    kinds = draw(st.sampled_from([PATCHABLE_KINDS, PATCHABLE_KINDS | {"privileged", "pkru"}]))
    return code, end, starts, sites, targets, kinds


def tiling(code, starts, start: int, stop: int) -> list[Insn] | None:
    """The decoded starts that cover [start, stop) exactly, one after another, or None."""
    chain, address = [], start
    while address < stop:
        insn = decode_one(code, BASE, address) if address in starts else None
        if insn is None:
            return None
        chain.append(insn)
        address = insn.end
    return chain if address == stop else None


def reference_window(code, end, starts, sites, targets, kinds, site, kind, floor):
    """The window the rules choose for `site`, found by trying every byte range."""
    if kind not in kinds or site.address < floor:
        return None
    site_addresses = {insn.address for insn, _ in sites}
    register = kind == "branch" and "[" not in site.op_str and "sp" not in site.op_str
    memory_call = kind == "branch" and "[" in site.op_str and site.mnemonic.split()[-1] == "call"
    if register or memory_call:
        guards = []
        # A guard's jump fits before the site; a slot call's jump and `call [rsp - 8]`
        # before its end.
        last = site.address - JMP5 if register else min(site.address, site.end - JMP5 - SLOT_CALL)
        for start in range(max(floor, BASE, site.address - 20), last + 1):
            chain = tiling(code, starts, start, site.end)
            if chain is None or chain[-1] != site:
                continue
            if not all(movable(insn, site_addresses, before=True) for insn in chain[:-1]):
                continue
            if window_flaws(code, BASE, end, starts, site_addresses, targets, chain):
                continue
            guards.append((site.address - start, start))
        if guards:
            return min(guards)[1], site.end
    valid = []
    for start in range(max(floor, BASE, site.address - 20), site.address + 1):
        for stop in range(site.end, min(end, site.end + 20) + 1):
            if site.size >= JMP5 and (start, stop) != (site.address, site.end):
                continue
            if stop - start < JMP5 or (stop > site.end and not forward_allowed(site, kind)):
                continue
            chain = tiling(code, starts, start, stop)
            if chain is None or site not in chain:
                continue
            before, after = chain[:chain.index(site)], chain[chain.index(site) + 1:]
            if not (all(movable(insn, site_addresses, before=True) for insn in before)
                    and all(movable(insn, site_addresses) for insn in after)):
                continue
            if window_flaws(code, BASE, end, starts, site_addresses, targets, chain):
                continue
            tactic = 0 if not before else 1 if not after else 2
            valid.append((tactic, stop - start, len(chain), len(before), start, stop))
    return min(valid)[-2:] if valid else None


@settings(max_examples=600, deadline=None)
@given(pages())
def test_plans_keep_the_invariants_and_match_exhaustive_search(page):
    code, end, starts, sites, targets, kinds = page
    counts = Counter()
    plans = plan_windows(code, BASE, end, starts, sites, targets, kinds, rejections=counts)
    check_plans(code, BASE, end, starts, sites, targets, kinds, plans)
    floor = BASE
    for plan in plans:
        expected = reference_window(code, end, starts, sites, targets, kinds, plan.site, plan.kind, floor)
        if isinstance(plan, Window):
            assert (plan.start, plan.end) == expected
            floor = plan.end
        else:
            assert expected is None
            assert any(reason == plan.reason for (_, reason) in counts)
    assert set(reason for _, reason in counts) <= set(REASONS)


# -- real code

def libc_pages(every: int):
    from conftest import text_of
    from sbe.scanner.region import scan_region

    data, vaddr, entries = text_of(LIBC)
    first = vaddr // 4096 * 4096
    for page in itertools.islice(range(first, vaddr + len(data), 4096), 0, None, every):
        base, end = max(page, vaddr), min(page + 4096, vaddr + len(data))
        code = data[base - vaddr:end - vaddr + 15]
        page_entries = {e for e in entries if base <= e < end}
        yield code, base, end, page_entries, scan_region(code, base, end, page_entries)


@pytest.mark.skipif(not LIBC.exists(), reason="no x86-64 libc at the usual path")
def test_libc_pages_keep_the_invariants():
    windows = fallbacks = 0
    for code, base, end, entries, scan in libc_pages(every=8):
        targets = branch_targets(code, base, scan.starts) | entries
        plans = plan_windows(code, base, end, scan.starts, scan.sites, targets)
        check_plans(code, base, end, scan.starts, scan.sites, targets, PATCHABLE_KINDS, plans)
        windows += sum(isinstance(p, Window) for p in plans)
        fallbacks += sum(isinstance(p, Fallback) for p in plans)
    assert windows > 5 * fallbacks > 0
