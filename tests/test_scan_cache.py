"""The persistent scan cache in real runs: a warm run plants what a cold run scanned,
with the same sites and native results, and a broken or stale cache never makes a
run wrong."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import run_cmd, sbe_argv
from sbe.meta.scancache import SUFFIX, CorruptEntry, decode

MODES = ["emulate", "patch"]


def sbe_run(argv, cache, tmp_path, mode="patch", extra=()):
    stats, sites = tmp_path / "stats.json", tmp_path / "sites.json"
    result = run_cmd(sbe_argv("run", "--mode", mode, "--cache-dir", str(cache), "--stats-json", str(stats),
                              "--sites-out", str(sites), *extra, "--", *argv))
    table = sorted((os.path.basename(r["module"]), r["offset"], r["kind"], r["strategy"])
                   for r in json.loads(sites.read_text())["sites"])
    return result, json.loads(stats.read_text()), table


def entries(cache):
    return sorted(p for p in os.listdir(cache) if p.endswith(SUFFIX))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["libc_dynamic", "branches", "sigcontext"])
def test_a_warm_run_plants_what_the_cold_run_scanned(guests, tmp_path, name, mode):
    cache = tmp_path / "cache"
    native = run_cmd([str(guests / name)])
    cold, cold_stats, cold_table = sbe_run([str(guests / name)], cache, tmp_path, mode)
    warm, warm_stats, warm_table = sbe_run([str(guests / name)], cache, tmp_path, mode)
    for run in (cold, warm):
        assert (run.stdout, run.status) == (native.stdout, native.status)
    assert warm_table == cold_table
    assert cold_stats["pages_cached"] == 0 and cold_stats["pages_scanned"] > 3
    # Nothing is scanned again, the vDSO included (its header page, marked scanned
    # without a scan, comes from the cache too).
    assert warm_stats["pages_scanned"] == 0
    assert warm_stats["pages_cached"] >= cold_stats["pages_scanned"]


@pytest.mark.timeout(120)
def test_branch_stubs_know_the_targets_earlier_runs_validated(guests, tmp_path):
    """An indirect branch's first run to a target traps once to have it validated;
    a warm run's branch table already holds the targets an earlier run validated."""
    cache, argv = tmp_path / "cache", [str(guests / "branches")]
    _, cold, _ = sbe_run(argv, cache, tmp_path)
    _, warm, _ = sbe_run(argv, cache, tmp_path)
    assert warm["traps"]["branch"] < cold["traps"]["branch"] / 2


@pytest.mark.timeout(120)
def test_broken_entries_are_ignored_and_rebuilt(guests, tmp_path):
    cache = tmp_path / "cache"
    argv = [str(guests / "libc_dynamic")]
    native = run_cmd(argv)
    sbe_run(argv, cache, tmp_path)
    names = entries(cache)
    assert names
    for i, name in enumerate(names):
        path = cache / name
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2] if i % 2 else data[:-1] + bytes([data[-1] ^ 0xFF]))
    run, stats, _ = sbe_run(argv, cache, tmp_path, extra=["-v"])
    assert (run.stdout, run.status) == (native.stdout, native.status)
    assert b"Traceback" not in run.stderr and b"scan cache entry" in run.stderr
    assert stats["pages_cached"] == 0
    for name in names:      # rewritten whole by the run that found them broken
        decode((cache / name).read_bytes(), name[:-len(SUFFIX)])
    assert sbe_run(argv, cache, tmp_path)[1]["pages_cached"] > 0


@pytest.mark.timeout(120)
def test_a_rebuilt_program_is_not_served_the_old_entry(tmp_path):
    cache, source, prog = tmp_path / "cache", tmp_path / "p.c", tmp_path / "p"
    outputs = []
    for version in (1, 2):
        source.write_text('#include <stdio.h>\nint main(void) { puts("version %d"); return %d; }\n'
                          % (version, version))
        subprocess.run(["gcc", "-O1", "-o", str(prog), str(source)], check=True)
        native = run_cmd([str(prog)])
        for _ in range(2):
            run, _, _ = sbe_run([str(prog)], cache, tmp_path)
            assert (run.stdout, run.status) == (native.stdout, native.status)
        outputs.append(native.stdout)
    assert outputs == [b"version 1\n", b"version 2\n"]


