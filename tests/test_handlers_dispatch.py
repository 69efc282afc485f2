"""The monitor's single entry point routes each kind to its handler."""
from __future__ import annotations

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from sbe.handlers import cpuid, dispatch, rdtsc
from sbe.handlers.effect import RESUME, STEP, SYSCALL, SYSCALL32
from sbe.handlers.native import host_cpuid
from sbe.meta.site import KINDS, Site

ADDRESS = 0x401000


def make_site(code: str, kind: str) -> Site:
    raw = bytes.fromhex(code)
    insn = next(Cs(CS_ARCH_X86, CS_MODE_64).disasm(raw, ADDRESS, 1))
    assert insn.size == len(raw)
    return Site(ADDRESS, insn.size, kind, insn.mnemonic, insn.op_str, raw)


REGS = {"rax": 0, "rbx": 0, "rcx": 0, "rdx": 0, "rsp": 0x7FFF_FFFF_E000,
        "r11": 0x40_2000, "rip": ADDRESS}


class Fixed(cpuid.CpuModel):
    def answer(self, leaf, subleaf):
        return (0x20, 0x11, 0x22, 0x33)


class Frozen(rdtsc.Clock):
    def rdtsc(self):
        return 42 << 32 | 7

    def rdtscp(self):
        return 43 << 32 | 8, 3


def no_memory(address, size):
    raise OSError(14, "no memory")


def test_every_site_kind_has_a_handler():
    assert set(dispatch._HANDLERS) == set(KINDS)


@pytest.mark.parametrize("code, kind, action, regs", [
    ("0fa2", "cpuid", RESUME, {"rax": 0x20, "rbx": 0x11, "rcx": 0x22, "rdx": 0x33,
                               "rip": ADDRESS + 2}),
    ("0f31", "rdtsc", RESUME, {"rax": 7, "rdx": 42, "rip": ADDRESS + 2}),
    ("0f01f9", "rdtscp", RESUME, {"rax": 8, "rdx": 43, "rcx": 3, "rip": ADDRESS + 3}),
    ("41ffe3", "branch", RESUME, {"rip": 0x40_2000}),
    ("0f05", "syscall", SYSCALL, {}),
    ("cd80", "syscall", SYSCALL32, {}),
    ("0f01ef", "pkru", STEP, {}),
    ("f4", "privileged", STEP, {}),
])
def test_routes_by_kind(code, kind, action, regs):
    effect = dispatch.emulate(make_site(code, kind), REGS, no_memory, cpu=Fixed(), clock=Frozen())
    assert effect.action == action
    assert effect.regs == regs


def test_defaults_to_the_host_models():
    effect = dispatch.emulate(make_site("0fa2", "cpuid"), REGS, no_memory)
    assert (effect.regs["rax"], effect.regs["rbx"], effect.regs["rcx"],
            effect.regs["rdx"]) == host_cpuid(0)
    effect = dispatch.emulate(make_site("0f01f9", "rdtscp"), REGS, no_memory)
    assert effect.regs["rdx"] > 0


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError):
        dispatch.emulate(make_site("90", "nop"), REGS, no_memory)
