"""What emulating one site does to the guest, as data the monitor applies.

Handlers stay pure: they read registers and memory through the arguments they are
given and describe the result; the monitor (which owns ptrace) carries it out.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# What the monitor does after applying regs and writes.
RESUME = "resume"        # continue at regs["rip"]
SYSCALL = "syscall"      # run the syscall for the guest through the gadget, then resume at `resume`
SYSCALL32 = "syscall32"  # the same through the `int 0x80` gadget
STEP = "step"            # run the original instruction natively once (restore, single-step, re-plant)


@dataclass
class Effect:
    action: str = RESUME
    regs: dict = field(default_factory=dict)          # register name -> new 64-bit value
    writes: list = field(default_factory=list)        # [(address, bytes)] guest memory to write
    resume: int = 0                                   # for SYSCALL*: where the guest continues after it
    # Follow-ups the monitor owes the patched guest, so it need not know kinds:
    branch_target: int | None = None    # an indirect branch lands here: scan it, let stubs go there
    cpuid_answer: tuple | None = None   # (leaf, subleaf, (eax, ebx, ecx, edx)) a cpuid stub's table can learn
