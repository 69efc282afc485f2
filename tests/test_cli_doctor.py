"""`sbe doctor`: its answers against independent probes of this machine.

What the machine supports is not assumed: each answer is compared with /proc/cpuinfo or
with the same kernel call made here through ctypes, in a separate process.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from sbe.monitor import cmd_doctor

ROOT = Path(__file__).resolve().parent.parent

CHECKS = ("ptrace", "seccomp", "pku", "cpuid_faulting", "tsc_faulting")
LABELS = {"ptrace": "ptrace", "seccomp": "seccomp", "pku": "PKU",
          "cpuid_faulting": "CPUID faulting", "tsc_faulting": "TSC faulting"}

# Exits 0 when the call succeeds; the call is made in this throwaway process only, which
# leaves at once: with rdtsc or cpuid faulting on, the interpreter's own shutdown may fault.
PROBE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
os._exit(0 if libc.{function}(*[ctypes.c_long(a) for a in {args!r}]) != -1 else 1)
"""


def sbe(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sbe", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def probe(function: str, *args: int) -> bool:
    code = PROBE.format(function=function, args=args)
    return subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    return set()


def doctor_json() -> tuple[dict, int]:
    result = sbe("doctor", "--json")
    assert result.stderr == ""
    return json.loads(result.stdout), result.returncode


def test_json_answers():
    doc, status = doctor_json()
    for name in (*CHECKS, "hypervisor", "can_run"):
        assert isinstance(doc[name], bool), name
    assert doc["ptrace"] is True
    assert doc["can_run"] == (doc["ptrace"] and doc["seccomp"])
    assert status == (0 if doc["can_run"] else 1)
    assert doc["kernel"] == os.uname().release
    assert doc["python"] == ".".join(map(str, sys.version_info[:3]))
    assert doc["hypervisor"] == ("hypervisor" in cpu_flags())
    assert set(doc["details"]) == {name for name in CHECKS if not doc[name]}


def test_pku_matches_cpuinfo():
    doc, _ = doctor_json()
    assert doc["pku"] == ({"pku", "ospke"} <= cpu_flags())


def test_faulting_answers_match_independent_probes():
    doc, _ = doctor_json()
    # arch_prctl(ARCH_SET_CPUID, 0) and prctl(PR_SET_TSC, PR_TSC_SIGSEGV)
    assert doc["cpuid_faulting"] == probe("syscall", 158, 0x1012, 0)
    assert doc["tsc_faulting"] == probe("prctl", 26, 2, 0, 0, 0)
    if not doc["cpuid_faulting"]:
        assert "ARCH_SET_CPUID" in doc["details"]["cpuid_faulting"]


def test_text_report_agrees_with_json():
    doc, _ = doctor_json()
    result = sbe("doctor")
    assert result.returncode == (0 if doc["can_run"] else 1)
    lines = result.stdout.splitlines()
    for name in CHECKS:
        line = next(line for line in lines if line.startswith(LABELS[name] + " "))
        assert line.split()[len(LABELS[name].split())] == ("yes" if doc[name] else "no")
    assert any(line.split() == ["kernel", os.uname().release] for line in lines)
    assert lines[-1] == ("sbe can run here." if doc["can_run"]
                         else "sbe cannot run here: it needs ptrace and seccomp.")


def run_in_process(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cmd_doctor.configure(parser)
    return cmd_doctor.run(parser.parse_args(argv))


def test_without_ptrace_sbe_cannot_run(monkeypatch, capsys):
    monkeypatch.setattr(cmd_doctor, "_check_ptrace", lambda: (False, "PTRACE_TRACEME: EPERM"))
    assert run_in_process() == 1
    out = capsys.readouterr().out.splitlines()
    assert "(PTRACE_TRACEME: EPERM)" in [line.strip() for line in out]
    assert out[-1] == "sbe cannot run here: it needs ptrace and seccomp."
    assert run_in_process("--json") == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ptrace"] is False and doc["can_run"] is False
    assert doc["details"]["ptrace"] == "PTRACE_TRACEME: EPERM"


def test_how_a_failed_probe_is_described():
    def crash():
        os.kill(os.getpid(), signal.SIGKILL)

    def bug():
        raise RuntimeError("never seen: the child exits without unwinding")

    assert cmd_doctor._check("call()", lambda: 0) == (True, "")
    assert cmd_doctor._check("call()", lambda: errno.ENODEV) == (
        False, "call(): ENODEV, not supported by this CPU or hypervisor")
    assert cmd_doctor._check("call()", lambda: errno.EPERM) == (
        False, "call(): EPERM (Operation not permitted)")
    assert cmd_doctor._check("call()", crash) == (False, "call(): the probe was killed by SIGKILL")
    assert cmd_doctor._check("call()", bug) == (False, "call(): the probe failed (exit status 255)")


def status_fields() -> dict:
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_probes_leave_the_caller_as_it_was(capsys):
    libc = ctypes.CDLL(None, use_errno=True)
    tsc_mode = ctypes.c_int()
    before = status_fields()
    run_in_process()
    assert "ptrace" in capsys.readouterr().out
    after = status_fields()
    for field in ("Seccomp", "NoNewPrivs", "TracerPid"):
        assert after[field] == before[field], field
    assert libc.prctl(25, ctypes.byref(tsc_mode), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)) == 0                          # PR_GET_TSC
    assert tsc_mode.value == 1                                        # PR_TSC_ENABLE
    get_cpuid = [ctypes.c_long(158), ctypes.c_long(0x1011), ctypes.c_long(0)]
    assert libc.syscall(*get_cpuid) == 1                              # ARCH_GET_CPUID: cpuid runs
    try:
        leftover = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        leftover = None
    assert leftover is None, "a probe child was left behind"
