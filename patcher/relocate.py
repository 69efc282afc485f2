"""Displaced instructions, re-encoded for the stub that runs them.

A site shorter than the 5-byte jump takes neighbours from its basic block into its
window, and those displaced instructions run in the stub, at another address. An
instruction behaves the same there unless it depends on its own address, which in
64-bit user code happens in three ways:

- a rip-relative memory operand: fixed here. The disp32 is recomputed so the operand
  names the same address; the length does not change, so a stub's layout is known
  before its instructions are relocated. A target beyond rel32 reach of the stub is
  refused (`NotRelocatable`); the caller then picks another tactic, so the side cache
  must sit within reach of the data a module's displaced code uses.
- a conditional jump (`jcc` rel8 or rel32, no prefix): re-encoded as `jcc rel32` to
  the same target, so a taken branch leaves the stub for the guest code it names and
  a branch not taken goes on in the stub. Its length may grow (2 bytes to 6); stubs
  are laid out as their instructions are relocated, so nothing depends on it.
- any other relative branch (`jmp`/`call` rel, `loop*`, `j*cxz`, `xbegin`, a jcc with a
  prefix): refused. Retargeting a `jmp` or a `call` is the stub generator's business
  (it leaves the stub for good, or pushes an address), not an instruction rewrite.
- an instruction that hands its address on: every `call` pushes it, `syscall` leaves
  it in `rcx`, `int`/`int3`/`into`/`int1`/`sysenter` give it to the kernel and to
  signal handlers. Refused: the stub emulates them with the original address.

Everything else is copied unchanged. `load_operand` serves the stub of an indirect
`jmp`/`call` site: it loads the branch target into a scratch register, as the site
would have computed it, from a stub whose `rsp` is lower.

Current status, known gaps:

- x87 instructions record their own address as the FPU instruction pointer that
  `fnstenv`/`fxsave`/`xsave` store; relocated, that pointer is the stub's.
- A fault in a relocated instruction reports the stub's address; mapping it back to
  the guest's is the stub's job, not the re-encoding's.
- capstone's length and operand decoding are trusted; an instruction it cannot decode
  is refused.
"""
from __future__ import annotations

import ctypes
import struct
from typing import NamedTuple

import capstone
from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from capstone import x86_const as x86

from sbe.scanner.sensitive import DIRECT_BRANCHES
from sbe.scanner.x86 import MASK64, MAX_INSN, NEAR_CALL, NEAR_JMP, conditional_jump

_MASK32 = (1 << 32) - 1


class NotRelocatable(ValueError):
    """The instruction cannot run at the new address with the same effect."""


class ScratchInUse(ValueError):
    """The branch operand reads the scratch register; the caller picks another."""


# --- relocate ------------------------------------------------------------------------

_DISASSEMBLER = Cs(CS_ARCH_X86, CS_MODE_64)
_DISASSEMBLER.detail = True

# capstone's private API, on purpose. Through the public Cs.disasm with detail,
# relocate() costs about 16 us an instruction against 3.5 us here (5,000 of libc's
# instructions): CsInsn copies the detail, then rebuilds every operand as Python
# objects on the first attribute read, where this reads the detail in place; and
# disasm_lite has no detail at all. The binding's own ctypes prototypes and
# structures are used. These names are capstone 5's: pyproject pins capstone to
# [5, 6), and tests fail if the version or the names drift, and hold these reads to
# the binding's public attributes over random instructions.
_cs_disasm = capstone._cs.cs_disasm
_cs_free = capstone._cs.cs_free
_INSN_POINTER = ctypes.POINTER(capstone._cs_insn)

# Relative branches: the scanner's one table of direct branches, less the jmp and call
# this module tells apart by their operand.
_RELATIVE_BRANCHES = frozenset(i for i in range(x86.X86_INS_ENDING)
                               if _DISASSEMBLER.insn_name(i) in DIRECT_BRANCHES - {"jmp", "call"})
_HANDS_ITS_ADDRESS_ON = {
    x86.X86_INS_CALL: "a call pushes its own address",
    x86.X86_INS_LCALL: "a call pushes its own address",
    x86.X86_INS_SYSCALL: "syscall leaves its own address in rcx",
    x86.X86_INS_SYSENTER: "sysenter gives its own address to the kernel",
    x86.X86_INS_INT: "a software interrupt gives its own address to the kernel",
    x86.X86_INS_INT1: "a software interrupt gives its own address to the kernel",
    x86.X86_INS_INT3: "a software interrupt gives its own address to the kernel",
    x86.X86_INS_INTO: "a software interrupt gives its own address to the kernel",
}
_RIP_BASES = {x86.X86_REG_RIP: MASK64, x86.X86_REG_EIP: _MASK32}


