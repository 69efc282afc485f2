"""A guest of one task shares sbe's CPU (monitor/pinning.py); the guest still sees
the affinity it has natively, and a second task gives every task its CPUs back."""
from __future__ import annotations

import os

import pytest

from conftest import real_python, run_cmd, run_sbe

MODES = ["emulate", "patch"]
pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="this machine has one CPU to use")

# The affinity as sched_getaffinity shows it, then as the kernel keeps it for every
# task once a second one (a thread) runs: /proc/self/task/*/status.
AFFINITY = """
import os, threading
print(sorted(os.sched_getaffinity(0)))
ready, done = threading.Event(), threading.Event()
t = threading.Thread(target=lambda: (ready.set(), done.wait()))
t.start(); ready.wait()
for tid in sorted(os.listdir("/proc/self/task")):
    with open(f"/proc/self/task/{tid}/status") as f:
        print([l.split()[1] for l in f if l.startswith("Cpus_allowed_list")])
done.set(); t.join()
print(sorted(os.sched_getaffinity(0)))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_the_guest_sees_its_own_affinity_and_gets_its_cpus_back(mode):
    argv = [real_python(), "-c", AFFINITY]
    native = run_cmd(argv)
    virt = run_sbe(argv, mode=mode, extra=["-vv"], timeout=100)
    assert (virt.stdout, virt.status) == (native.stdout, native.status)
    log = virt.stderr.decode()
    assert "pinned to CPU" in log and "released" in log, log[-2000:]


@pytest.mark.timeout(120)
def test_nproc_counts_the_cpus_it_has_natively():
    native = run_cmd(["nproc"])
    assert run_sbe(["nproc"], mode="patch").stdout == native.stdout


@pytest.mark.timeout(120)
def test_no_pin_leaves_the_cpus_alone():
    virt = run_sbe(["true"], mode="patch", extra=["-vv", "--no-pin"])
    assert virt.status == 0 and "pinned" not in virt.stderr.decode()
