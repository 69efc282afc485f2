"""What the guest sees of its own code. Hidden patches need protection keys, which
sbe does not use yet (and this machine may not have): so a guest reading its code
sees exactly the planted sites, and nothing else differs."""
from __future__ import annotations

import json

import pytest
from elftools.elf.elffile import ELFFile

from conftest import run_cmd, run_sbe


def probe_bytes(stdout: bytes) -> list[int]:
    line = next(l for l in stdout.decode().splitlines() if l.startswith("probe bytes: "))
    return [int(b, 16) for b in line.split(": ", 1)[1].split()]


def symbol_offset(path, name) -> int:
    with open(path, "rb") as f:
        elf = ELFFile(f)
        base = min(s["p_vaddr"] for s in elf.iter_segments() if s["p_type"] == "PT_LOAD") & ~0xFFF
        sym, = elf.get_section_by_name(".symtab").get_symbol_by_name(name)
        return sym["st_value"] - base


@pytest.mark.timeout(60)
def test_code_reads_differ_from_native_exactly_at_sites(guests, tmp_path):
    prog = guests / "selfread"
    sites_file = tmp_path / "sites.json"
    native = run_cmd([str(prog)])
    virt = run_sbe([str(prog)], extra=["--sites-out", str(sites_file)])
    assert virt.status == native.status == 0
    seen, truth = probe_bytes(virt.stdout), probe_bytes(native.stdout)
    start = symbol_offset(prog, "probe_start")
    sites = [r for r in json.loads(sites_file.read_text())["sites"]
             if r["module"] == str(prog) and start <= r["offset"] < start + len(truth)]
    assert {r["kind"] for r in sites} == {"syscall", "cpuid", "branch"}
    undone = list(seen)
    for r in sites:
        i = r["offset"] - start
        assert seen[i] == 0xCC
        undone[i] = bytes.fromhex(r["bytes"])[0]
    assert undone == truth
    # Everything but the probe's bytes is as native.
    strip = lambda out: [l for l in out.splitlines() if not l.startswith(b"probe ")]
    assert strip(virt.stdout) == strip(native.stdout)
