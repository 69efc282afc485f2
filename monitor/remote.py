"""Remote syscalls: run a syscall inside a stopped guest thread, on its behalf.

The thread's registers are saved, pointed at a `syscall; int3` sequence (the gadget,
or a bootstrap copy written at the current rip before the gadget exists), resumed,
and restored once the int3 traps. orig_rax is set to -1 so the kernel's syscall
restart logic does not rewind the injected rip; restoring the saved registers brings
a pending restart back exactly as it was. Signals that arrive meanwhile are kept
for the thread and delivered afterwards.
"""
from __future__ import annotations

import os
import signal

from sbe.monitor import ptrace_api as pt
from sbe.patcher import gadget

SYSCALL_INT3 = bytes.fromhex("0f05cc")


class GuestGone(Exception):
    """The thread died (e.g. SIGKILL) while the monitor was using it."""

    def __init__(self, tid: int, status: int) -> None:
        super().__init__(f"task {tid} ended")
        self.tid = tid
        self.status = status


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
    pt.resume(tid)
    trap_rip = regs.rip + 3
    while True:
        _, status = os.waitpid(tid, pt.WALL)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            raise GuestGone(tid, status)
        sig = os.WSTOPSIG(status)
        event = status >> 16
        if event == pt.PTRACE_EVENT_SECCOMP:
            pt.resume(tid)
            continue
        if sig == signal.SIGTRAP and event == 0:
            out = pt.getregs(tid)
            if out.rip == trap_rip:
                break
        if event == 0 and sig != signal.SIGTRAP:
            thread.pending_signals.append(sig)
        pt.resume(tid)
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
