"""Stub templates: every template decodes cleanly and keeps the invariants the
monitor relies on (where its trap is, where it resumes, that rsp comes back)."""
from __future__ import annotations

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from sbe.patcher import stubs
from sbe.patcher.emit import compose
from sbe.scanner.decode import Insn
from sbe.scanner.window import Window

CS = Cs(CS_ARCH_X86, CS_MODE_64)
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
