"""What emulating one site does to the guest, as data the monitor applies.

Handlers stay pure: they read registers and memory through the arguments they are
given and describe the result; the monitor (which owns ptrace) carries it out.
"""
from __future__ import annotations

from sbe.meta.record import Record

# What the monitor does after applying regs and writes.
RESUME = "resume"        # continue at regs["rip"]
SYSCALL = "syscall"      # run the syscall for the guest through the gadget, then resume at `resume`
SYSCALL32 = "syscall32"  # the same through the `int 0x80` gadget
STEP = "step"            # run the original instruction natively once (restore, single-step, re-plant)


class Effect(Record):
    __slots__ = ("action", "regs", "writes", "resume", "branch_target", "cpuid_answer")

    def __init__(self, action: str = RESUME, regs: dict | None = None, writes: list | None = None,
                 resume: int = 0, branch_target: int | None = None, cpuid_answer: tuple | None = None):
        self.action = action
        self.regs = {} if regs is None else regs          # register name -> new 64-bit value
        self.writes = [] if writes is None else writes    # [(address, bytes)] guest memory to write
        self.resume = resume                              # for SYSCALL*: where the guest continues after it
        # Follow-ups the monitor owes the patched guest, so it need not know kinds:
        self.branch_target = branch_target  # an indirect branch lands here: scan it, let stubs go there
        self.cpuid_answer = cpuid_answer    # (leaf, subleaf, (eax, ebx, ecx, edx)) a cpuid stub's table can learn
