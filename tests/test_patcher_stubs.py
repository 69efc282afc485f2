"""Stub templates: every template decodes cleanly and keeps the invariants the
monitor relies on (where its trap is, where it resumes, that rsp comes back), and the
committed templates are what tools/gen_templates.py makes of its assembly text."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from capstone import x86_const as x86

from sbe.meta.syscalls import TRAPS_IN_STUB
from sbe.patcher import stubs, templates
from sbe.patcher.emit import compose, detached, placed
from sbe.scanner.decode import Insn
from sbe.scanner.window import SLOT_CALL, Window

CS = Cs(CS_ARCH_X86, CS_MODE_64)
CS_DETAIL = Cs(CS_ARCH_X86, CS_MODE_64)
CS_DETAIL.detail = True
GENERATOR = Path(__file__).resolve().parents[1] / "tools" / "gen_templates.py"
BODIES = {
    "syscall": stubs.syscall_body(), "cpuid": stubs.cpuid_body(),
    **{f"branch-{'call' if c else 'jmp'}-{r}-{part}": body
       for c in (True, False) for r in ("r10", "r11")
       for part, body in zip(("head", "tail"), stubs.branch_parts(c, r))},
    **{f"branch-slot-{r}": stubs.branch_slot(r)[1] for r in ("r10", "r11")},
}


@pytest.mark.parametrize("name", list(BODIES))
def test_templates_decode_whole(name):
    body = BODIES[name]
    insns = list(CS.disasm(body.code, 0))
    assert sum(i.size for i in insns) == len(body.code)
    for field, offset in body.fields.items():
        assert any(i.address < offset < i.address + i.size for i in insns), field


def test_a_slot_call_window_ends_in_the_call_it_is_named_for():
    """The window's last bytes decode as `call qword ptr [rsp - 8]`, as long as
    scanner.window.SLOT_CALL says, and a slot stub jumps back to them."""
    (insn,) = CS.disasm(stubs.SLOT_CALL_CODE, 0)
    assert (insn.mnemonic, insn.op_str, insn.size) == ("call", "qword ptr [rsp - 8]", SLOT_CALL)
    site = Insn(0x401007, 3, "call", "qword ptr [rax + 0x30]")
    before = (Insn(0x401000, 3, "mov", "rdi, rbx"), Insn(0x401003, 4, "mov", "rax, qword ptr [r12]"))
    window = Window(site, "branch", 0x401000, 0x40100a, before, (), True)
    cache = type("Cache", (), {"gadget_slot": 0x500000, "cpuid_table": 0x500040,
                               "branch_slot": 0x500008})()
    raw = bytes.fromhex("4889df" "498b0424" "ff5030")
    stub = compose("branch", site, window, raw, 0x500400, cache)
    last = list(CS.disasm(stub.code, 0x500400))[-1]
    assert (last.mnemonic, int(last.op_str, 16)) == ("jmp", window.end - SLOT_CALL)
    # The check is where a thread on the slot call goes back to: the site's state.
    assert stub.displaced == ((0, 0x401000), (3, 0x401003), (7, site.address))


def test_a_table_stub_runs_bound_load_and_jump_unchecked():
    """A proved table jump's stub is its window's instructions, the jump included,
    and nothing else: no check, no trap, no way back to the window."""
    before = (Insn(0x401000, 4, "movzx", "eax, sil"), Insn(0x401004, 8, "mov", "rax, qword ptr [rax*8 + 0x73af00]"))
    site = Insn(0x40100c, 2, "jmp", "rax")
    raw = bytes.fromhex("400fb6c6" "488b04c500af7300" "ffe0")
    window = Window(site, "branch", 0x401000, 0x40100e, before, (), table=(0x73AF00, 0x73B700))
    cache = type("Cache", (), {"gadget_slot": 0x500000, "cpuid_table": 0x500040, "branch_slot": 0x500008})()
    stub = compose("branch", site, window, raw, 0x500400, cache)
    assert stub.code == raw and stub.trap is None
    assert stub.displaced == ((0, 0x401000), (4, 0x401004))


def test_a_restarted_syscall_traps_again():
    """A signal may interrupt the syscall the monitor runs for a stub's trap; the
    kernel restarts it by rewinding rip by 2 from where the thread goes on. That
    must land on the trap, not inside another instruction."""
    site = Insn(0x401000, 2, "syscall", "")
    window = Window(site, "syscall", 0x401000, 0x401005, (),
                    (Insn(0x401002, 2, "mov", "eax, ebx"), Insn(0x401004, 1, "nop", "")))
    cache = type("Cache", (), {"gadget_slot": 0x500000, "cpuid_table": 0x500040,
                               "branch_slot": 0x500008})()
    stub = compose("syscall", site, window, bytes.fromhex("0f05" "89d8" "90"), 0x500400, cache)
    assert stub.resume - 2 == stub.trap
    assert stub.code[stub.trap] == stub.code[stub.trap + 1] == 0xCC


def test_committed_templates_are_the_generators_output():
    """Assembles every template with keystone, in memory: a change to the assembly
    text, to the stubs' constants or to the syscall table that was not followed by
    `.venv/bin/python tools/gen_templates.py` fails here."""
    spec = importlib.util.spec_from_file_location("gen_templates", GENERATOR)
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert generator.generate() == Path(templates.__file__).read_text(), \
        "patcher/templates.py is stale: run .venv/bin/python tools/gen_templates.py"


def test_the_syscall_body_traps_for_the_syscall_tables_calls():
    assert templates.TRAPS_IN_STUB == TRAPS_IN_STUB
    # lea ecx, [rax - nr]; jrcxz trap: the low 32 bits, as the kernel reads the number
    code = list(CS_DETAIL.disasm(stubs.syscall_body().code, 0))
    at = {insn.address: insn for insn in code}
    compared = []
    for insn, after in zip(code, code[1:]):
        if insn.id == x86.X86_INS_LEA and insn.reg_name(insn.operands[0].reg) == "ecx":
            assert insn.operands[1].mem.base == x86.X86_REG_RAX and after.id == x86.X86_INS_JRCXZ
            # to the trap: rsp back as at the site, then the int3
            restore = at[after.operands[0].imm]
            assert (restore.mnemonic, restore.op_str) == ("lea", "rsp, [rsp + 0x80]")
            assert restore.address + restore.size == stubs.syscall_body().trap
            compared.append(-insn.operands[1].mem.disp)
    assert compared == list(TRAPS_IN_STUB)


@pytest.mark.parametrize("name", [name for name, body in BODIES.items() if body.fields])
def test_a_field_is_the_rip_relative_disp32_ending_its_instruction(name):
    """`fill` aims a field relative to its own end, so it must end the instruction."""
    body = BODIES[name]
    for field, offset in body.fields.items():
        insn = next(i for i in CS_DETAIL.disasm(body.code, 0) if i.address < offset < i.address + i.size)
        assert insn.disp_offset == offset - insn.address and insn.disp_size == 4, field
        assert offset + 4 == insn.address + insn.size, field
        assert any(op.type == x86.X86_OP_MEM and op.mem.base == x86.X86_REG_RIP for op in insn.operands)


class _Cache:
    def __init__(self, start):
        self.start = start
        self.gadget_slot, self.branch_slot, self.cpuid_table = start, start + 8, start + 0x40


# (kind, site, window bytes, displaced before, displaced after), at 0x401000
_MOVABLE = [
    ("syscall", Insn(0x401007, 2, "syscall", ""), "488b0500010000" "0f05" "90",
     [Insn(0x401000, 7, "mov", "rax, qword ptr [rip + 0x100]")], [Insn(0x401009, 1, "nop", "")]),
    ("cpuid", Insn(0x401000, 2, "cpuid", ""), "0fa2" "89d8" "90", [],
     [Insn(0x401002, 2, "mov", "eax, ebx"), Insn(0x401004, 1, "nop", "")]),
    ("rdtsc", Insn(0x401000, 2, "rdtsc", ""), "0f31" "8b0d10000000", [],
     [Insn(0x401002, 6, "mov", "ecx, dword ptr [rip + 0x10]")]),
    # an immediate after the disp32: the rel32 counts from the instruction's end
    ("rdtsc", Insn(0x401000, 2, "rdtsc", ""), "0f31" "802552860100df", [],
     [Insn(0x401002, 7, "and", "byte ptr [rip + 0x18652], 0xdf")]),
    ("cpuid", Insn(0x401000, 2, "cpuid", ""), "0fa2" "833d8ff201000c", [],
     [Insn(0x401002, 7, "cmp", "dword ptr [rip + 0x1f28f], 0xc")]),
    ("branch", Insn(0x401000, 6, "jmp", "qword ptr [rip + 0x2000]"), "ff2500200000", [], []),
    ("branch", Insn(0x401000, 2, "call", "rax"), "ffd0" "4889c7", [], [Insn(0x401002, 3, "mov", "rdi, rax")]),
]


@pytest.mark.parametrize("kind,site,raw,before,after", _MOVABLE)
def test_a_moved_stub_is_the_stub_composed_there(kind, site, raw, before, after):
    """A stub composed once and moved (its code mapped elsewhere, its side cache
    elsewhere, at another offset in it) is byte for byte the one composed there."""
    raw = bytes.fromhex(raw)
    end = 0x401000 + len(raw)
    window = Window(site, kind, 0x401000, end, tuple(before), tuple(after))
    first = compose(kind, site, window, raw, 0x500400, _Cache(0x500000))
    for guest_delta, cache_start, at in [(0x10000, 0x700000, 0x700800), (-0x3000, 0x3f0000, 0x3f0040)]:
        def shift(insn):
            return insn._replace(address=insn.address + guest_delta)
        there = Window(shift(site), kind, window.start + guest_delta, end + guest_delta,
                       tuple(map(shift, before)), tuple(map(shift, after)))
        want = compose(kind, shift(site), there, raw, at, _Cache(cache_start))
        got = placed(detached(first, 0x400000, 0x500000), at, 0x400000 + guest_delta, cache_start)
        assert (got.code, got.trap, got.resume, got.displaced) == (want.code, want.trap, want.resume, want.displaced)
        assert want.code != first.code       # something in it really was re-aimed


@pytest.mark.parametrize("library", ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"])
def test_every_stub_of_a_library_moved_is_the_stub_composed_there(library):
    """Placing a template, over the windows planned on real code's page scans: the
    displaced instruction forms and branch operands these libraries have (the side
    cache within reach of the code, as a live one is)."""
    from conftest import text_of
    from sbe.patcher.emit import EmitError
    from sbe.scanner.scan import scan_page
    from sbe.scanner.window import plan_windows
    code, base, entries = text_of(library)
    checked = 0
    for page in range(base - base % 4096, base + len(code) - 4096, 4096):
        chunk = code[max(page - base, 0):page - base + 4096 + 15]
        if page < base:
            chunk = bytes(base - page) + chunk
        scan = scan_page(chunk, page, {e for e in entries if page <= e < page + 4096} | {page})
        for plan in plan_windows(chunk, page, page + 4096, scan.starts, scan.sites, scan.targets):
            if not isinstance(plan, Window):
                continue
            raw = chunk[plan.start - page:plan.end - page]
            try:
                first = compose(plan.kind, plan.site, plan, raw, 0x40400000, _Cache(0x40000000))
            except EmitError:
                continue
            delta, cache_start = 0x10000000, 0x40000000 + 0x3000000
            def shift(insn):
                return insn._replace(address=insn.address + delta)
            there = Window(shift(plan.site), plan.kind, plan.start + delta, plan.end + delta,
                           tuple(map(shift, plan.before)), tuple(map(shift, plan.after)), plan.guard)
            want = compose(plan.kind, shift(plan.site), there, raw, cache_start + 0x880, _Cache(cache_start))
            got = placed(detached(first, 0, 0x40000000), cache_start + 0x880, delta, cache_start)
            assert (got.code, got.trap, got.resume, got.displaced) == (
                want.code, want.trap, want.resume, want.displaced), plan
            checked += 1
    assert checked > 20
