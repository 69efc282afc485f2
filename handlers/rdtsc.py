"""The time-stamp counter a guest reads through `rdtsc` and `rdtscp`.

The guest reads whatever a Clock answers, so the monitor can later offset, scale or
replay guest time by swapping the clock without touching the instruction semantics
below.
"""
from __future__ import annotations

from sbe.handlers.effect import Effect
from sbe.handlers.native import host_rdtsc, host_rdtscp

_LOW32 = 0xFFFFFFFF


class Clock:
    """A TSC as the guest sees it; subclasses supply both readings."""

    def rdtsc(self) -> int:
        raise NotImplementedError

    def rdtscp(self) -> tuple[int, int]:
        """(tsc, TSC_AUX)."""
        raise NotImplementedError


class HostClock(Clock):
    """The host's TSC, read when the guest traps.

    The reading is later than the guest's instruction by the trap's cost, which is
    what a guest already tolerates from preemption between two reads.
    """

    def rdtsc(self) -> int:
        return host_rdtsc()

    def rdtscp(self) -> tuple[int, int]:
        return host_rdtscp()


HOST = HostClock()


def emulate_rdtsc(site, regs, read, clock: Clock) -> Effect:
    tsc = clock.rdtsc()
    return Effect(regs={"rax": tsc & _LOW32, "rdx": tsc >> 32 & _LOW32, "rip": site.end})


def emulate_rdtscp(site, regs, read, clock: Clock) -> Effect:
    tsc, aux = clock.rdtscp()
    return Effect(regs={"rax": tsc & _LOW32, "rdx": tsc >> 32 & _LOW32, "rcx": aux & _LOW32,
                        "rip": site.end})
