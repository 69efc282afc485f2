"""Indirect near `jmp` and `call`: where they go, and what a call pushes.

Each site is decoded once (scanner.x86.near_indirect, from its bytes) into a small
closure kept in `site.decoded`; a trap only evaluates that closure.

Forms whose meaning depends on the CPU or on descriptor tables are not computed
here but left to run natively (STEP), where they do exactly what they would have
done: far `ljmp`/`lcall` (a segment load), near branches with a 0x66 prefix,
which Intel ignores and AMD honours as a 16-bit target, and unusual prefixes.
"""
from __future__ import annotations

from sbe.handlers.effect import STEP, Effect
from sbe.scanner.x86 import MASK64, Memory, near_indirect

_CACHE_KEY = "branch"


def _register_target(name: str):
    def target(regs, read):
        return regs[name]
    return target


def _memory_target(operand: Memory):
    segment, base, index, scale, disp, mask = operand
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
    decoded = near_indirect(site.original, site.address)
    if decoded is None:
        return None
    is_call, operand = decoded
    return is_call, _register_target(operand) if isinstance(operand, str) else _memory_target(operand)


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
