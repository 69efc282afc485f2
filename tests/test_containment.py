"""Containment is checked, not assumed: a verification run single-steps the guest and
checks every instruction that ran natively lay in a scanned page and was not a
sensitive one (sensitive ones must trap at their site)."""
from __future__ import annotations

import json

import pytest

from conftest import run_cmd, run_sbe, sbe_argv
from sbe.monitor.session import Session
from verifying import VerifyingSession


def verified(path, *args, mode="emulate"):
    session = VerifyingSession([str(path), *args], str(path), mode=mode)
    status = session.run()
    return session, status


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["emulate", "patch"])
@pytest.mark.parametrize("name,min_steps,expected", [("rawsys", 30, 0), ("exit3", 50000, 3)])
def test_every_executed_instruction_was_scanned(guests, name, min_steps, expected, mode, capfd):
    """exit3 is dynamic: this covers ld.so and libc start-up and exit. In patch mode
    the stubs' own instructions are not the guest's and are not checked, but the
    displaced guest instructions they run were scanned like any other."""
    session, status = verified(guests / name, mode=mode)
    assert status == expected
    assert session.stepped > min_steps     # it really single-stepped the guest
    assert session.violations == []
    assert sum(session.stats.escapes.values()) == 0
    if mode == "emulate":
        assert sum(session.stats.traps.values()) > 0
    else:
        assert session.stats.strategies["jmp5"] > 0


@pytest.mark.timeout(60)
def test_verifier_catches_a_hidden_syscall(guests, capfd):
    """The escape guest reaches a `syscall` hidden inside another instruction's
    immediate; the verifier must see it run natively (so it can fail)."""
    session, status = verified(guests / "escape")
    assert status == 0
    # The hidden `syscall` at movabs+2 and the `ret` after it ran undecoded.
    assert [v.split(":")[0] for v in session.violations] == ["0x401002", "0x401004"]


@pytest.mark.timeout(60)
def test_escape_is_caught_by_the_net_and_reported(guests, tmp_path):
    stats = tmp_path / "stats.json"
    argv = [str(guests / "escape")]
    native = run_cmd(argv)
    virt = run_sbe(argv, extra=["--stats-json", str(stats)])
    assert (virt.stdout, virt.status) == (native.stdout, native.status)
    report = json.loads(stats.read_text())
    assert report["escapes"] == {"write": 1}
    (module, offset, name), = report["escape_sites"]
    assert module.endswith("/escape") and name == "write"
    assert offset == 0x1002        # the movabs at 0x401000, +2: inside its immediate


@pytest.mark.timeout(60)
def test_sample_guests_have_no_escapes(guests, tmp_path):
    stats = tmp_path / "stats.json"
    for name in ["rawsys", "branches", "libc_dynamic"]:
        run_sbe([str(guests / name)], extra=["--stats-json", str(stats)])
        assert json.loads(stats.read_text())["escapes"] == {}, name


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["emulate", "patch"])
def test_a_cached_page_gives_other_pages_their_entries(guests, tmp_path, mode):
    """pagejump's first page, cached by a run that never left it, jumps into a page
    no run has scanned, at an offset that page's own first entry does not lead to:
    the scan of that page must know it, as it would had the first page been
    scanned in this run (or the hidden `write` runs unscanned: an escape)."""
    from sbe.meta.scancache import ScanCache
    path = str(guests / "pagejump")
    assert Session([path], path, mode=mode, cache=ScanCache(str(tmp_path))).run() == 0
    session = VerifyingSession([path, "x"], path, mode=mode, cache=ScanCache(str(tmp_path)))
    assert session.run() == 0
    from test_reversibility import own_vdso
    vdso_pages = len(own_vdso()) // 4096          # cached too: the kernel's, the same in both runs
    assert session.stats.patching.pages_cached == 1 + vdso_pages
    assert session.violations == [] and sum(session.stats.escapes.values()) == 0


