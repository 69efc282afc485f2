"""The host's cpuid and TSC, run from the monitor's own process, by machine code that
is keystone's encoding of the assembly text kept beside it."""
from __future__ import annotations

import os
import re
import struct

import pytest
from keystone import KS_ARCH_X86, KS_MODE_64, Ks

from sbe.handlers import native
from sbe.handlers.native import host_cpuid, host_rdtsc, host_rdtscp


@pytest.mark.parametrize("routine", native._ROUTINES, ids=["cpuid", "rdtsc", "rdtscp"])
def test_machine_code_is_keystones_encoding_of_its_text(routine):
    """The routines are kept as bytes so that no assembler runs in the monitor; their
    text beside them is what they mean, and must stay what they are."""
    assembler = Ks(KS_ARCH_X86, KS_MODE_64)
    for encoding, text in routine:
        assert bytes(assembler.asm(text)[0]).hex() == encoding, text


def cpuinfo(field: str) -> str:
    with open("/proc/cpuinfo") as f:
        return re.search(rf"^{field}\s*:\s*(.*)$", f.read(), re.MULTILINE).group(1)


def test_vendor_matches_proc_cpuinfo():
    highest, ebx, ecx, edx = host_cpuid(0)
    assert struct.pack("<III", ebx, edx, ecx).decode() == cpuinfo("vendor_id")
    assert highest >= 1


def test_signature_matches_proc_cpuinfo():
    signature = host_cpuid(1)[0]
    family = signature >> 8 & 0xF
    if family == 0xF:
        family += signature >> 20 & 0xFF
    model = signature >> 4 & 0xF
    if family >= 6:
        model += (signature >> 16 & 0xF) << 4
    assert family == int(cpuinfo("cpu family"))
    assert model == int(cpuinfo("model"))
    assert signature & 0xF == int(cpuinfo("stepping"))


@pytest.mark.skipif(" avx " not in f" {cpuinfo('flags')} ", reason="host has no AVX")
def test_subleaf_reaches_the_cpu():
    # xsave component 2 (AVX upper halves) is 256 bytes at offset 576 on every CPU;
    # subleaf 0 describes the whole area instead.
    assert host_cpuid(0xD, 2) == (256, 576, 0, 0)
    assert host_cpuid(0xD, 0) != host_cpuid(0xD, 2)


def test_results_are_32_bit():
    for leaf in (0, 1, 7, 0x80000000, 0x80000001):
        assert all(0 <= value < 1 << 32 for value in host_cpuid(leaf))


def test_rdtsc_increases():
    readings = [host_rdtsc() for _ in range(100)]
    assert all(a < b for a, b in zip(readings, readings[1:]))
    assert readings[0] > 0


def test_rdtscp_is_ordered_with_rdtsc():
    before = host_rdtsc()
    tsc, _ = host_rdtscp()
    after = host_rdtsc()
    assert before < tsc < after


def test_rdtscp_aux_is_the_current_cpu():
    # Linux keeps (node << 12) | cpu in TSC_AUX; pinning the thread fixes the cpu.
    allowed = os.sched_getaffinity(0)
    try:
        for cpu in sorted(allowed)[:8]:
            os.sched_setaffinity(0, {cpu})
            _, aux = host_rdtscp()
            assert aux & 0xFFF == cpu
            assert aux < 1 << 20
    finally:
        os.sched_setaffinity(0, allowed)
