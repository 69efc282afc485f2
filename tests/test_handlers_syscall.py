"""Kinds whose instruction the kernel or the CPU carries out: syscall, pkru, privileged."""
from __future__ import annotations

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs

from sbe.handlers import pkru, privileged, syscall
from sbe.handlers.effect import STEP, SYSCALL, SYSCALL32
from sbe.meta.site import Site

ADDRESS = 0x401000
REGS = {"rax": 60, "rdi": 0, "rsp": 0x7FFF_FFFF_E000, "rip": ADDRESS}


def make_site(code: str, kind: str) -> Site:
    raw = bytes.fromhex(code)
    insn = next(Cs(CS_ARCH_X86, CS_MODE_64).disasm(raw, ADDRESS, 1))
    assert insn.size == len(raw)
    return Site(ADDRESS, insn.size, kind, insn.mnemonic, insn.op_str, raw)


def no_memory(address, size):
    raise AssertionError("these handlers read no guest memory")


@pytest.mark.parametrize("code, text, action", [
    ("0f05", "syscall", SYSCALL),
    ("480f05", "syscall", SYSCALL),  # a REX prefix changes nothing
    ("cd80", "int 0x80", SYSCALL32),
])
def test_system_calls_go_through_the_gadget(code, text, action):
    site = make_site(code, "syscall")
    assert site.insn == text
    effect = syscall.emulate(site, REGS, no_memory)
    assert effect.action == action
    assert effect.resume == ADDRESS + len(bytes.fromhex(code))
    assert effect.regs == {} and effect.writes == []


def test_sysenter_runs_natively():
    effect = syscall.emulate(make_site("0f34", "syscall"), REGS, no_memory)
    assert effect.action == STEP


def test_other_instructions_are_not_system_calls():
    with pytest.raises(ValueError):
        syscall.emulate(make_site("cd81", "syscall"), REGS, no_memory)


@pytest.mark.parametrize("code, text", [("0f01ee", "rdpkru"), ("0f01ef", "wrpkru")])
def test_pkru_runs_natively(code, text):
    site = make_site(code, "pkru")
    assert site.insn == text
    effect = pkru.emulate(site, REGS, no_memory)
    assert effect.action == STEP
    assert effect.regs == {} and effect.writes == []


@pytest.mark.parametrize("code, text", [
    ("f4", "hlt"), ("fa", "cli"), ("ec", "in al, dx"), ("ee", "out dx, al"),
    ("0f22c0", "mov cr0, rax"), ("0f01f8", "swapgs"),
])
def test_privileged_runs_natively(code, text):
    site = make_site(code, "privileged")
    assert site.insn == text
    effect = privileged.emulate(site, REGS, no_memory)
    assert effect.action == STEP
    assert effect.regs == {} and effect.writes == []
