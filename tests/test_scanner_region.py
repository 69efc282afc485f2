"""Recursive descent and gap sweeping over real instruction bytes, by both scanners:
the reference (scanner/region.py) and the C one (scanner/region.c)."""
from __future__ import annotations

from unittest.mock import patch

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from hypothesis import given, settings
from hypothesis import strategies as st
from keystone import KS_ARCH_X86, KS_MODE_64, Ks

import sbe.scanner.region
from sbe.scanner import region as reference
from sbe.scanner import scan as scanning
from sbe.scanner.sensitive import classify, direct_target, is_terminator

KS = Ks(KS_ARCH_X86, KS_MODE_64)
CS = Cs(CS_ARCH_X86, CS_MODE_64)
BASE = 0x400000
PAGE = 4096
CPUID = bytes.fromhex("0fa2")
SYSCALL = bytes.fromhex("0f05")
RET = bytes.fromhex("c3")
NOP = bytes.fromhex("90")
RDTSC_RET = bytes.fromhex("0f31c3")


SCANNERS = {"reference": reference.scan_region}
if scanning.lib is not None:
    SCANNERS["native"] = scanning.native_scan_region


@pytest.fixture(autouse=True, params=sorted(SCANNERS), scope="module")
def scanner(request):
    """Every test of this module runs on each scanner (scan_page included)."""
    before = scanning.scan_region
    scanning.scan_region = SCANNERS[request.param]
    yield request.param
    scanning.scan_region = before


def scan_region(*args, **kwargs):
    return scanning.scan_region(*args, **kwargs)


def scan_page(*args, **kwargs):
    return scanning.scan_page(*args, **kwargs)


def test_the_native_scanner_is_built():
    """make setup builds it; without it every test here would check the reference only."""
    assert scanning.lib is not None, "scanner/_region_native is not built: run tools/build_native.py"


def asm(text: str, address: int = BASE) -> bytes:
    return bytes(KS.asm(text, address)[0])


def scan(code: bytes, entries, end: int | None = None, **kwargs):
    """scan_region over all of `code` (or up to `end`) at BASE."""
    return scan_region(code, BASE, BASE + len(code) if end is None else end, entries, **kwargs)


def site_map(result) -> dict[int, str]:
    return {insn.address: kind for insn, kind in result.sites}


# -- descent

def test_descent_follows_both_sides_of_branches_and_calls():
    code = asm("""
        test eax, eax
        jne other
        cpuid
        ret
    other:
        call func
        rdtsc
        ret
    func:
        syscall
        ret
    """)
    result = scan(code, [BASE], sweep=False)
    assert site_map(result) == {
        BASE + code.index(CPUID): "cpuid",
        BASE + code.index(bytes.fromhex("0f31")): "rdtsc",
        BASE + code.index(SYSCALL): "syscall",
    }
    assert result.outside == set()
    assert result.swept == 0


@pytest.mark.parametrize("terminator", ["c3", "f2c3", "ffe0", "3eff20", "48ff28", "0f0b", "cc", "cd03", "f4"])
def test_descent_stops_at_terminators(terminator):
    code = bytes.fromhex(terminator) + CPUID + RET
    result = scan(code, [BASE], sweep=False)
    assert result.starts == {BASE}
    assert "cpuid" not in site_map(result).values()