@pytest.mark.timeout(60)
def test_a_cache_others_may_write_is_not_used(guests, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o777)
    os.chmod(cache, 0o777)
    argv = [str(guests / "libc_dynamic")]
    native = run_cmd(argv)
    run, stats, _ = sbe_run(argv, cache, tmp_path)
    assert (run.stdout, run.status) == (native.stdout, native.status)
    assert entries(cache) == [] and stats["pages_cached"] == 0


@pytest.mark.timeout(60)
def test_no_cache_saves_nothing(guests, tmp_path):
    cache = tmp_path / "cache"
    run, stats, _ = sbe_run([str(guests / "libc_dynamic")], cache, tmp_path, extra=["--no-cache"])
    assert run.status == 0 and not cache.exists()


@pytest.mark.timeout(180)
def test_eight_runs_at_once_on_an_empty_cache(guests, tmp_path):
    cache = tmp_path / "cache"
    argv = [str(guests / "libc_dynamic")]
    native = run_cmd(argv)
    procs = [subprocess.Popen(sbe_argv("run", "--cache-dir", str(cache), "--", *argv),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(8)]
    try:
        results = [p.communicate(timeout=150) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [(out, p.returncode) for (out, _), p in zip(results, procs)] == [(native.stdout, 0)] * 8
    names = entries(cache)
    assert names
    for name in names:
        try:
            decode((cache / name).read_bytes(), name[:-len(SUFFIX)])
        except CorruptEntry as e:
            pytest.fail(f"{name}: {e}")


def sbe_cache(cache, *args):
    result = run_cmd(sbe_argv("cache", *args, "--cache-dir", str(cache)))
    assert b"Traceback" not in result.stderr
    return result


@pytest.mark.timeout(120)
def test_the_cache_command(guests, tmp_path):
    cache = tmp_path / "cache"
    sbe_run([str(guests / "libc_dynamic")], cache, tmp_path)
    names = entries(cache)
    listed = json.loads(sbe_cache(cache, "list", "--format", "json").stdout)
    assert sorted(e["key"] + SUFFIX for e in listed["entries"]) == names
    mine = [e for e in listed["entries"] if e["module"] == str(guests / "libc_dynamic")]
    assert len(mine) == 1 and mine[0]["valid"] and mine[0]["pages"] >= 1 and mine[0]["sites"] > 0
    table = sbe_cache(cache, "list").stdout.decode()
    assert "libc_dynamic" in table and table.splitlines()[0].split()[:2] == ["module", "bytes"]
    stats = json.loads(sbe_cache(cache, "stats", "--format", "json").stdout)
    assert stats["entries"] == len(names) and stats["broken"] == 0
    assert stats["pages"] == sum(e["pages"] for e in listed["entries"])
    assert sbe_cache(cache, "verify").status == 0
    (cache / names[0]).write_bytes(b"junk")
    verify = sbe_cache(cache, "verify", "--format", "json")
    assert verify.status == 1
    assert [b["key"] + SUFFIX for b in json.loads(verify.stdout)["broken"]] == [names[0]]
    cleared = json.loads(sbe_cache(cache, "clear", "--format", "json").stdout)
    assert cleared["removed"] == len(names) and entries(cache) == []
    assert json.loads(sbe_cache(cache, "stats", "--format", "json").stdout)["entries"] == 0


@pytest.mark.timeout(60)
def test_the_cache_command_refuses_a_directory_it_cannot_use(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = sbe_cache(blocker, "list")
    assert result.status == 2 and result.stderr.count(b"\n") == 1


@pytest.mark.timeout(400)
def test_warm_runs_of_a_compiler_write_the_native_object(tmp_path):
    """gcc -O2 -c: three programs (driver, cc1, as) sharing libc and ld.so, so a
    warm run places stubs kept by earlier runs and by the other programs of its own
    tree. A stub placed wrong shows: ld.so's cpu feature probe once read the wrong
    byte through a displaced `cmp [rip + disp], imm`, and cc1 died of an internal
    compiler error on the third run."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc")
    source = tmp_path / "unit.c"
    source.write_text("#include <stdlib.h>\nstatic int cmp(const void *a, const void *b)"
                      " { return *(const int *)a - *(const int *)b; }\n"
                      "void sort(int *v, size_t n) { qsort(v, n, sizeof *v, cmp); }\n")
    native = run_cmd([gcc, "-O2", "-c", str(source), "-o", str(tmp_path / "native.o")], timeout=60)
    assert native.status == 0
    cache = tmp_path / "cache"
    for run in range(3):
        out = tmp_path / f"run{run}.o"
        result = run_cmd(sbe_argv("run", "--cache-dir", str(cache), "--", gcc, "-O2", "-c", str(source),
                                  "-o", str(out)), timeout=120)
        assert (result.status, result.stdout) == (0, native.stdout), result.stderr.decode()[-2000:]
        assert out.read_bytes() == (tmp_path / "native.o").read_bytes()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", MODES)
def test_pages_only_other_programs_ran_wait_for_their_first_fetch(guests, tmp_path, mode):
    """A cache filled by one program holds pages of libc another never runs: those
    are planted at their first fetch, not when libc is mapped, and once the second
    program has run them its warm runs plant them at once, with no fault at all."""
    cache = tmp_path / "cache"
    other, argv = [str(guests / "branches")], [str(guests / "libc_dynamic")]
    native = run_cmd(argv)
    _, filled, _ = sbe_run(other, cache, tmp_path, mode)
    first, stats, table = sbe_run(argv, cache, tmp_path, mode)
    second, warm, warm_table = sbe_run(argv, cache, tmp_path, mode)
    for run in (first, second):
        assert (run.stdout, run.status) == (native.stdout, native.status)
    assert stats["fetch_faults"] > 0 and stats["pages_scanned"] < stats["fetch_faults"]   # deferred ones
    assert warm["fetch_faults"] == 0 and warm["pages_scanned"] == 0
    assert warm_table == table
    # what the warm run plants is what it runs, not all the other program ran
    with_other = sbe_run(argv, tmp_path / "fresh", tmp_path, mode)[1]
    assert warm["pages_cached"] <= with_other["pages_scanned"] + 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("argv", [["libc_dynamic"], ["/bin/true"]])
def test_a_run_that_learns_nothing_writes_nothing(guests, tmp_path, argv):
    """Once the runs of a program have learned what it executes, its next run
    stores nothing: a warm start that rewrote libc's entry paid tens of
    milliseconds for it. (A page planned with a thread standing in it, or a
    window over a jump target a later page revealed, used to be learned again by
    every run.)"""
    cache = tmp_path / "cache"
    argv = [str(guests / argv[0]) if "/" not in argv[0] else argv[0]]
    native = run_cmd(argv)
    for _ in range(2):
        sbe_run(argv, cache, tmp_path)
    before = {name: (cache / name).read_bytes() for name in entries(cache)}
    run, stats, _ = sbe_run(argv, cache, tmp_path)
    assert (run.stdout, run.status) == (native.stdout, native.status)
    assert stats["pages_scanned"] == 0
    assert {name: (cache / name).read_bytes() for name in entries(cache)} == before


@pytest.mark.timeout(120)
def test_a_warm_run_loads_neither_capstone_nor_the_c_scan(guests, tmp_path):
    """A warm run plants what the cache kept: it decodes nothing, so it pays for
    neither capstone's Python binding (50 ms to import) nor the C scan's library.
    The branch traps it takes decode their operands from the bytes."""
    cache, argv = tmp_path / "cache", [str(guests / "branches")]
    native = run_cmd(argv)
    sbe_run(argv, cache, tmp_path)
    sbe_run(argv, cache, tmp_path)
    run = run_cmd([sys.executable, "-X", "importtime", "-m", "sbe", "run", "--cache-dir", str(cache),
                   "--", *argv])
    assert (run.stdout, run.status) == (native.stdout, native.status)
    loaded = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.decode().splitlines()
              if line.startswith("import time:")}
    assert "sbe.monitor.session" in loaded       # the import log is there
    assert not {"capstone", "sbe.scanner._region_native", "sbe.patcher.relocate"} & loaded
