"""`rdpkru` and `wrpkru`: protection keys, for now the host's own.

The guest's PKRU is a register of its thread that the kernel already saves and
restores, so running the original instruction natively gives the guest exactly the
keys, and the #UD or #GP, it would have had. A virtual PKRU comes with the virtual
platform.
"""
from __future__ import annotations

from sbe.handlers.effect import STEP, Effect


def emulate(site, regs, read) -> Effect:
    return Effect(action=STEP)