def _decode(code, address: int):
    """(size, refusal or None, disp offset or 0, address mask) of the one instruction.

    The disp offset is non-zero exactly when the instruction has a rip-relative
    operand; the mask is 2**32 - 1 for the `eip` form (0x67 prefix), whose address is
    computed in 32 bits.
    """
    if not code or len(code) > MAX_INSN:
        raise ValueError(f"not one instruction: {code.hex()!r}")
    insn = _INSN_POINTER()
    count = _cs_disasm(_DISASSEMBLER.csh, code, len(code), address, 1, ctypes.byref(insn))
    if not count:
        raise NotRelocatable(f"capstone cannot decode {code.hex()}")
    try:
        raw = insn[0]
        size, ident = raw.size, raw.id
        detail = raw.detail.contents.arch.x86
        if ident in _RELATIVE_BRANCHES:
            refusal = "a relative branch"
        elif ident == x86.X86_INS_JMP and detail.operands[0].type == x86.X86_OP_IMM:
            refusal = "a relative branch"
        else:
            refusal = _HANDS_ITS_ADDRESS_ON.get(ident)
        disp_offset, mask = 0, MASK64
        # Only ModRM mod=00 rm=101 is rip-relative; testing that first spares the
        # operand walk (a third of the decode) for everything else. The disp32 then
        # follows the ModRM byte: capstone's disp_size says 2 under a 0x66 prefix.
        if detail.modrm & 0xC7 == 0x05:
            for operand in detail.operands[:detail.op_count]:
                if operand.type != x86.X86_OP_MEM:
                    continue
                memory = operand.mem
                if memory.base in _RIP_BASES:
                    mask = _RIP_BASES[memory.base]
                    disp_offset = detail.encoding.modrm_offset + 1
                    if _disp32(code, disp_offset) != memory.disp:
                        refusal = refusal or "capstone's rip-relative operand is not at its ModRM"
    finally:
        _cs_free(insn, count)
    if size != len(code):
        raise ValueError(f"{code.hex()} is not one instruction ({size} bytes decode)")
    return size, refusal, disp_offset, mask


def _disp32(code, offset: int) -> int:
    return int.from_bytes(code[offset:offset + 4], "little", signed=True)


def _signed(value: int, bits: int) -> int | None:
    """`value` as a signed `bits`-bit field, or None when it does not fit."""
    if -(1 << bits - 1) <= value < 1 << bits - 1:
        return value
    return None


def _rip_disp(target: int, end: int, mask: int) -> int | None:
    """The disp32 that makes an instruction ending at `end` name `target`.

    The 32-bit (`eip`) form wraps, so some disp32 always reaches; the 64-bit form
    reaches +-2 GiB from `end`.
    """
    if mask == _MASK32:
        return ((target - end + (1 << 31)) & _MASK32) - (1 << 31)
    delta = ((target - end + (1 << 63)) & MASK64) - (1 << 63)
    return _signed(delta, 32)


def relocate(code: bytes, old: int, new: int, fields: list | None = None) -> bytes:
    """The instruction `code`, which lived at `old`, encoded to do the same at `new`.

    Raises NotRelocatable for what depends on its own address in a way that is not a
    rip-relative operand (see the module docstring), and for a rip-relative operand
    out of reach from `new`. `fields` gets (offset in the instruction, target, mask,
    bytes after the field) for the rel32 it re-aimed, if any: the displacement counts
    from the instruction's end, past any immediate that follows it.
    """
    code = bytes(code)
    jump = conditional_jump(code, old)
    if jump is not None:
        condition, target = jump
        disp = _signed(target - (new + 6), 32)
        if disp is None:
            raise NotRelocatable(f"{code.hex()}: {target:#x} is out of rel32 reach of {new:#x}")
        if fields is not None:
            fields.append((2, target, MASK64, 0))
        return bytes((0x0F, 0x80 | condition)) + struct.pack("<i", disp)
    size, refusal, offset, mask = _decode(code, old)
    if refusal:
        raise NotRelocatable(f"{code.hex()}: {refusal}")
    if not offset:
        return code
    target = (old + size + _disp32(code, offset)) & mask
    disp = _rip_disp(target, new + size, mask)
    if disp is None:
        raise NotRelocatable(f"{code.hex()}: {target:#x} is out of rel32 reach of {new:#x}")
    if fields is not None:
        fields.append((offset, target, mask, size - offset - 4))
    return b"".join((code[:offset], struct.pack("<i", disp), code[offset + 4:]))