@pytest.mark.timeout(300)
def test_warm_runs_are_contained(guests, tmp_path, capfd):
    """A warm run of one program on a cache another program filled (so it runs
    library pages the cache holds and pages it does not, entered from cached ones)
    executes nothing a scan has not decoded."""
    from sbe.meta.scancache import ScanCache
    assert Session(["/bin/true"], "/bin/true", cache=ScanCache(str(tmp_path))).run() == 0
    session = VerifyingSession([str(guests / "exit3")], str(guests / "exit3"), cache=ScanCache(str(tmp_path)))
    assert session.run() == 3
    assert session.stats.patching.pages_cached > 10 and session.stats.patching.pages_scanned > 1
    assert session.stepped > 50000
    assert session.violations == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["emulate", "patch"])
def test_the_whole_vdso_is_scanned_before_the_guest_starts(tmp_path, mode):
    """The vDSO never faults at a fetch (it cannot be made non-executable), so code
    its functions reach in its other pages must be scanned at start too: every site
    a descent from its exported functions finds, over all its pages, is planted."""
    from sbe.scanner.elfread import function_addresses
    from sbe.scanner.region import scan_region
    from test_reversibility import own_vdso
    with open("/proc/self/maps") as f:
        start = next(int(line.split("-")[0], 16) for line in f if line.rstrip().endswith("[vdso]"))
    image = own_vdso()
    found = scan_region(image + bytes(15), start, start + len(image), function_addresses(image, start), sweep=False)
    expected = {insn.address - start for insn, _ in found.sites}
    sites = tmp_path / "sites.json"
    result = run_sbe(["/bin/true"], mode=mode, extra=("--no-cache", "--sites-out", str(sites)))
    assert result.status == 0
    planted = {r["offset"] for r in json.loads(sites.read_text())["sites"] if r["module"] == "[vdso]"}
    assert expected and expected <= planted


@pytest.mark.timeout(300)
def test_flushed_pages_on_a_warm_cache_run_natively(guests, tmp_path):
    """With side caches of a few stubs each on a warm scan cache, planting one page
    retires caches and sends pages planted just before back to unscanned. Those
    must not be made executable, and a page scanned for a work item left over from
    before the flush must be made executable or left unscanned: one that was left
    scanned but not executable killed the guest with SIGSEGV on the third run."""
    path = str(guests / "libc_dynamic")
    native = run_cmd([path])
    for _ in range(4):
        result = run_cmd(sbe_argv("run", "--cache-size", "12K", "--cache-dir", str(tmp_path), "--", path))
        assert (result.stdout, result.status) == (native.stdout, native.status)


@pytest.mark.timeout(120)
def test_a_register_call_runs_in_place_after_its_stub_checks_it(guests, tmp_path):
    """Most `call reg` sites keep their bytes: the stub checks the target and jumps
    back to the call, so its return is predicted. Nothing lands on the call but
    through its stub."""
    sites = tmp_path / "sites.json"
    argv = [str(guests / "branches")]
    native = run_cmd(argv)
    virt = run_sbe(argv, mode="patch", extra=("--no-cache", "--sites-out", str(sites)))
    assert (virt.stdout, virt.status) == (native.stdout, native.status)
    guarded = [r for r in json.loads(sites.read_text())["sites"]
               if r["strategy"] == "jmp5" and r["insn"].startswith("call r")
               and r["window_end"] == r["address"] + r["size"]
               and r["address"] - r["window_start"] >= 5]
    assert guarded


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["emulate", "patch"])
def test_a_signal_frame_sent_back_to_a_guarded_call_is_checked(guests, tmp_path, mode):
    """The handler rewrites rip to a guarded `call rax` and rax to another target:
    the call must not run on a register no stub checked, so it becomes a trap
    (emulated, its target validated) when the frame returns to it."""
    sites = tmp_path / "sites.json"
    argv = [str(guests / "sigguard")]
    native = run_cmd(argv)
    assert native.stdout == b"the call reached second\n"
    virt = run_sbe(argv, mode=mode, extra=("--no-cache", "--sites-out", str(sites)))
    assert (virt.stdout, virt.status) == (native.stdout, native.status)
    if mode == "patch":
        rows = json.loads(sites.read_text())["sites"]
        run = next(r for r in rows if r["module"].endswith("/sigguard") and r["insn"] == "call rax"
                   and r["reason"] == "a signal returned to it")
        assert run["strategy"] == "int3" and run["hits"] == 1