@pytest.mark.parametrize("passer", ["ffd0", "ff15f0ffffff", "e800000000", "7400", "cd80", "0f05"])
def test_descent_continues_past_calls_and_conditionals(passer):
    code = bytes.fromhex(passer) + CPUID + RET
    result = scan(code, [BASE], sweep=False)
    assert site_map(result)[BASE + len(passer) // 2] == "cpuid"


def test_direct_jump_is_followed_not_fallen_through():
    code = asm("jmp over; cpuid; over: rdtsc; ret")
    result = scan(code, [BASE], sweep=False)
    assert sorted(site_map(result).values()) == ["rdtsc"]


def test_branch_targets_outside_the_region_are_reported_as_outside():
    code = asm(f"call {BASE - 0x100}; jne {BASE + 0x2000}; jmp {BASE + 0x3000}", BASE)
    result = scan(code, [BASE, BASE + 0x5000])
    assert result.outside == {BASE - 0x100, BASE + 0x2000, BASE + 0x3000}
    assert BASE + 0x5000 not in result.starts | result.outside  # an entry elsewhere is not ours


def test_entries_that_do_not_decode_give_nothing():
    result = scan(bytes.fromhex("ffff") + CPUID, [BASE], sweep=False)
    assert result.starts == set() and result.sites == []


def test_jump_into_the_middle_of_an_instruction_decodes_both():
    # jmp +1 lands on the second byte of `mov eax, 0x9090050f`, where 0f 05 is a syscall.
    code = bytes.fromhex("eb01" "b80f059090" "c3")
    result = scan(code, [BASE, BASE + 2], sweep=False)
    assert result.starts == {BASE, BASE + 2, BASE + 3, BASE + 5, BASE + 6, BASE + 7}
    assert site_map(result) == {BASE + 3: "syscall"}


# -- the region's edge

def test_instruction_straddling_the_page_end_decodes_whole():
    page = NOP * (PAGE - 1) + SYSCALL[:1]
    after = SYSCALL[1:] + NOP * 14
    result = scan_page(page + after, BASE, [BASE], sweep=False)
    (insn, kind), = result.sites
    assert (insn.address, insn.size, kind) == (BASE + PAGE - 1, 2, "syscall")
    assert max(result.starts) == BASE + PAGE - 1
    assert result.outside == {BASE + PAGE + 1}


def test_instruction_starting_at_the_page_end_belongs_to_the_next_page():
    code = NOP * PAGE + SYSCALL + NOP * 13
    result = scan_page(code, BASE, [BASE], sweep=False)
    assert result.sites == []
    assert max(result.starts) == BASE + PAGE - 1
    assert result.outside == {BASE + PAGE}


def test_page_scan_uses_page_size():
    code = NOP * 64 + CPUID
    assert scan_page(code, BASE, [BASE], page_size=64).outside == {BASE + 64}
    assert site_map(scan_page(code, BASE, [BASE], page_size=128)) == {BASE + 64: "cpuid"}


# -- known starts

def test_known_starts_stop_the_descent_and_are_not_reported_again():
    # B (at the region start) is only found later, when execution enters it; it
    # runs into A, which the first scan already covered.
    code = asm("B: rdtsc; jmp A; A: cpuid; ret")
    a = BASE + code.index(CPUID)
    first = scan(code, [a])
    assert site_map(first) == {a: "cpuid"}
    second = scan(code, [BASE, a], known=first.starts)
    assert site_map(second) == {BASE: "rdtsc"}
    assert second.starts == {BASE, BASE + 2}
    assert second.starts.isdisjoint(first.starts)


def test_known_starts_anchor_the_sweep_without_being_swept_again():
    code = RET + CPUID + RET + RDTSC_RET
    result = scan(code, [], known={BASE})
    assert site_map(result) == {BASE + 1: "cpuid", BASE + 4: "rdtsc"}
    assert result.starts == {BASE + 1, BASE + 3, BASE + 4, BASE + 6}


# -- the sweep

def test_sweep_decodes_gaps_after_terminators():
    code = RET + CPUID + RET
    result = scan(code, [BASE])
    assert site_map(result) == {BASE + 1: "cpuid"}
    assert result.starts == {BASE, BASE + 1, BASE + 3}
    assert result.swept == 2


def test_gap_at_region_start_is_swept_only_from_a_known_alignment():
    code = NOP + CPUID + RET + RDTSC_RET
    entry = BASE + 4
    unanchored = scan(code, [entry])
    assert unanchored.starts == {entry, entry + 2}
    assert unanchored.swept == 0
    assert site_map(scan(code, [entry], known={BASE}))[BASE + 1] == "cpuid"
    assert site_map(scan(code, [entry, BASE]))[BASE + 1] == "cpuid"


def test_gap_with_an_undecodable_byte_is_discarded_whole():
    data = CPUID + bytes.fromhex("ffff")
    code = asm(f"jmp {BASE + 2 + len(data)}") + data + RET
    result = scan(code, [BASE])
    assert result.starts == {BASE, BASE + 2 + len(data)}
    assert result.sites == [] and result.swept == 0
    clean = scan(code.replace(bytes.fromhex("ffff"), NOP * 2), [BASE])
    assert site_map(clean) == {BASE + 2: "cpuid"}


def test_gap_overrunning_a_found_instruction_is_discarded_whole():
    # b8 starts a 5-byte mov that would swallow the ret the jmp goes to.
    data = CPUID + bytes.fromhex("b8")
    code = asm(f"jmp {BASE + 2 + len(data)}") + data + RET + NOP * 8
    result = scan(code, [BASE])
    assert "cpuid" not in site_map(result).values()
    assert BASE + 2 not in result.starts
    fitting = scan(code.replace(data, CPUID + NOP), [BASE])
    assert site_map(fitting) == {BASE + 2: "cpuid"}


def test_gap_cut_off_by_the_end_of_the_bytes_is_kept():
    code = RET + CPUID + bytes.fromhex("b8")  # the mov's immediate lies past the bytes we have
    result = scan(code, [BASE])
    assert site_map(result) == {BASE + 1: "cpuid"}
    assert result.starts == {BASE, BASE + 1}


def test_swept_instructions_may_straddle_the_region_end():
    code = RET + NOP + SYSCALL + NOP * 13
    result = scan(code, [BASE], end=BASE + 3)
    assert site_map(result) == {BASE + 2: "syscall"}


def test_swept_code_branches_are_entries_inside_and_outside():
    """A call from swept code must not land on undecoded bytes: its target is
    descended here (even in the unanchored gap at the region start) or handed out."""
    target_here = BASE
    code = NOP + NOP + RET + asm(f"jmp {BASE + 0x9000}", BASE + 3)
    code += asm(f"call {target_here}", BASE + 8) + RET
    result = scan(code, [BASE + 2])
    assert BASE + 0x9000 in result.outside
    assert {BASE, BASE + 1} <= result.starts     # reached only through the swept call


def test_swept_code_falling_off_the_region_end_hands_on_its_fall_through():
    code = RET + NOP * 3 + NOP * 15
    result = scan(code, [BASE], end=BASE + 4)
    assert BASE + 4 in result.outside


def test_region_larger_than_a_decode_window():
    movs = asm("mov eax, 0x12345678") * 2000 + CPUID + RET
    result = scan(movs, [BASE], sweep=False)
    assert len(result.starts) == 2002
    assert site_map(result) == {BASE + 10000: "cpuid"}


# -- properties over generated code

def chunk(opcode: str, operand_bytes: int):
    operands = st.binary(min_size=operand_bytes, max_size=operand_bytes)
    return operands.map(lambda b: bytes.fromhex(opcode) + b)


CHUNKS = st.one_of(
    st.sampled_from([NOP, RET, CPUID, SYSCALL] + [bytes.fromhex(h) for h in (
        "ffe0", "ffd0", "cc", "0f0b", "f4", "0f31", "cd80", "3effe0", "0f1f4000")]),
    chunk("b8", 4),      # mov eax, imm32: hides whatever its immediate holds
    chunk("48b8", 8),    # movabs
    chunk("eb", 1),      # jmp rel8
    chunk("75", 1),      # jne rel8
    chunk("e8", 4),      # call rel32, mostly out of the region
    st.binary(min_size=1, max_size=3),  # data
)


@st.composite
def regions(draw):
    code = b"".join(draw(st.lists(CHUNKS, min_size=1, max_size=60)))
    end = BASE + len(code)
    code += draw(st.binary(max_size=15))
    offsets = st.integers(min_value=-4, max_value=end - BASE + 4)
    entries = {BASE + o for o in draw(st.lists(offsets, max_size=6))}
    return code, end, entries


def reference_descent(code: bytes, end: int, entries: set[int]):
    """Descent decoding one instruction at a time: slow but plainly right."""
    found, outside, pending = {}, set(), [e for e in entries if BASE <= e < end]
    while pending:
        address = pending.pop()
        if address in found:
            continue
        if not BASE <= address < end:
            outside.add(address)
            continue
        window = code[address - BASE:address - BASE + 15]
        decoded = list(CS.disasm_lite(window, address, 1))
        if not decoded:
            continue
        (_, size, mnemonic, op_str), = decoded
        found[address] = (size, mnemonic, op_str)
        target = direct_target(mnemonic, op_str)
        if target is not None:
            pending.append(target)
        if not is_terminator(mnemonic, op_str):
            pending.append(address + size)
    return found, outside


@pytest.mark.parametrize("window", [16, 41, 1024])
@settings(max_examples=300, deadline=None)
@given(region=regions())
def test_descent_matches_instruction_at_a_time_decoding(window, region, scanner):
    code, end, entries = region
    if scanner == "native" and window != 1024:
        return   # the window is the reference's decoding in chunks; the C scan has none
    # Small windows make the generated code cross many window edges.
    with patch.object(sbe.scanner.region, "_WINDOW", window):
        result = scan(code, entries, end=end, sweep=False)
    found, outside = reference_descent(code, end, entries)
    assert result.starts == set(found)
    assert result.outside == outside
    assert [(i.address, i.size, i.mnemonic, i.op_str) for i, _ in result.sites] == [
        (a, *found[a]) for a in sorted(found) if classify(*found[a][1:])]


@settings(max_examples=400, deadline=None)
@given(regions())
def test_sweep_only_adds_starts_in_untouched_bytes(region):
    code, end, entries = region
    descent = scan(code, entries, end=end, sweep=False)
    full = scan(code, entries, end=end)
    swept = full.starts - descent.starts      # swept, and descended from swept branches
    assert descent.starts <= full.starts
    assert full.swept <= len(swept)
    assert descent.outside <= full.outside
    assert all(BASE <= s < end for s in full.starts)
    sites = {insn.address: (insn, kind) for insn, kind in full.sites}
    assert set(sites) <= full.starts
    assert all(classify(insn.mnemonic, insn.op_str) == kind for insn, kind in sites.values())
    covered = set()
    for start in descent.starts:
        (_, size, _, _), = CS.disasm_lite(code[start - BASE:start - BASE + 15], start, 1)
        covered.update(range(start, start + size))
    for start in swept:
        (_, size, _, _), = CS.disasm_lite(code[start - BASE:start - BASE + 15], start, 1)
        assert covered.isdisjoint(range(start, min(start + size, end))), hex(start)


@settings(max_examples=300, deadline=None)
@given(regions())
def test_rescan_with_everything_known_reports_nothing(region):
    code, end, entries = region
    first = scan(code, entries, end=end)
    again = scan(code, entries, end=end, known=first.starts)
    assert (again.starts, again.sites, again.outside, again.swept) == (set(), [], set(), 0)


def test_sweep_stops_at_zero_padding():
    """Zero padding between sections decodes two bytes at a time; an odd run of it
    falls out of step with the code after it. Here the sweep would otherwise decode
    `in al, dx` out of the `sub rsp, 8` that follows three zero bytes."""
    code = RET + CPUID + bytes(3) + bytes.fromhex("4883ec08") + bytes.fromhex("4883c408") + RET
    result = scan(code, [BASE])
    assert site_map(result) == {BASE + 1: "cpuid"}
    assert result.starts == {BASE, BASE + 1}