def rip_relative(code: bytes, address: int) -> int | None:
    """The address the rip-relative operand of `code` at `address` names, or None.

    It is the offset within the segment: an `fs:`/`gs:` override adds its base to it
    when the instruction runs, whichever address the instruction runs at. None says
    only that there is no such operand; `relocate` may still refuse the instruction.
    """
    code = bytes(code)
    size, _, offset, mask = _decode(code, address)
    if not offset:
        return None
    return (address + size + _disp32(code, offset)) & mask


# --- load_operand ----------------------------------------------------------------------

_REGISTERS = {name: number for number, name in enumerate(
    "rax rcx rdx rbx rsp rbp rsi rdi r8 r9 r10 r11 r12 r13 r14 r15".split())}
_RSP = 4
_RIP = -1  # a base that is no register number

_LOAD, _LEA = 0x8B, 0x8D
_REX_W = 0x48

# Segment overrides other than fs/gs change no address in 64-bit mode; 0x3e doubles as
# `notrack` and 0x2e as a branch hint, and 0xf2 is `bnd`: none matters to a load.
_IGNORED_SEGMENTS = frozenset({0x26, 0x2E, 0x36, 0x3E})
_BASED_SEGMENTS = frozenset({0x64, 0x65})
_ADDRESS_SIZE = 0x67
_BND = 0xF2
# 0x66 gives a 16-bit target on AMD and is ignored on Intel; 0xf3 and 0xf0 have no
# defined meaning on these branches. What the CPU decides is not guessed at here.
_UNDEFINED_PREFIXES = frozenset({0x66, 0xF3, 0xF0})
_PREFIXES = _IGNORED_SEGMENTS | _BASED_SEGMENTS | _UNDEFINED_PREFIXES | {_ADDRESS_SIZE, _BND}


def _prefixes(code):
    """(index of the opcode, segment prefix to keep or None, 0x67 seen, REX byte)."""
    segments, addr32, rex, at = set(), False, 0, 0
    while at < len(code):
        byte = code[at]
        is_rex = 0x40 <= byte <= 0x4F
        if rex and (is_rex or byte in _PREFIXES):
            raise NotRelocatable(f"{code.hex()}: a REX prefix not next to the opcode")
        if is_rex:
            rex = byte
        elif byte in _IGNORED_SEGMENTS or byte in _BASED_SEGMENTS:
            segments.add(byte)
        elif byte == _ADDRESS_SIZE:
            addr32 = True
        elif byte in _UNDEFINED_PREFIXES:
            raise NotRelocatable(f"{code.hex()}: prefix {byte:#04x} on an indirect branch")
        elif byte != _BND:
            break
        at += 1
    based = segments & _BASED_SEGMENTS
    if based and len(segments) > 1:
        raise NotRelocatable(f"{code.hex()}: conflicting segment prefixes")
    return at, (based.pop() if based else None), addr32, rex


def _modrm(mod: int, reg: int, rm: int) -> int:
    return mod << 6 | (reg & 7) << 3 | rm & 7


def _rex(reg: int, index: int = 0, base: int = 0) -> int:
    return _REX_W | (reg >> 3) << 2 | (index >> 3) << 1 | base >> 3


def _displacement(disp: int) -> tuple[int, bytes]:
    """The shortest (ModRM.mod, bytes) for a displacement from a base that needs no
    special case at mod 00, as rsp in a SIB byte does not."""
    if disp == 0:
        return 0, b""
    if _signed(disp, 8) is not None:
        return 1, struct.pack("<b", disp)
    return 2, struct.pack("<i", disp)


def load_operand(code: bytes, old: int, new: int, scratch: str, rsp_bias: int,
                 fields: list | None = None) -> bytes:
    """`mov scratch, <operand>`: the target of the indirect `jmp`/`call` `code`.

    The load runs at `new`, in a stub whose rsp is `rsp_bias` bytes below what the
    branch saw at `old`: rip-relative operands are re-aimed as in `relocate`, and rsp
    as a base gets `rsp_bias` added to its displacement (`call rsp` itself becomes
    `lea scratch, [rsp + rsp_bias]`). Raises ScratchInUse when the operand reads
    `scratch`, NotRelocatable when no load can match the branch, and ValueError when
    `code` is not an indirect near `jmp`/`call`. `fields` as for `relocate`.
    """
    code = bytes(code)
    dest = _REGISTERS.get(scratch)
    if dest is None or dest == _RSP:
        raise ValueError(f"{scratch!r} is not a 64-bit scratch register")
    if len(code) > MAX_INSN:
        raise ValueError(f"{code.hex()} is longer than an instruction")
    at, segment, addr32, rex = _prefixes(code)
    if at + 1 >= len(code) or code[at] != 0xFF or code[at + 1] >> 3 & 7 not in (NEAR_CALL, NEAR_JMP):
        raise ValueError(f"{code.hex()} is not an indirect near jmp or call")
    extend_index, extend_base = (rex >> 1 & 1) << 3, (rex & 1) << 3
    if code[at + 1] >> 6 == 3:
        return _load_register(code, at, dest, extend_base, rsp_bias, scratch)

    memory = _memory_operand(code, at, extend_index, extend_base)
    if dest in (memory.base, memory.index):
        raise ScratchInUse(f"{code.hex()} addresses memory through {scratch}")
    head = bytes(filter(None, (segment, _ADDRESS_SIZE if addr32 else None)))
    head += bytes((_rex(dest, extend_index, extend_base), _LOAD))
    if memory.base == _RIP:
        return _rip_load(code, old, new, head, dest, memory.disp, addr32, fields)
    if memory.base == _RSP and rsp_bias:
        return _rsp_load(code, head, dest, memory, addr32, rsp_bias)
    return head + bytes((_modrm(memory.mod, dest, memory.rm),)) + code[at + 2:]  # SIB, disp as they are


