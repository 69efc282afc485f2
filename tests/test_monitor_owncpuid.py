"""sbe's own thread with CPUID faulting (monitor/owncpuid.c): its own cpuid still
answers as the CPU does, and other faults are still faults."""
from __future__ import annotations

import subprocess
import sys

import pytest

from sbe.monitor import owncpuid

pytestmark = pytest.mark.skipif(owncpuid.lib is None, reason="monitor/_owncpuid_native is not built")

# cpuid of each leaf in a child process, before and after arming: a mapped
# `cpuid; ret`-style function called through ctypes.
CHILD = """
import ctypes, mmap, os, sys
from sbe.monitor import owncpuid
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})   # leaf 1 names the CPU
code = bytes.fromhex("53" "4989d0" "89f8" "89f1" "0fa2" "418900" "41895804" "41894808" "4189500c" "5b" "c3")
# push rbx; mov r8, rdx; mov eax, edi; mov ecx, esi; cpuid; mov [r8], eax;
# mov [r8+4], ebx; mov [r8+8], ecx; mov [r8+12], edx; pop rbx; ret
page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write(code)
fn = ctypes.CFUNCTYPE(None, ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p)(
    ctypes.addressof(ctypes.c_char.from_buffer(page)))
def leaves():
    out = []
    for leaf in (0, 1, 7, 0x80000000):
        regs = (ctypes.c_uint * 4)()
        fn(leaf, 0, ctypes.addressof(regs))
        out.append(list(regs))
    return out
before = leaves()
if not owncpuid.arm():
    print("unavailable"); sys.exit(0)
print("same" if leaves() == before else f"differ {before} {leaves()}")
if sys.argv[1:] == ["crash"]:
    ctypes.string_at(8)     # a fault of another kind: still the process's death
"""


@pytest.mark.timeout(60)
def test_own_cpuid_answers_as_the_cpu_does():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=50)
    if out.stdout.strip() == "unavailable":
        pytest.skip("no CPUID faulting on this machine")
    assert (out.returncode, out.stdout) == (0, "same\n"), out.stderr


@pytest.mark.timeout(60)
def test_other_faults_still_kill():
    out = subprocess.run([sys.executable, "-c", CHILD, "crash"], capture_output=True, text=True, timeout=50)
    if out.stdout.strip() == "unavailable":
        pytest.skip("no CPUID faulting on this machine")
    assert out.stdout == "same\n" and out.returncode == -11, (out.returncode, out.stderr)


@pytest.mark.timeout(60)
def test_a_run_in_the_callers_process_leaves_it_as_it_was(guests):
    """cli.main in-process (as a test or an embedding program runs it) arms sbe's
    thread and pins it for the guest, and gives both back when the guest is gone."""
    import ctypes
    import os

    from sbe.monitor import cli
    libc = ctypes.CDLL(None, use_errno=True)
    cpus = os.sched_getaffinity(0)
    assert cli.main(["run", "--", str(guests / "exit3")]) == 3
    assert libc.syscall(ctypes.c_long(158), ctypes.c_long(0x1011), ctypes.c_long(0)) == 1   # ARCH_GET_CPUID
    assert os.sched_getaffinity(0) == cpus
