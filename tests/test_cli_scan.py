"""`sbe scan` lists what would be patched, and agrees with what a run plants."""
from __future__ import annotations

import json

import pytest

from conftest import run_cmd, run_sbe, sbe_argv


@pytest.mark.timeout(60)
def test_scan_finds_the_guests_sensitive_instructions(guests):
    result = run_cmd(sbe_argv("scan", "--format", "json", str(guests / "selfread")))
    assert result.status == 0, result.stderr
    sites = json.loads(result.stdout)["sites"]
    kinds = {s["kind"] for s in sites}
    assert {"syscall", "cpuid", "branch"} <= kinds
    table = run_cmd(sbe_argv("scan", "--kind", "cpuid", str(guests / "selfread")))
    lines = table.stdout.decode().splitlines()
    assert all("cpuid" in line for line in lines[1:-1]) and len(lines) >= 3
    assert lines[-1].startswith(f"{sum(s['kind'] == 'cpuid' for s in sites)} sites")


@pytest.mark.timeout(60)
def test_sites_a_run_planted_in_the_program_are_ones_scan_lists(guests, tmp_path):
    """The runtime only plants what it reaches; the static scan sees the whole file,
    so the run's sites in the main program are a subset, at the same offsets."""
    out = tmp_path / "sites.json"
    prog = guests / "branches"
    assert run_sbe([str(prog)], extra=["--sites-out", str(out)]).status == 0
    run_sites = {(r["offset"], r["kind"]) for r in json.loads(out.read_text())["sites"]
                 if r["module"] == str(prog)}
    static = json.loads(run_cmd(sbe_argv("scan", "--format", "json", str(prog))).stdout)["sites"]
    assert run_sites and run_sites <= {(s["offset"], s["kind"]) for s in static}