def _load_register(code: bytes, at: int, dest: int, extend_base: int, rsp_bias: int,
                   scratch: str) -> bytes:
    """The load for a branch through a register (ModRM.mod 3 at `at + 1`)."""
    if len(code) != at + 2:
        raise ValueError(f"{code.hex()} is not one instruction")
    source = code[at + 1] & 7 | extend_base
    if source == dest:
        raise ScratchInUse(f"{code.hex()} branches through {scratch}")
    if source == _RSP and rsp_bias:
        disp = _signed(rsp_bias, 32)
        if disp is None:
            raise NotRelocatable(f"rsp bias {rsp_bias:#x} does not fit a disp32")
        mod, disp_bytes = _displacement(disp)
        return bytes((_rex(dest), _LEA, _modrm(mod, dest, 4), 0x24)) + disp_bytes
    return bytes((_rex(dest, base=source), _LOAD, _modrm(3, dest, source)))


class _Memory(NamedTuple):
    """A memory operand as its ModRM, SIB and displacement give it. base and index are
    register numbers, or None where there is none; base is _RIP for [rip + disp32]."""
    mod: int
    rm: int
    sib: int | None
    base: int | None
    index: int | None
    disp: int


def _memory_operand(code: bytes, at: int, extend_index: int, extend_base: int) -> _Memory:
    """The memory operand of the ModRM at `at + 1`, which must end the instruction."""
    modrm = code[at + 1]
    mod, rm = modrm >> 6, modrm & 7
    tail = at + 2  # SIB and displacement
    sib = None
    if rm == 4:
        if tail >= len(code):
            raise ValueError(f"{code.hex()} is not one instruction")
        sib = code[tail]
        tail += 1
        index = sib >> 3 & 7 | extend_index
        index = None if index == _RSP else index
        base = None if mod == 0 and sib & 7 == 5 else sib & 7 | extend_base
    else:
        index = None
        base = _RIP if mod == 0 and rm == 5 else rm | extend_base
    disp_size = {0: 4 if base in (None, _RIP) else 0, 1: 1, 2: 4}[mod]
    if len(code) != tail + disp_size:
        raise ValueError(f"{code.hex()} is not one instruction")
    return _Memory(mod, rm, sib, base, index, int.from_bytes(code[tail:], "little", signed=True))


def _rip_load(code: bytes, old: int, new: int, head: bytes, dest: int, disp: int,
              addr32: bool, fields: list | None) -> bytes:
    """The load at `new`, `head` then its ModRM, from [rip + disp] re-aimed."""
    mask = _MASK32 if addr32 else MASK64
    target = (old + len(code) + disp) & mask
    new_disp = _rip_disp(target, new + len(head) + 5, mask)
    if new_disp is None:
        raise NotRelocatable(f"{code.hex()}: {target:#x} is out of rel32 reach of {new:#x}")
    if fields is not None:
        fields.append((len(head) + 1, target, mask, 0))
    return head + bytes((_modrm(0, dest, 5),)) + struct.pack("<i", new_disp)


def _rsp_load(code: bytes, head: bytes, dest: int, memory: _Memory, addr32: bool,
              rsp_bias: int) -> bytes:
    """The load, `head` then its ModRM, from an operand based on rsp, in a stub whose
    rsp is `rsp_bias` lower."""
    new_disp = memory.disp + rsp_bias
    if addr32:  # esp + disp wraps at 32 bits, so the stub's esp does too
        new_disp = ((new_disp + (1 << 31)) & _MASK32) - (1 << 31)
    elif _signed(new_disp, 32) is None:
        raise NotRelocatable(f"{code.hex()}: rsp bias {rsp_bias:#x} overflows the disp32")
    mod, disp_bytes = _displacement(new_disp)
    return head + bytes((_modrm(mod, dest, 4), memory.sib)) + disp_bytes
