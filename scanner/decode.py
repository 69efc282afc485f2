"""Linear x86-64 decoding of guest bytes, as plain text instructions.

`disasm_lite` with detail off is the fastest way through capstone: it skips building
operand and group detail, which the scanner does not need, and a single call decodes
a whole buffer in C, so the per-instruction cost is one tuple, not one foreign call.
capstone is loaded at the first decode, not at import: its Python binding costs 50
ms to import, and a warm run whose plans all come from the scan cache decodes
nothing.
"""
from __future__ import annotations

import functools
from collections import namedtuple
from collections.abc import Callable, Iterator

from .x86 import MAX_INSN


class Insn(namedtuple("Insn", "address size mnemonic op_str")):
    """A tuple, not a dataclass: a page scan makes thousands, and a tuple is made
    from capstone's own tuple at a fraction of the cost."""
    __slots__ = ()

    @property
    def end(self) -> int:
        return self.address + self.size


def decode_from(code: bytes, base: int, start: int) -> Iterator[Insn]:
    """Instructions from `start` on, `code[0]` being at `base`.

    Stops where the bytes run out or at the first byte sequence that is no
    instruction: past that point the alignment is unknown, so nothing later can be
    trusted to be a real instruction start.
    """
    offset = start - base
    if not 0 <= offset < len(code):
        return
    yield from map(Insn._make, _disassembler().disasm_lite(code[offset:], start))


def decode_one(code: bytes, base: int, address: int) -> Insn | None:
    """The one instruction at `address` (`code[0]` being at `base`), or None."""
    offset = address - base
    if not 0 <= offset < len(code):
        return None
    return next(decode_from(code[offset:offset + MAX_INSN], address, address), None)


def ending_at(address: int, is_start: Callable[[int], bool], decode_at: Callable[[int], "Insn | None"],
              floor: int) -> Insn | None:
    """The decoded instruction that ends at `address` (the nearest if several do),
    among those starting at or after `floor`: how a walk backwards from a site finds
    the instructions that run before it, decoding only at known starts."""
    for start in range(address - 1, max(floor, address - MAX_INSN) - 1, -1):
        if is_start(start):
            insn = decode_at(start)
            if insn is not None and insn.end == address:
                return insn
    return None


@functools.cache
def _disassembler():
    from capstone import CS_ARCH_X86, CS_MODE_64, Cs
    return Cs(CS_ARCH_X86, CS_MODE_64)
