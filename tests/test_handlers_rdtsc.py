"""rdtsc/rdtscp emulation: how a clock reading lands in the guest's registers."""
from __future__ import annotations

from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from sbe.handlers import rdtsc
from sbe.handlers.effect import RESUME
from sbe.handlers.native import host_rdtsc
from sbe.meta.site import Site

ADDRESS = 0x401000
REGS = {"rax": 0xAAAA_AAAA_AAAA_AAAA, "rcx": 0xCCCC_CCCC_CCCC_CCCC,
        "rdx": 0xDDDD_DDDD_DDDD_DDDD, "rip": ADDRESS}


def make_site(code: bytes, kind: str) -> Site:
    insn = next(Cs(CS_ARCH_X86, CS_MODE_64).disasm(code, ADDRESS, 1))
    assert insn.size == len(code)
    return Site(ADDRESS, insn.size, kind, insn.mnemonic, insn.op_str, code)


class FixedClock(rdtsc.Clock):
    def rdtsc(self):
        return 0x1122_3344_5566_7788

    def rdtscp(self):
        return 0x8877_6655_4433_2211, 0x1003


def no_memory(address, size):
    raise AssertionError("rdtsc reads no guest memory")


def test_rdtsc_splits_the_counter_into_edx_eax():
    site = make_site(bytes.fromhex("0f31"), "rdtsc")
    effect = rdtsc.emulate_rdtsc(site, REGS, no_memory, FixedClock())
    assert effect.action == RESUME
    assert effect.regs == {"rax": 0x5566_7788, "rdx": 0x1122_3344, "rip": ADDRESS + 2}
    assert effect.writes == []


def test_rdtscp_also_loads_aux_into_ecx():
    site = make_site(bytes.fromhex("0f01f9"), "rdtscp")
    effect = rdtsc.emulate_rdtscp(site, REGS, no_memory, FixedClock())
    assert effect.regs == {"rax": 0x4433_2211, "rdx": 0x8877_6655, "rcx": 0x1003,
                           "rip": ADDRESS + 3}


def test_host_clock_reads_the_host_tsc_at_the_trap():
    site = make_site(bytes.fromhex("0f31"), "rdtsc")
    before = host_rdtsc()
    effect = rdtsc.emulate_rdtsc(site, REGS, no_memory, rdtsc.HOST)
    after = host_rdtsc()
    assert before < effect.regs["rdx"] << 32 | effect.regs["rax"] < after


def test_host_clock_rdtscp():
    site = make_site(bytes.fromhex("0f01f9"), "rdtscp")
    before = host_rdtsc()
    effect = rdtsc.emulate_rdtscp(site, REGS, no_memory, rdtsc.HOST)
    after = host_rdtsc()
    assert before < effect.regs["rdx"] << 32 | effect.regs["rax"] < after
    assert effect.regs["rcx"] < 1 << 20
