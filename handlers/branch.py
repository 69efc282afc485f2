"""Indirect near `jmp` and `call`: where they go, and what a call pushes.

Decoding an operand with capstone's detail mode costs tens of microseconds, more
than the rest of a trap's handling, so each site is decoded once into a small
closure kept in `site.decoded`; a trap only evaluates that closure.

Forms whose meaning depends on the CPU or on descriptor tables are not computed
here but left to run natively (STEP), where they do exactly what they would have
done: far `ljmp`/`lcall` (a segment load), and near branches with a 0x66 prefix,
which Intel ignores and AMD honours as a 16-bit target.
"""
from __future__ import annotations

from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from capstone.x86 import X86_OP_REG

from sbe.handlers.effect import STEP, Effect
from sbe.scanner.x86 import MASK64, NEAR_CALL, NEAR_JMP

_MASK32 = (1 << 32) - 1

_DISASSEMBLER = Cs(CS_ARCH_X86, CS_MODE_64)
_DISASSEMBLER.detail = True

_OPERAND_SIZE_PREFIX = 0x66

# Capstone names address registers by the address size; the guest's registers are
# the 64-bit user_regs_struct fields, and a 32-bit address is the truncated sum.
_USER_REGS = frozenset(
    "rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 rip".split())
_SEGMENT_BASES = {"fs": "fs_base", "gs": "gs_base"}  # others have base 0 in 64-bit mode
_NO_INDEX = {"riz", "eiz"}  # a SIB byte that encodes "no index"

_CACHE_KEY = "branch"


def _user_reg(name: str) -> str | None:
    if name in _NO_INDEX:
        return None
    if name in _USER_REGS:
        return name
    wide = "r" + name[1:] if name.startswith("e") else name[:-1]  # eax -> rax, r8d -> r8
    if wide not in _USER_REGS:
        raise ValueError(f"unexpected address register {name!r}")
    return wide


def _register_target(name: str):
    def target(regs, read):
        return regs[name]
    return target


def _memory_target(segment, base, index, scale, disp, mask):
    def target(regs, read):
        address = disp
        if base:
            address += regs[base]
        if index:
            address += regs[index] * scale
        address &= mask
        if segment:
            address += regs[segment]
        return int.from_bytes(read(address & MASK64, 8), "little")
    return target


def _decode(site):
    """(is_call, target(regs, read)), or None when the site must run natively."""
    insn = next(_DISASSEMBLER.disasm(site.original, site.address, 1), None)
    if insn is None or insn.opcode[0] != 0xFF:
        return None
    form = insn.modrm >> 3 & 7
    if form not in (NEAR_CALL, NEAR_JMP) or _OPERAND_SIZE_PREFIX in insn.prefix:
        return None
    operand = insn.operands[0]
    if operand.type == X86_OP_REG:
        return form == NEAR_CALL, _register_target(_user_reg(insn.reg_name(operand.reg)))
    mem = operand.mem
    segment = _SEGMENT_BASES.get(insn.reg_name(mem.segment)) if mem.segment else None
    base = _user_reg(insn.reg_name(mem.base)) if mem.base else None
    index = _user_reg(insn.reg_name(mem.index)) if mem.index else None
    disp = mem.disp
    if base == "rip":  # relative to the next instruction, known now
        base, disp = None, disp + site.end
    mask = _MASK32 if insn.addr_size == 4 else MASK64
    return form == NEAR_CALL, _memory_target(segment, base, index, mem.scale, disp, mask)


def _plan(site):
    try:
        return site.decoded[_CACHE_KEY]
    except KeyError:
        plan = site.decoded[_CACHE_KEY] = _decode(site)
        return plan


def branch_target(site, regs, read) -> int:
    plan = _plan(site)
    if plan is None:
        raise ValueError(f"{site.insn} at {site.address:#x} is not an emulated branch")
    return plan[1](regs, read)


def emulate(site, regs, read) -> Effect:
    """`read` raises OSError for unreadable guest memory; the branch then runs
    natively, so the guest takes the very fault it would have taken."""
    plan = _plan(site)
    if plan is None:
        return Effect(action=STEP)
    is_call, target = plan
    try:
        destination = target(regs, read)
    except OSError:
        return Effect(action=STEP)
    if not is_call:
        return Effect(regs={"rip": destination}, branch_target=destination)
    rsp = (regs["rsp"] - 8) & MASK64
    return Effect(regs={"rsp": rsp, "rip": destination}, branch_target=destination,
                  writes=[(rsp, site.end.to_bytes(8, "little"))])
