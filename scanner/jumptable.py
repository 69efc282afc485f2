"""Jump tables the scanner can prove: indirect jumps whose every target is known.

An interpreter's dispatch (CPython's computed gotos) ends each handler in

    movzx eax, sil                        ; the next opcode: an index below 256
    mov   rax, qword ptr [rax*8 + TABLE]  ; (or the jump reads the table itself)
    jmp   rax

and runs those few bytes hundreds of millions of times. A checked branch stub costs
every run a table lookup for a target that can only ever be one of TABLE's 256
entries. So when the index is bounded by the instruction before the load and the
table lies in memory the guest cannot write, the targets are data the monitor can
read once: each becomes a root of the scan (a landing point a window must keep clear
of, and code scanned before it runs), and the jump runs unchecked in a stub that
holds the three instructions (the *table* tactic, scanner.window). The bound must be
inside the window with the load and the jump: a thread arriving between them, with an
index of its own, would read past the table, and a window's interior is int3s.

Pure: the caller reads the table and judges the memory it lies in; this module only
recognises the shape in decoded instructions. Proved shapes: a zero-extending byte
`movzx` into the index register (from a register or memory), then either a load of the
target register from `[index*8 + disp32]` and `jmp` through it, or `jmp qword ptr
[index*8 + disp32]`. A base register, 4-byte relative entries (gcc's PIE switch tables)
and bounds by `cmp`/`ja` are not proved: their sites keep the checked stub.
"""
from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import Callable

from .decode import Insn, ending_at

ENTRY = 8   # bytes of one absolute target
_GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
          "r14", "r15")
_GPR32 = {"eax": "rax", "ebx": "rbx", "ecx": "rcx", "edx": "rdx", "esi": "rsi", "edi": "rdi",
          "ebp": "rbp", **{f"r{n}d": f"r{n}" for n in range(8, 16)}}
_BYTE_SOURCE = re.compile(r"(?:[a-d]l|[sd]il|bpl|r\d+b|byte ptr \[[^]]*\])$")
_TABLE = r"qword ptr \[(\w+)\*8 ([+-]) (0x[0-9a-f]+|\d+)\]"
_LOAD = re.compile(rf"(\w+), {_TABLE}$")
_JUMP = re.compile(rf"{_TABLE}$")


class TableJump(namedtuple("TableJump", "bound load site table count")):
    """A proved shape: `bound` (the movzx), `load` (the mov, or None when the jump
    reads the table), `site` (the jmp); the table's address and entries."""
    __slots__ = ()

    @property
    def insns(self) -> tuple[Insn, ...]:
        return tuple(i for i in (self.bound, self.load, self.site) if i is not None)

    @property
    def end(self) -> int:
        return self.table + ENTRY * self.count


def _index_bound(insn: Insn) -> tuple[str, int] | None:
    """(64-bit index register, number of values) when `insn` zero-extends a byte into
    a 32-bit register (which clears the register's upper half too)."""
    if insn.mnemonic != "movzx":
        return None
    dest, _, source = insn.op_str.partition(", ")
    if dest not in _GPR32 or not _BYTE_SOURCE.match(source):
        return None
    return _GPR32[dest], 256


def _table_address(sign: str, disp: str) -> int:
    value = int(disp, 0)
    return (-value if sign == "-" else value) & ((1 << 64) - 1)   # disp32, sign-extended


def table_jump(before: list[Insn], site: Insn) -> TableJump | None:
    """The proved shape ending at the indirect `jmp` `site`, or None. `before`: the
    instructions that run just before it, in order, each ending where the next begins
    (the caller's scan decoded them; at least the last two, when there are two)."""
    if site.mnemonic != "jmp":
        return None
    jump = _JUMP.match(site.op_str)
    if jump is not None:
        load, bound = None, before[-1] if before else None
        index, sign, disp = jump.groups()
    elif site.op_str in _GPR64 and len(before) >= 2:
        load, bound = before[-1], before[-2]
        match = _LOAD.match(load.op_str) if load.mnemonic == "mov" else None
        if match is None or match[1] != site.op_str:
            return None
        index, sign, disp = match.groups()[1:]
    else:
        return None
    if bound is None or bound.end != (load or site).address or (load is not None and load.end != site.address):
        return None
    bounded = _index_bound(bound)
    if bounded is None or bounded[0] != index:
        return None
    return TableJump(bound, load, site, _table_address(sign, disp), bounded[1])


def shape_at(site: Insn, is_start: Callable[[int], bool], decode_at: Callable[[int], Insn | None],
             floor: int) -> TableJump | None:
    """table_jump for `site`, the instructions before it found among the decoded
    starts (decode.ending_at)."""
    if site.mnemonic != "jmp":
        return None
    before: list[Insn] = []
    address = site.address
    for _ in range(2):
        insn = ending_at(address, is_start, decode_at, floor)
        if insn is None:
            break
        before.insert(0, insn)
        address = insn.address
    return table_jump(before, site)
