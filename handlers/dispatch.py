"""The one entry point the monitor calls at a trap: the site's kind picks the handler.

Every handler is reached through the same call, so the monitor knows nothing of
kinds; the CPU and clock models are passed along to the handlers that consult them.
"""
from __future__ import annotations

from sbe.handlers import branch, cpuid, pkru, privileged, rdtsc, syscall
from sbe.handlers.effect import Effect

_HANDLERS = {
    "cpuid": lambda site, regs, read, cpu, clock: cpuid.emulate(site, regs, read, cpu),
    "rdtsc": lambda site, regs, read, cpu, clock: rdtsc.emulate_rdtsc(site, regs, read, clock),
    "rdtscp": lambda site, regs, read, cpu, clock: rdtsc.emulate_rdtscp(site, regs, read, clock),
    "branch": lambda site, regs, read, cpu, clock: branch.emulate(site, regs, read),
    "syscall": lambda site, regs, read, cpu, clock: syscall.emulate(site, regs, read),
    "pkru": lambda site, regs, read, cpu, clock: pkru.emulate(site, regs, read),
    "privileged": lambda site, regs, read, cpu, clock: privileged.emulate(site, regs, read),
}


def emulate(site, regs, read, cpu: cpuid.CpuModel | None = None,
            clock: rdtsc.Clock | None = None) -> Effect:
    """`read(address, size) -> bytes` raises OSError where the guest has no readable
    memory. `cpu` and `clock` default to the host's."""
    try:
        handler = _HANDLERS[site.kind]
    except KeyError:
        raise ValueError(f"no handler for site kind {site.kind!r}") from None
    return handler(site, regs, read, cpuid.HOST if cpu is None else cpu,
                   rdtsc.HOST if clock is None else clock)
