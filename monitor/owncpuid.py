"""CPUID faulting in sbe's own thread, so that a switch between sbe and a guest that
has it writes no MSR (monitor/owncpuid.c says why and how sbe's own cpuid still
works)."""
from __future__ import annotations

import logging

try:
    from ._owncpuid_native import lib
except ImportError:    # not built (tools/build_native.py): each stop costs more
    lib = None

log = logging.getLogger(__name__)


def arm() -> bool:
    """Arm it for the calling thread; False when this machine or build cannot."""
    armed = lib is not None and lib.sbe_own_cpuid_faulting() == 0
    log.debug("CPUID faulting in sbe's own thread: %s", "armed" if armed else "not available")
    return armed


def disarm() -> None:
    """Undo arm (when it armed): the process goes on as it was before."""
    lib.sbe_own_cpuid_faulting_off()
