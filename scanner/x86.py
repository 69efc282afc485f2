"""Facts of the x86-64 encoding that several parts rely on, stated once."""
from __future__ import annotations

from collections import namedtuple

MAX_INSN = 15                 # bytes in the longest x86 instruction
MASK64 = (1 << 64) - 1
NEAR_CALL, NEAR_JMP = 2, 4    # ModRM.reg of opcode 0xFF; 3 and 5 are the far forms


def conditional_jump(code: bytes, address: int) -> tuple[int, int] | None:
    """(condition code, target) when `code` is exactly one prefix-free `jcc rel8`
    (70+cc) or `jcc rel32` (0f 80+cc) at `address`, else None: the jumps a window
    may displace (scanner.window) because the stub can re-encode them
    (patcher.relocate)."""
    if len(code) == 2 and 0x70 <= code[0] <= 0x7F:
        return code[0] & 0xF, (address + 2 + int.from_bytes(code[1:], "little", signed=True)) & MASK64
    if len(code) == 6 and code[0] == 0x0F and 0x80 <= code[1] <= 0x8F:
        return code[1] & 0xF, (address + 6 + int.from_bytes(code[2:], "little", signed=True)) & MASK64
    return None


# The 16 general registers by encoding, as user_regs_struct names them.
REGISTERS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
# Segment overrides that matter in 64-bit mode, and the ones that do nothing there
# (0x3e on an indirect branch is also CET's `notrack`).
_SEGMENT_BASES = {0x64: "fs_base", 0x65: "gs_base"}
_NULL_SEGMENTS = frozenset((0x26, 0x2E, 0x36, 0x3E))
_ADDRESS_SIZE, _BND = 0x67, 0xF2


# [segment: base + index * scale + disp], the sum taken in `mask`'s width: a near
# indirect branch's memory operand (a rip base is already folded into disp).
Memory = namedtuple("Memory", "segment base index scale disp mask")


def near_indirect(code: bytes, address: int):
    """(is_call, operand) when `code` is exactly one near indirect `call`/`jmp`
    (FF /2, FF /4) at `address`; operand a register name or a Memory. None for
    anything else, and for prefixes whose meaning depends on the CPU (0x66: Intel
    ignores it, AMD takes a 16-bit target) or that are not plain (lock, rep,
    repeated or misplaced ones): those run natively, where they do exactly what
    they would. Decoding the bytes here, not through capstone's detail mode, keeps
    a trap's first decode of a branch site at microseconds, with no capstone loaded."""
    i, segment, mask, seen = 0, None, MASK64, set()
    while i < len(code) and (code[i] in _SEGMENT_BASES or code[i] in _NULL_SEGMENTS
                             or code[i] in (_ADDRESS_SIZE, _BND)):
        group = "segment" if code[i] in _SEGMENT_BASES or code[i] in _NULL_SEGMENTS else code[i]
        if group in seen:
            return None
        seen.add(group)
        if code[i] in _SEGMENT_BASES:
            segment = _SEGMENT_BASES[code[i]]
        elif code[i] == _ADDRESS_SIZE:
            mask = (1 << 32) - 1
        i += 1
    rex = code[i] if i < len(code) and 0x40 <= code[i] <= 0x4F else 0
    i += bool(rex)
    if i + 2 > len(code) or code[i] != 0xFF:
        return None
    modrm = code[i + 1]
    i += 2
    mod, form, rm = modrm >> 6, modrm >> 3 & 7, modrm & 7
    if form not in (NEAR_CALL, NEAR_JMP):
        return None
    is_call = form == NEAR_CALL
    if mod == 3:
        return (is_call, REGISTERS[rm | (rex & 1) << 3]) if i == len(code) else None
    base = index = None
    scale = 1
    if rm == 4:
        if i >= len(code):
            return None
        sib = code[i]
        i += 1
        scale, number, low = 1 << (sib >> 6), (sib >> 3 & 7) | (rex & 2) << 2, sib & 7
        index = None if number == 4 else REGISTERS[number]
        base = None if low == 5 and mod == 0 else REGISTERS[low | (rex & 1) << 3]
        width = 4 if low == 5 and mod == 0 else (0, 1, 4)[mod]
    elif rm == 5 and mod == 0:
        base, width = "rip", 4
    else:
        base, width = REGISTERS[rm | (rex & 1) << 3], (0, 1, 4)[mod]
    if i + width != len(code):
        return None
    disp = int.from_bytes(code[i:], "little", signed=True) if width else 0
    if base == "rip":   # relative to the next instruction, known now
        base, disp = None, address + len(code) + disp
    return is_call, Memory(segment, base, index, scale, disp, mask)
