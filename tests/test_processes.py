"""Threads, process trees and signals with real programs: the same output and exit
status as natively, in both modes."""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from conftest import ROOT, real_python, require, run_cmd, run_sbe, sbe_argv

MODES = ["emulate", "patch"]


@pytest.fixture
def files(tmp_path):
    lines = [f"{(i * 7919) % 200003:06d} line {i}\n" for i in range(200_000)]
    (tmp_path / "lines.txt").write_text("".join(lines))
    (tmp_path / "lines-5k.txt").write_text("".join(lines[:5000]))
    (tmp_path / "blob.bin").write_bytes(bytes((i * 31 + i // 7) & 0xFF for i in range(3 << 20)))
    tree = tmp_path / "tree"
    for d in range(3):
        (tree / f"d{d}").mkdir(parents=True)
        for f in range(4):
            (tree / f"d{d}" / f"f{f}.txt").write_text(f"dir {d} file {f}\n")
    return tmp_path


PYTHON_THREADS = """
import subprocess, threading
out = [0] * 4
def work(i):
    out[i] = sum(j * j for j in range(300 * (i + 1)))
ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
print(out)
print(subprocess.run(["echo", "from child"], capture_output=True, text=True).stdout, end="")
"""

PROGRAMS = {
    "xz-T2": ["xz", "-T2", "-c", "blob.bin"],
    "sort-parallel": ["sort", "--parallel=2", "-S", "1M", "lines.txt"],
    "python3-threads": [real_python(), "-c", PYTHON_THREADS],
    "bash-pipeline": ["bash", "-c", "(echo b; echo a; echo c) | sort | tr a-z A-Z; (exit 7); echo $?"],
    "find-exec": ["find", "tree", "-name", "*.txt", "-exec", "cat", "{}", "+"],
    "timeout": ["timeout", "1", "sleep", "5"],
}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_real_program(files, name, mode):
    argv = PROGRAMS[name]
    if mode == "emulate" and name == "sort-parallel":
        # ~1.3M traps per 20k lines in emulate mode (every comparison callback is an
        # indirect call): the 200k-line file is for patch mode.
        argv = [a.replace("lines.txt", "lines-5k.txt") for a in argv]
    require(argv[0])
    native = run_cmd(argv, cwd=files, timeout=120)
    virt = run_sbe(argv, mode=mode, cwd=files, timeout=880)
    assert virt.stdout == native.stdout
    assert virt.status == native.status, virt.stderr[-2000:]
    if name == "timeout":
        assert native.status == 124


@pytest.mark.timeout(600)
def test_threads_stress_patch_mode(guests):
    """The 4-thread guest 50 times in patch mode: no failure, no hang."""
    argv = [str(guests / "threads"), "3000"]
    native = run_cmd(argv)
    for i in range(50):
        virt = run_sbe(argv, mode="patch", timeout=60)
        assert (virt.stdout, virt.status) == (native.stdout, native.status), f"run {i}"


@pytest.mark.timeout(600)
def test_late_sites_in_a_threaded_guest_get_windows(guests, tmp_path):
    """Five threads share the address space when an extension scan finds late_work's
    syscall, cpuid and rdtsc in a page that already runs: with every thread stopped
    they get windows (jmp5), not traps. 50 runs on an empty scan cache (a warm one
    would plant them at start), each with native output."""
    prog = guests / "latecode"
    argv = [str(prog), "2000"]
    native = run_cmd(argv)
    offset = late_work_offset(prog)
    sites = tmp_path / "sites.json"
    for i in range(50):
        virt = run_sbe(argv, mode="patch", extra=["--no-cache", "--sites-out", str(sites)], timeout=60)
        assert (virt.stdout, virt.status) == (native.stdout, native.status), f"run {i}"
        rows = json.loads(sites.read_text())["sites"]
        late = {r["kind"]: r["strategy"] for r in rows
                if r["module"] == os.path.realpath(prog) and offset <= r["offset"] < offset + 64}
        assert late == {"syscall": "jmp5", "cpuid": "jmp5", "rdtsc": "jmp5"}, f"run {i}"
        assert not [r for r in rows if r["reason"] == "found after its page ran"], f"run {i}"


def late_work_offset(prog) -> int:
    """late_work's offset in the file (a local symbol; its virtual address equals
    its offset from the start of the mapping in this PIE)."""
    return symbol_offsets(prog)["late_work"]


def symbol_offsets(prog) -> dict[str, int]:
    from elftools.elf.elffile import ELFFile
    with open(prog, "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        return {s.name: s["st_value"] for s in symtab.iter_symbols()}


@pytest.mark.timeout(120)
def test_short_sites_between_landing_points_jump_through_padding(guests, tmp_path):
    """padding's loop heads (rdtsc, syscall, call *%rax) are 2-byte sites whose
    neighbours are landing points: patch mode plants each as `jmp rel8` to the
    alignment padding before it (its island), then on to the stub, on a cold scan and
    from a warm cache's kept plans; output as native, where a signal handler never sees
    a rip inside that padding. The loop whose padding is jumped into on purpose works
    as natively too (a landing on an island demotes its site)."""
    prog = guests / "padding"
    native = run_cmd([str(prog)])
    symbols = symbol_offsets(prog)
    sites = tmp_path / "sites.json"
    for run in ("cold", "warm"):
        virt = run_sbe([str(prog)], mode="patch", timeout=60,
                       extra=["--cache-dir", str(tmp_path / "cache"), "--sites-out", str(sites)])
        assert (virt.stdout, virt.status) == (native.stdout, native.status), run
        rows = {r["offset"]: r for r in json.loads(sites.read_text())["sites"]
                if r["module"] == os.path.realpath(prog)}
        for loop in ("rdtsc", "syscall", "call"):
            head = rows[symbols[f"pad_{loop}_head"]]
            assert head["strategy"] == "jmp5", (run, loop, head["reason"])
            assert head["island"] - head["address"] == symbols[f"pad_{loop}_padding"] - symbols[f"pad_{loop}_head"]


@pytest.mark.timeout(120)
def test_calls_through_memory_run_as_slot_calls(guests, tmp_path):
    """slotcall's calls through [reg + disp8], [reg + disp32], [rip + disp32] and
    [rsp] each end their window in `call [rsp - 8]` (tactic "slot"), cold and warm:
    output as native, in 4 threads at once, where each callee sees its own call
    site's return address and a SIGALRM handler never sees a rip off an instruction
    boundary (a thread caught on a slot call is shown at its site)."""
    prog = guests / "slotcall"
    native = run_cmd([str(prog), "threads"])
    symbols = symbol_offsets(prog)
    sites = tmp_path / "sites.json"
    for run in ("cold", "warm"):
        virt = run_sbe([str(prog), "threads"], mode="patch", timeout=60,
                       extra=["--cache-dir", str(tmp_path / "cache"), "--sites-out", str(sites)])
        assert (virt.stdout, virt.status) == (native.stdout, native.status), run
        rows = {r["offset"]: r for r in json.loads(sites.read_text())["sites"]
                if r["module"] == os.path.realpath(prog)}
        for loop in ("disp8", "disp32", "rip", "rsp"):
            call = rows[symbols[f"slot_{loop}_b3"]]
            assert (call["strategy"], call["tactic"]) == ("jmp5", "slot"), (run, loop, call["reason"])
            assert call["window_end"] == call["address"] + call["size"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", MODES)
def test_sigterm_to_sbe_reaches_the_guest(mode):
    """SIGTERM sent to sbe goes to the guest, as to a shell's child: the guest's own
    trap runs and its exit status is sbe's."""
    script = 'trap "echo got TERM; exit 5" TERM; echo ready; while :; do sleep 0.05; done'
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Unbuffered, so readline() reads nothing ahead that communicate() would not see.
    proc = subprocess.Popen(sbe_argv("run", "--mode", mode, "--", "bash", "-c", script),
                            stdout=subprocess.PIPE, env=env, start_new_session=True, bufsize=0)
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rest == b"got TERM\n"
    assert proc.returncode == 5


@pytest.mark.timeout(900)
def test_many_short_processes_with_few_open_files():
    """1,500 subshells under one sbe, with 64 open files allowed: what a process held
    in the monitor (its memory file, its address space) goes when it does, or a
    build or a configure script would run sbe out of file descriptors."""
    script = 'i=0; while [ $i -lt 1500 ]; do (exit 3) || i=$((i+1)); done; echo "$i children"'
    limited = ["/bin/sh", "-c", 'ulimit -n 64 && exec "$@"', "sh"]
    native = run_cmd([*limited, "/bin/sh", "-c", script])
    virt = run_cmd([*limited, *sbe_argv("run", "--", "/bin/sh", "-c", script)], timeout=850)
    assert native.stdout == b"1500 children\n"
    assert (virt.stdout, virt.status) == (native.stdout, native.status), virt.stderr[-2000:]


def _dispatch_sites(sites, prog):
    """The jumptable guest's table jumps (the branch sites of its interpreter, which
    is not position-independent: symbols are addresses), from a sites file."""
    symbols = symbol_offsets(prog)
    return [r for r in json.loads(sites.read_text())["sites"]
            if r["module"] == os.path.realpath(prog) and symbols["interp"] <= r["address"] < symbols["op_bad"]]


@pytest.mark.timeout(120)
def test_proved_jump_tables_run_unchecked_until_the_table_changes(guests, tmp_path):
    """jumptable's dispatches (a byte index into a 256-entry table in .rodata, both
    shapes) are proved: each runs unchecked from a stub (tactic "table"), cold and from
    a warm cache, which proves them again. When the guest makes the table writable and
    rewrites an entry, each dispatch is demoted to a trap and the program computes what
    the new table says, as natively. Emulate mode agrees."""
    prog = guests / "jumptable"
    sites = tmp_path / "sites.json"
    cache = ["--cache-dir", str(tmp_path / "cache"), "--sites-out", str(sites)]
    native = run_cmd([str(prog), "200", "keep"])
    for run in ("cold", "warm"):
        virt = run_sbe([str(prog), "200", "keep"], mode="patch", timeout=60, extra=cache)
        assert (virt.stdout, virt.status) == (native.stdout, native.status), run
        dispatch = _dispatch_sites(sites, prog)
        assert len(dispatch) == 5, dispatch
        assert all((r["strategy"], r["tactic"]) == ("jmp5", "table") for r in dispatch), (run, dispatch)
    native = run_cmd([str(prog), "200"])
    virt = run_sbe([str(prog), "200"], mode="patch", timeout=60, extra=cache)
    assert (virt.stdout, virt.status) == (native.stdout, native.status)
    assert all((r["strategy"], r["reason"]) == ("int3", "jump table may change")
               for r in _dispatch_sites(sites, prog))
    native = run_cmd([str(prog), "2"])
    emulated = run_sbe([str(prog), "2"], mode="emulate", timeout=60)
    assert (emulated.stdout, emulated.status) == (native.stdout, native.status)
