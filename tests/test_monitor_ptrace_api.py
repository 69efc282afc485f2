"""The ptrace binding's pre-parsed declarations are those tools/gen_ptrace_ffi.py
holds, with the layout the kernel's structures have."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from sbe.monitor import ptrace_api

TOOL = Path(__file__).resolve().parent.parent / "tools" / "gen_ptrace_ffi.py"


def generator():
    spec = importlib.util.spec_from_file_location("gen_ptrace_ffi", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_declarations_are_the_tools():
    parsed = generator().builder()
    committed = ptrace_api.ffi
    for struct in ("struct user_regs_struct", "siginfo_t", "struct sock_filter", "struct sock_fprog"):
        assert committed.sizeof(struct) == parsed.sizeof(struct), struct
        fields = [name for name, _ in parsed.typeof(struct).fields]
        assert [name for name, _ in committed.typeof(struct).fields] == fields
        for name in fields:
            assert committed.offsetof(struct, name) == parsed.offsetof(struct, name), (struct, name)
    for function in re.findall(r"(\w+)\(", generator().CDEF):
        assert hasattr(ptrace_api.libc, function), function


def test_the_kernel_layouts():
    ffi = ptrace_api.ffi
    assert ffi.sizeof("struct user_regs_struct") == 27 * 8
    assert ffi.offsetof("struct user_regs_struct", "rip") == 16 * 8
    assert ffi.sizeof("siginfo_t") == 128
    assert ffi.offsetof("siginfo_t", "u") == 16
