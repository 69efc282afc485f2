"""The virtual CPU model and cpuid emulation."""
from __future__ import annotations

from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from keystone import KS_ARCH_X86, KS_MODE_64, Ks

from sbe.handlers import cpuid
from sbe.handlers.effect import RESUME
from sbe.handlers.native import host_cpuid
from sbe.meta.site import Site

ADDRESS = 0x401000


def make_site(source: str) -> Site:
    code = bytes(Ks(KS_ARCH_X86, KS_MODE_64).asm(source, ADDRESS)[0])
    insn = next(Cs(CS_ARCH_X86, CS_MODE_64).disasm(code, ADDRESS, 1))
    assert insn.size == len(code)
    return Site(ADDRESS, insn.size, "cpuid", insn.mnemonic, insn.op_str, code)


class RecordingCpu(cpuid.CpuModel):
    """Answers with its arguments, so a test sees what the model was asked."""

    def __init__(self):
        self.asked = []

    def answer(self, leaf, subleaf):
        self.asked.append((leaf, subleaf))
        return (leaf & 0xFFFF_FFFF, subleaf, 0xC0DE, 0xFFFF_FFFF)


def no_memory(address, size):
    raise AssertionError("cpuid reads no guest memory")


def test_subleaf_only_for_leaves_that_take_one():
    model = RecordingCpu()
    model.query(1, 5)
    model.query(0x80000001, 9)
    model.query(7, 1)
    model.query(0xD, 2)
    model.query(0x8000001D, 3)
    assert model.asked == [(1, 0), (0x80000001, 0), (7, 1), (0xD, 2), (0x8000001D, 3)]


def test_emulate_uses_low_halves_and_zero_extends():
    site = make_site("cpuid")
    regs = {"rax": 0xFFFF_FFFF_0000_0007, "rbx": 0xBBBB_BBBB_BBBB_BBBB,
            "rcx": 0xABCD_EF01_0000_0001, "rdx": 0xDDDD_DDDD_DDDD_DDDD, "rip": ADDRESS}
    model = RecordingCpu()
    effect = cpuid.emulate(site, regs, no_memory, model)
    assert model.asked == [(7, 1)]
    assert effect.action == RESUME
    assert effect.regs == {"rax": 7, "rbx": 1, "rcx": 0xC0DE, "rdx": 0xFFFF_FFFF,
                           "rip": ADDRESS + 2}
    assert effect.writes == []


def test_emulate_ignores_ecx_for_plain_leaves():
    site = make_site("cpuid")
    model = RecordingCpu()
    cpuid.emulate(site, {"rax": 0x8000_0002, "rcx": 0x1234, "rip": ADDRESS}, no_memory, model)
    assert model.asked == [(0x8000_0002, 0)]


def test_host_model_answers_as_the_host():
    site = make_site("cpuid")
    effect = cpuid.emulate(site, {"rax": 0, "rcx": 0, "rip": ADDRESS}, no_memory, cpuid.HostCpu())
    assert (effect.regs["rax"], effect.regs["rbx"], effect.regs["rcx"],
            effect.regs["rdx"]) == host_cpuid(0)


def test_host_model_asks_the_cpu_once_per_key(monkeypatch):
    calls = []

    def counting(leaf, subleaf=0):
        calls.append((leaf, subleaf))
        return host_cpuid(leaf, subleaf)

    monkeypatch.setattr(cpuid, "host_cpuid", counting)
    model = cpuid.HostCpu()
    first = model.query(1, 0)
    assert model.query(1, 77) == first
    assert model.query(7, 0) == model.query(7, 0)
    model.query(7, 1)
    assert calls == [(1, 0), (7, 0), (7, 1)]


def test_host_table_covers_the_host_leaves():
    model = cpuid.HostCpu()
    table = model.table()
    highest = host_cpuid(0)[0]
    highest_extended = host_cpuid(0x80000000)[0]
    for leaf in range(highest + 1):
        assert (leaf, 0) in table
    for leaf in range(0x80000000, highest_extended + 1):
        assert (leaf, 0) in table
    assert table[(0, 0)] == host_cpuid(0)
    assert table[(0x80000000, 0)] == host_cpuid(0x80000000)
    for (leaf, subleaf), row in table.items():
        assert len(row) == 4 and all(0 <= value < 1 << 32 for value in row)
        assert subleaf == 0 or leaf in cpuid.SUBLEAF_LEAVES
        assert subleaf < cpuid.TABLE_SUBLEAVES
        assert leaf <= highest or 0x40000000 <= leaf < 0x40000100 or \
            0x80000000 <= leaf <= highest_extended
        assert model.query(leaf, subleaf) == row
    if highest >= 0xD and host_cpuid(0xD, 2)[0]:
        assert table[(0xD, 2)] == host_cpuid(0xD, 2)
