"""System-call instructions: the monitor, not the CPU, carries the call out.

`syscall` and `int 0x80` enter the kernel through different ABIs (64-bit and
i386 numbering), so each goes through the gadget of its own kind and the guest
resumes after the site. `sysenter` does not come back after itself (the kernel
returns to the vDSO's landing point) and is #UD in 64-bit mode on AMD; running it
natively keeps whichever of those the host would have done.
"""
from __future__ import annotations

from sbe.handlers.effect import STEP, SYSCALL, SYSCALL32, Effect

# Keyed by the opcode, the site's last two bytes, so that prefixes do not matter.
_ACTIONS = {
    b"\x0f\x05": SYSCALL,    # syscall
    b"\xcd\x80": SYSCALL32,  # int 0x80
    b"\x0f\x34": STEP,       # sysenter
}


def emulate(site, regs, read) -> Effect:
    action = _ACTIONS.get(bytes(site.original[-2:]))
    if action is None:
        raise ValueError(f"{site.insn} at {site.address:#x} is not a system-call instruction")
    if action == STEP:
        return Effect(action=STEP)
    return Effect(action=action, resume=site.end)
