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
from sbe.patcher.emit import compose
from sbe.scanner.decode import Insn
from sbe.scanner.window import Window

CS = Cs(CS_ARCH_X86, CS_MODE_64)
CS_DETAIL = Cs(CS_ARCH_X86, CS_MODE_64)
CS_DETAIL.detail = True
GENERATOR = Path(__file__).resolve().parents[1] / "tools" / "gen_templates.py"
BODIES = {
    "syscall": stubs.syscall_body(), "cpuid": stubs.cpuid_body(),
    **{f"branch-{'call' if c else 'jmp'}-{r}-{part}": body
       for c in (True, False) for r in ("r10", "r11")
       for part, body in zip(("head", "tail"), stubs.branch_parts(c, r))},
}


@pytest.mark.parametrize("name", list(BODIES))
def test_templates_decode_whole(name):
    body = BODIES[name]
    insns = list(CS.disasm(body.code, 0))
    assert sum(i.size for i in insns) == len(body.code)
    for field, offset in body.fields.items():
        assert any(i.address < offset < i.address + i.size for i in insns), field


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
    compared = [insn.operands[1].imm for insn in CS_DETAIL.disasm(stubs.syscall_body().code, 0)
                if insn.id == x86.X86_INS_CMP and insn.reg_name(insn.operands[0].reg) == "rax"]
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
