"""The virtual CPU a guest sees through `cpuid`.

The guest is told whatever a CpuModel answers, so the monitor can present a CPU
other than the host's (another vendor, hidden features) by swapping the model. A
model can also export its answers as a table keyed by (leaf, subleaf), so the same
CPU can later be served by stubs inside the guest without trapping to the monitor.
"""
from __future__ import annotations

from sbe.handlers.effect import Effect
from sbe.handlers.native import host_cpuid

# Leaves whose answer depends on ecx. For every other leaf the CPU ignores ecx, so
# the model is asked for subleaf 0 whatever the guest left in ecx; otherwise junk in
# ecx would split one answer into many cache and table entries.
SUBLEAF_LEAVES = frozenset({
    0x4, 0x7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1B, 0x1D, 0x1E, 0x1F,
    0x20, 0x23, 0x24,
    0x8000001D, 0x80000020, 0x80000026,
})

# How many subleaves table() records per subleaf leaf. Every architected subleaf
# range (xsave components, cache levels, topology levels) fits below this.
TABLE_SUBLEAVES = 64

# A range's base leaf reports its highest leaf in eax; a garbage answer (a host that
# does not implement the range) must not make table() walk billions of leaves.
_RANGE_SPAN = 0x100
_HYPERVISOR_BIT = 1 << 31  # leaf 1 ecx: running under a hypervisor, 0x40000000 is valid

Registers = tuple[int, int, int, int]


class CpuModel:
    """A CPU as answers to cpuid; subclasses supply `answer`."""

    def query(self, leaf: int, subleaf: int) -> Registers:
        return self.answer(leaf, subleaf if leaf in SUBLEAF_LEAVES else 0)

    def answer(self, leaf: int, subleaf: int) -> Registers:
        """Called with subleaf already 0 for leaves that ignore it."""
        raise NotImplementedError

    def table(self) -> dict[tuple[int, int], Registers]:
        raise NotImplementedError


class HostCpu(CpuModel):
    """The host CPU, as the guest would see it without sbe.

    Answers are cached, so a guest sees one consistent CPU even though fields such
    as the initial APIC id depend on which core the monitor happened to run on, and
    a repeated cpuid costs a dict lookup instead of a VM exit on a virtualized host.
    """

    def __init__(self) -> None:
        self._answers: dict[tuple[int, int], Registers] = {}

    def answer(self, leaf: int, subleaf: int) -> Registers:
        key = (leaf, subleaf)
        found = self._answers.get(key)
        if found is None:
            found = self._answers[key] = host_cpuid(leaf, subleaf)
        return found

    def table(self) -> dict[tuple[int, int], Registers]:
        rows = {}
        for leaf in self._leaves():
            if leaf not in SUBLEAF_LEAVES:
                rows[(leaf, 0)] = self.query(leaf, 0)
                continue
            for subleaf in range(TABLE_SUBLEAVES):
                found = self.query(leaf, subleaf)
                # An all-zero answer is what a table gives for a missing entry anyway.
                if subleaf == 0 or any(found):
                    rows[(leaf, subleaf)] = found
        return rows

    def _leaves(self):
        bases = [0x0, 0x80000000]
        if self.query(1, 0)[2] & _HYPERVISOR_BIT:
            bases.append(0x40000000)
        for base in bases:
            highest = self.query(base, 0)[0]
            if base <= highest < base + _RANGE_SPAN:
                yield from range(base, highest + 1)


HOST = HostCpu()


def emulate(site, regs, read, model: CpuModel) -> Effect:
    leaf = regs["rax"] & 0xFFFFFFFF
    subleaf = regs["rcx"] & 0xFFFFFFFF
    eax, ebx, ecx, edx = model.query(leaf, subleaf)
    return Effect(regs={"rax": eax, "rbx": ebx, "rcx": ecx, "rdx": edx, "rip": site.end},
                  cpuid_answer=(leaf, subleaf, (eax, ebx, ecx, edx)))
