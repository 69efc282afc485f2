"""Remote syscalls: run a syscall inside a stopped guest thread, on its behalf.

The thread's registers are saved, pointed at a `syscall; int3` sequence (the gadget,
or a bootstrap copy written at the current rip before the gadget exists), resumed,
and restored once the int3 traps. orig_rax is set to -1 so the kernel's syscall
restart logic does not rewind the injected rip; restoring the saved registers brings
a pending restart back exactly as it was. Signals that arrive meanwhile are kept
for the thread and delivered afterwards.
"""
from __future__ import annotations

from sbe.monitor import ptrace_api as pt
from sbe.monitor.waiting import is_trap, run_until
from sbe.patcher import gadget

SYSCALL_INT3 = bytes.fromhex("0f05cc")


def inject(thread, nr: int, *args: int, at: int | None = None) -> int:
    """Run syscall `nr` in `thread` (stopped) and return its raw result (negative
    errno on failure). `at` is the address of a `syscall; int3` to use."""
    tid = thread.tid
    saved = pt.getregs(tid)
    regs = pt.copy_regs(saved)
    regs.rip = gadget.SYSCALL if at is None else at
    regs.rax = nr
    regs.orig_rax = 0xFFFFFFFFFFFFFFFF
    for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
        setattr(regs, name, value & 0xFFFFFFFFFFFFFFFF)
    pt.setregs(tid, regs)
    trap_rip = regs.rip + 3
    out = pt.new_regs()
    run_until(thread, pt.PTRACE_CONT, lambda status: is_trap(status) and pt.getregs(tid, out).rip == trap_rip)
    result = out.rax
    pt.setregs(tid, saved)
    return result - (1 << 64) if result >= 1 << 63 else result


def bootstrap(thread, mem, nr: int, *args: int) -> int:
    """A remote syscall before the gadget exists: borrow three bytes at rip."""
    rip = pt.getregs(thread.tid).rip
    saved = mem.read(rip, 3)
    mem.write(rip, SYSCALL_INT3)
    try:
        return inject(thread, nr, *args, at=rip)
    finally:
        mem.write(rip, saved)
