"""The live mode switch: SIGUSR1 to sbe re-plants every site in the other mode while
the guest runs; the guest's output stays that of a native run."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess

import pytest

from conftest import ROOT, run_cmd, sbe_argv


@pytest.mark.timeout(120)
@pytest.mark.parametrize("first", ["patch", "emulate"])
@pytest.mark.parametrize("name", ["phases", "threadphases"])
def test_switch_twice_while_running(guests, tmp_path, first, name):
    """threadphases: four threads run sites all the while, so each switch stops them
    all to re-plant."""
    switch_twice(guests / name, tmp_path, first, run_cmd([str(guests / name)], stdin=b"\n\n"))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("first", ["patch", "emulate"])
def test_switching_a_threaded_guest_again_and_again(guests, tmp_path, first):
    """20 runs of threadphases, each switched twice. The main thread's read runs
    in the gadget in emulate mode; a switch that caught it just after the gadget's
    int3 ran its remote syscalls in it, which took the pending SIGTRAP unseen, and
    the guest died of SIGTRAP about 1 run in 30."""
    native = run_cmd([str(guests / "threadphases")], stdin=b"\n\n")
    for _ in range(20):
        switch_twice(guests / "threadphases", tmp_path, first, native)


def switch_twice(prog, tmp_path, first, native):
    prog = str(prog)
    stats = tmp_path / "stats.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Unbuffered: communicate() reads the raw pipe, so output a buffered readline()
    # had read ahead (the lines after a phase, when they come at once) would be lost.
    # -v: sbe says on stderr when it switched (and names a signal that killed the
    # guest), which the test waits for and shows.
    proc = subprocess.Popen(sbe_argv("run", "-v", "--mode", first, "--stats-json", str(stats), "--", prog),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            start_new_session=True, bufsize=0)
    said: list[bytes] = []
    try:
        lines = [proc.stdout.readline()]
        for i in range(2):
            # The guest has printed its phase and now waits for stdin: switch, and go
            # on once sbe says it switched (two SIGUSR1 sent at once are one signal).
            proc.send_signal(signal.SIGUSR1)
            while sum(line.startswith(b"sbe: switched to") for line in said) < i + 1:
                if not select.select([proc.stderr], [], [], 60)[0]:
                    pytest.fail(f"no switch {i + 1} within 60 s; sbe said {b''.join(said)!r}")
                line = proc.stderr.readline()
                if not line:
                    pytest.fail(f"sbe and its guest were gone at switch {i + 1} (sbe's status "
                                f"{proc.wait(timeout=30)}), after {b''.join(lines)!r}; sbe said {b''.join(said)!r}")
                said.append(line)
            proc.stdin.write(b"\n")
            lines.append(proc.stdout.readline())
        rest, _ = proc.communicate(timeout=100)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert b"".join(lines) + rest == native.stdout
    assert proc.returncode == native.status == 0
    other = "emulate" if first == "patch" else "patch"
    assert json.loads(stats.read_text())["switches"] == [other, first]


@pytest.mark.timeout(120)
def test_tiny_side_caches_flush_and_replant(guests, tmp_path):
    """With caches that hold only a few stubs each, caches fill, are retired and their
    pages re-planted into new ones at their next fetch: the guest's output is still
    native, and the flushes really happened."""
    prog = str(guests / "libc_dynamic")
    native = run_cmd([prog])
    stats = tmp_path / "stats.json"
    virt = run_cmd(sbe_argv("run", "--mode", "patch", "--cache-size", "12K",
                            "--stats-json", str(stats), "--", prog))
    assert (virt.stdout, virt.status) == (native.stdout, native.status)
    report = json.loads(stats.read_text())
    assert report["cache_flushes"] >= 3
    assert report["strategies"].get("jmp5", 0) > 100
