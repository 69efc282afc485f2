"""The syscall table, and that everything derived from it agrees with it."""
from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from sbe.meta import syscalls
from sbe.monitor import seccomp, syscall_hooks
from sbe.patcher import gadget

HEADER = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


@pytest.mark.skipif(not HEADER.exists(), reason="the kernel's asm/unistd_64.h is not installed")
def test_numbers_are_the_kernels():
    header = {int(nr): name for name, nr in re.findall(r"#define __NR_(\w+) (\d+)", HEADER.read_text())}
    for nr, name in header.items():
        assert syscalls.NAMES[nr] == name


def test_policy_names_real_calls_once():
    names = [p.name for p in syscalls.POLICY]
    assert len(names) == len(set(names))
    assert all(name in syscalls.NUMBERS for name in names)


def test_what_a_stub_traps_for_or_a_hook_handles_the_monitor_sees():
    """A call a stub refuses to issue, or a hook must run around, would slip past
    the monitor if the filter let it through from the gadget."""
    assert set(syscalls.TRAPS_IN_STUB) <= syscalls.MUST_SEE
    assert set(syscalls.HOOKS) <= syscalls.MUST_SEE
    assert {syscalls.SYS.clone, syscalls.SYS.fork, syscalls.SYS.vfork,
            syscalls.SYS.clone3} == set(syscalls.TRAPS_IN_STUB)


def test_every_hook_is_the_named_function():
    for nr, hook in syscalls.HOOKS.items():
        assert syscall_hooks.HOOKS[nr] is getattr(syscall_hooks, hook)
    assert set(syscall_hooks.HOOKS) == set(syscalls.HOOKS)


def run_filter(prog, nr: int, arch: int, ip: int) -> int:
    """The action the BPF program gives a syscall (a classic-BPF interpreter for the
    instructions the filter uses)."""
    data = struct.pack("<iIQ", nr, arch, ip) + bytes(48)
    pc = 0
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == seccomp.BPF_LD_W_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == seccomp.BPF_JEQ_K:
            pc += jt if acc == k else jf
        elif code == seccomp.BPF_JGE_K:
            pc += jt if acc >= k else jf
        else:
            assert code == seccomp.BPF_RET_K
            return k


def test_the_filter_traces_exactly_what_the_monitor_must_see():
    """From a gadget, every number but those the monitor must see is allowed; from
    anywhere else, or as another arch (int 0x80), everything is traced."""
    prog = seccomp.program()
    arch = seccomp.AUDIT_ARCH_X86_64
    for ip in (gadget.SYSCALL_RET, gadget.PATCH_RET):
        allowed = {nr for nr in range(600) if run_filter(prog, nr, arch, ip) == seccomp.SECCOMP_RET_ALLOW}
        assert allowed == set(range(600)) - syscalls.MUST_SEE
        assert not any(run_filter(prog, nr, 0x40000003, ip) == seccomp.SECCOMP_RET_ALLOW for nr in range(600))
    others = (0, gadget.PATCH, gadget.PATCH_RET + 1, gadget.PATCH_RET + (1 << 32), gadget.PATCH_RET & 0xFFFFFFFF)
    for ip in others:
        assert {run_filter(prog, nr, arch, ip) for nr in range(600)} == {seccomp.SECCOMP_RET_TRACE}


def test_names_for_messages():
    assert syscalls.name(0) == "read" and syscalls.name(59) == "execve"
    assert syscalls.name(10_000) == "syscall_10000"
