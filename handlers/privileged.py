"""Privileged and I/O instructions (hlt, in/out, cli, mov to control registers...).

In user mode the host CPU refuses them (#GP, delivered as SIGSEGV) unless the
kernel has granted the thread I/O permission; running the original natively
reproduces whichever the guest would have met. Emulating them against a virtual
platform comes later.
"""
from __future__ import annotations

from sbe.handlers.effect import STEP, Effect


def emulate(site, regs, read) -> Effect:
    return Effect(action=STEP)
