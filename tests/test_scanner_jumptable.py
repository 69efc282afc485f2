"""Table jumps the scanner can prove (scanner.jumptable), and the table tactic the
planner gives them: on decoded bytes alone."""
from __future__ import annotations

from functools import partial

import pytest
from keystone import KS_ARCH_X86, KS_MODE_64, Ks

from sbe.scanner.decode import decode_from, decode_one
from sbe.scanner.jumptable import shape_at, table_jump
from sbe.scanner.sensitive import classify
from sbe.scanner.window import Window, plan_windows

KS = Ks(KS_ARCH_X86, KS_MODE_64)
BASE = 0x400000
TABLE = 0x73AF00


def decoded(text: str):
    code = bytes(KS.asm(text, BASE)[0])
    return code, list(decode_from(code, BASE, BASE))


def shape(text: str):
    code, insns = decoded(text)
    return table_jump(insns[:-1], insns[-1])


def test_cpython_dispatch_is_proved():
    found = shape(f"movzx eax, sil; mov rax, qword ptr [rax*8 + {TABLE}]; jmp rax")
    assert (found.table, found.count, found.end) == (TABLE, 256, TABLE + 8 * 256)
    assert [i.mnemonic for i in found.insns] == ["movzx", "mov", "jmp"]


def test_a_jump_that_reads_the_table_itself_is_proved():
    found = shape(f"movzx ecx, byte ptr [rdi - 1]; jmp qword ptr [rcx*8 + {TABLE}]")
    assert found.load is None and (found.table, found.count) == (TABLE, 256)


def test_a_negative_displacement_is_sign_extended():
    found = shape("movzx eax, al; jmp qword ptr [rax*8 - 0x1000]")
    assert found.table == (1 << 64) - 0x1000


@pytest.mark.parametrize("text", [
    f"movzx eax, si; mov rax, qword ptr [rax*8 + {TABLE}]; jmp rax",         # 65536 entries: not proved
    f"movzx eax, sil; mov rax, qword ptr [rdx*8 + {TABLE}]; jmp rax",        # another index
    f"movzx eax, sil; mov rdx, qword ptr [rax*8 + {TABLE}]; jmp rax",        # loads another register
    f"movzx eax, sil; mov rax, qword ptr [rbx + rax*8 + 8]; jmp rax",        # a base register
    f"movzx eax, sil; mov rax, qword ptr [rax*4 + {TABLE}]; jmp rax",        # not 8-byte entries
    f"mov eax, esi; mov rax, qword ptr [rax*8 + {TABLE}]; jmp rax",          # no bound
    f"movzx eax, sil; nop; mov rax, qword ptr [rax*8 + {TABLE}]; jmp rax",   # bound not next to the load
    f"movzx eax, sil; mov rax, qword ptr [rax*8 + {TABLE}]; call rax",       # a call returns: not a table jump
    f"movzx eax, sil; jmp qword ptr [rip + {TABLE}]",
])
def test_other_shapes_are_not_proved(text):
    assert shape(text) is None


def test_shape_at_walks_back_over_known_starts():
    code, insns = decoded(f"nop; movzx eax, sil; mov rax, qword ptr [rax*8 + {TABLE}]; jmp rax")
    starts = {i.address for i in insns}
    at = partial(decode_one, code, BASE)
    assert shape_at(insns[-1], starts.__contains__, at, BASE).bound == insns[1]
    # the load's start unknown: nothing to prove from
    assert shape_at(insns[-1], (starts - {insns[2].address}).__contains__, at, BASE) is None


def _plan(text: str, targets=()):
    code, insns = decoded(text)
    site = insns[-1]
    starts = {i.address for i in insns}
    tables = {site.address: table_jump(insns[:-1], site)}
    (plan,) = plan_windows(code, BASE, BASE + len(code), starts, [(site, classify(site.mnemonic, site.op_str))],
                           set(targets), tables=tables)
    return insns, plan


def test_a_proved_jump_gets_a_table_window_over_bound_load_and_jump():
    insns, plan = _plan(f"movzx eax, sil; mov rax, qword ptr [rax*8 + {TABLE}]; jmp rax")
    assert isinstance(plan, Window) and plan.tactic == "table"
    assert (plan.start, plan.end, plan.before) == (BASE, insns[-1].end, tuple(insns[:-1]))
    assert plan.table == (TABLE, TABLE + 8 * 256)


def test_a_landing_between_bound_and_jump_keeps_the_table_tactic_off():
    """A thread arriving at the load would bring an index of its own."""
    insns, plan = _plan(f"movzx eax, sil; mov rax, qword ptr [rax*8 + {TABLE}]; jmp rax",
                        targets={BASE + 4})
    assert not (isinstance(plan, Window) and plan.table)


def test_without_a_proof_the_jump_is_checked():
    code, insns = decoded(f"movzx eax, sil; mov rax, qword ptr [rax*8 + {TABLE}]; jmp rax")
    site = insns[-1]
    (plan,) = plan_windows(code, BASE, BASE + len(code), {i.address for i in insns}, [(site, "branch")], set())
    assert isinstance(plan, Window) and plan.tactic == "guard" and not plan.table
