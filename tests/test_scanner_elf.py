"""Static scans of real ELF files: one the test builds, and the system's /bin/true."""
from __future__ import annotations

import shutil
import subprocess

import pytest
from elftools.elf.elffile import ELFFile

from sbe.scanner.elf import scan_elf

# Functions with a sensitive instruction each, at global labels so the test can
# read the exact addresses back from the symbol table. The labels are untyped
# symbols, which the scanner does not take as entries. probe_cpuid and probe_getpid
# are called from main and have unwind information; probe_rdtsc has neither, so
# only its function symbol (or the sweep) leads to it.
PROGRAM = r"""
void probe_cpuid(void);
long probe_getpid(void);
__asm__(
    ".text\n"
    ".globl probe_cpuid\n.type probe_cpuid, @function\nprobe_cpuid:\n"
    ".cfi_startproc\n push %rbx\n xor %eax, %eax\n"
    ".globl at_cpuid\nat_cpuid:\n cpuid\n"
    " pop %rbx\n ret\n.cfi_endproc\n.size probe_cpuid, .-probe_cpuid\n"
    ".globl probe_getpid\n.type probe_getpid, @function\nprobe_getpid:\n"
    ".cfi_startproc\n mov $39, %eax\n"
    ".globl at_syscall\nat_syscall:\n syscall\n"
    " ret\n.cfi_endproc\n.size probe_getpid, .-probe_getpid\n"
    ".globl probe_rdtsc\n.type probe_rdtsc, @function\nprobe_rdtsc:\n"
    ".globl at_rdtsc\nat_rdtsc:\n rdtsc\n ret\n.size probe_rdtsc, .-probe_rdtsc\n");

int main(void) {
    probe_cpuid();
    return probe_getpid() > 0 ? 0 : 1;
}
"""

# No libc, no symbols once stripped, no unwind information: only e_entry is left.
BARE_START = """
.globl _start
_start:
    cpuid
    mov $60, %eax
    xor %edi, %edi
    syscall
"""


def symbol(path, name: str) -> int:
    with open(path, "rb") as f:
        (sym,) = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)
        return sym["st_value"]


def lowest_mapping(path) -> int:
    with open(path, "rb") as f:
        return min(s["p_vaddr"] for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD") & ~0xFFF


@pytest.fixture(scope="module", params=["-pie", "-no-pie"])
def program(request, tmp_path_factory):
    """A built probe program: its path, its stripped copy, and the sites' offsets."""
    directory = tmp_path_factory.mktemp(request.param.lstrip("-"))
    source = directory / "probe.c"
    source.write_text(PROGRAM)
    binary = directory / "probe"
    flags = ["-fPIE"] if request.param == "-pie" else ["-fno-pie"]
    subprocess.run(["gcc", "-O1", *flags, request.param, "-o", binary, source], check=True)
    assert subprocess.run([binary]).returncode == 0
    stripped = directory / "probe-stripped"
    shutil.copy(binary, stripped)
    subprocess.run(["strip", stripped], check=True)
    base = lowest_mapping(binary)
    expected = {symbol(binary, f"at_{kind}") - base: kind for kind in ("cpuid", "syscall", "rdtsc")}
    return binary, stripped, expected


def probes(sites, expected) -> dict[int, str]:
    return {s.offset: s.kind for s in sites if s.offset in expected}


def test_finds_the_probes_at_module_offsets(program):
    binary, _, expected = program
    sites = scan_elf(binary)
    assert probes(sites, expected) == expected
    by_offset = {s.offset: s for s in sites}
    assert [(by_offset[o].mnemonic, by_offset[o].op_str, by_offset[o].bytes) for o in sorted(expected)] == [
        ("cpuid", "", b"\x0f\xa2"), ("syscall", "", b"\x0f\x05"), ("rdtsc", "", b"\x0f\x31")]


def test_function_symbols_are_entries(program):
    binary, _, expected = program
    assert probes(scan_elf(binary, sweep=False), expected) == expected


def test_stripped_binary_is_reached_through_unwind_information(program):
    _, stripped, expected = program
    with open(stripped, "rb") as f:
        assert ELFFile(f).get_section_by_name(".symtab") is None
    found = probes(scan_elf(stripped, sweep=False), expected)
    assert found == {offset: kind for offset, kind in expected.items() if kind != "rdtsc"}


def test_reports_only_sites_and_sorted_by_offset(program):
    binary, _, _ = program
    sites = scan_elf(binary)
    assert sites == sorted(sites)
    assert {s.kind for s in sites} <= {"syscall", "cpuid", "rdtsc", "rdtscp", "pkru", "privileged", "branch"}
    assert all(len(s.bytes) >= 1 for s in sites)


def test_entry_point_alone_leads_into_the_code(tmp_path):
    source = tmp_path / "start.s"
    source.write_text(BARE_START)
    binary = tmp_path / "bare"
    subprocess.run(["gcc", "-nostdlib", "-static", "-s", "-o", binary, source], check=True)
    assert subprocess.run([binary]).returncode == 0
    with open(binary, "rb") as f:
        entry = ELFFile(f)["e_entry"] - lowest_mapping(binary)
    sites = scan_elf(binary, sweep=False)
    assert [(s.offset, s.kind) for s in sites] == [(entry, "cpuid"), (entry + 9, "syscall")]


def test_bin_true_start_halts_after_libc_start_main():
    # glibc's _start calls __libc_start_main, which never returns, and puts a hlt
    # after the call; the PLT jumps through the GOT are indirect branches.
    with open("/bin/true", "rb") as f:
        entry = ELFFile(f)["e_entry"] - lowest_mapping("/bin/true")
    sites = scan_elf("/bin/true", sweep=False)
    halts = [s.offset for s in sites if s.mnemonic == "hlt"]
    assert any(entry < offset < entry + 64 for offset in halts)
    assert sum(s.kind == "branch" for s in sites) >= 5
