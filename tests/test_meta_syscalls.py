"""The syscall table, and that everything derived from it agrees with it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from sbe.meta import syscalls
from sbe.monitor import seccomp, syscall_hooks

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
    assert {syscalls.SYS.clone, syscalls.SYS.fork, syscalls.SYS.vfork, syscalls.SYS.clone3,
            syscalls.SYS.rt_sigreturn} == set(syscalls.TRAPS_IN_STUB)


def test_every_hook_is_the_named_function():
    for nr, hook in syscalls.HOOKS.items():
        assert syscall_hooks.HOOKS[nr] is getattr(syscall_hooks, hook)
    assert set(syscall_hooks.HOOKS) == set(syscalls.HOOKS)


def test_the_filter_traces_exactly_what_the_monitor_must_see():
    traced = {k for code, jt, jf, k in seccomp.program()[8:] if code == seccomp.BPF_JEQ_K}
    assert traced == syscalls.MUST_SEE


def test_names_for_messages():
    assert syscalls.name(0) == "read" and syscalls.name(59) == "execve"
    assert syscalls.name(10_000) == "syscall_10000"
