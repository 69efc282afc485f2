"""Check what this machine gives sbe: ptrace, seccomp, PKU, CPUID and TSC faulting.

Each probe runs in a forked child: what a probe turns on (a tracer, a seccomp filter,
no-new-privs, faulting cpuid or rdtsc) cannot be turned off again and must not stay on
in the process that reports it. A probe's child reports through its exit status: 0 if
the feature worked, else the errno of the call that failed.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import signal

from sbe.meta.syscalls import SYS
from sbe.monitor.ptrace_api import PTRACE_CONT, PTRACE_SEIZE, TRACE_OPTIONS, ffi, libc
from sbe.monitor.seccomp import (BPF_RET_K, PR_SET_NO_NEW_PRIVS, SECCOMP_RET_ALLOW,
                             SECCOMP_SET_MODE_FILTER)
from sbe.monitor.table import emit, format_table

ARCH_SET_CPUID = 0x1012
PR_SET_TSC = 26
PR_TSC_SIGSEGV = 2

# Check name -> (label, what "yes" means for sbe, what "no" means for sbe).
MEANINGS = {
    "ptrace": ("ptrace", "sbe can trace and control programs",
               "sbe cannot run programs (the monitor is a ptrace tracer)"),
    "seccomp": ("seccomp", "a syscall the scanner misses still stops in the monitor",
                "sbe cannot run programs (the syscall net and policy are a seccomp filter)"),
    "pku": ("PKU", "guest reads of patched code see the original bytes (hidden patches)",
            "guest reads of patched code see the patches (hidden patches need PKU)"),
    "cpuid_faulting": ("CPUID faulting", "a cpuid the scanner misses still traps to the monitor",
                       "a cpuid the scanner misses runs natively (no escape net)"),
    "tsc_faulting": ("TSC faulting", "an rdtsc the scanner misses still traps to the monitor",
                     "an rdtsc the scanner misses runs natively (no escape net)"),
}
REQUIRED = ("ptrace", "seccomp")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")


def run(args) -> int:
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    results = {
        "ptrace": _check_ptrace(),
        "seccomp": _check("seccomp(SECCOMP_SET_MODE_FILTER)", _install_allow_all),
        "pku": _check_pku(flags),
        "cpuid_faulting": _check("arch_prctl(ARCH_SET_CPUID, 0)", _cpuid_faulting),
        "tsc_faulting": _check("prctl(PR_SET_TSC, PR_TSC_SIGSEGV)", _tsc_faulting),
    }
    facts = {
        "kernel": platform.release(),
        "cpu": cpu.get("model name", "unknown"),
        "hypervisor": "hypervisor" in flags,
        "python": platform.python_version(),
        "capstone": _capstone_version(),
    }
    can_run = all(results[name][0] for name in REQUIRED)
    if args.json:
        doc = {**facts, **{name: ok for name, (ok, _) in results.items()}, "can_run": can_run,
               "details": {name: why for name, (ok, why) in results.items() if not ok}}
        emit(json.dumps(doc, indent=2) + "\n")
    else:
        emit(_report(facts, results, can_run))
    return 0 if can_run else 1


def _report(facts: dict, results: dict, can_run: bool) -> str:
    info = [
        ["kernel", facts["kernel"]],
        ["cpu", facts["cpu"]],
        ["hypervisor", "yes" if facts["hypervisor"] else "no"],
        ["python", facts["python"]],
        ["capstone", facts["capstone"] or "not installed (sbe cannot decode code)"],
    ]
    rows = []
    for name, (ok, why) in results.items():
        label, yes, no = MEANINGS[name]
        rows.append([label, "yes" if ok else "no", yes if ok else no])
        if not ok:
            rows.append(["", "", f"({why})"])
    verdict = ("sbe can run here." if can_run
               else f"sbe cannot run here: it needs {' and '.join(REQUIRED)}.")
    return "\n\n".join([format_table(None, info),
                        format_table(["check", "works", "what it means for sbe"], rows),
                        verdict]) + "\n"


def _cpuinfo() -> dict:
    """The first processor's fields; the flags that matter here are the same on all."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _capstone_version() -> str | None:
    try:
        import capstone
    except ImportError:
        return None
    return capstone.__version__


def _check_ptrace() -> tuple[bool, str]:
    """Trace a child the way the monitor traces a guest: PTRACE_SEIZE with its options."""
    r, w = os.pipe()
    pid = _fork(lambda: len(os.read(r, 1)))   # blocks until it is killed
    os.close(r)
    try:
        if libc.ptrace(PTRACE_SEIZE, pid, ffi.NULL, ffi.cast("void *", TRACE_OPTIONS)) == -1:
            return False, f"PTRACE_SEIZE: {_describe(ffi.errno)}"
        return True, ""
    finally:
        os.close(w)
        os.kill(pid, signal.SIGKILL)
        while not _ended(os.waitpid(pid, 0)[1]):
            libc.ptrace(PTRACE_CONT, pid, ffi.NULL, ffi.NULL)   # its exit stop


def _install_allow_all() -> int:
    # No-new-privs first, so that the check does not depend on running as root.
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == -1:
        return ffi.errno
    allow = ffi.new("struct sock_filter[1]")
    allow[0].code = BPF_RET_K
    allow[0].k = SECCOMP_RET_ALLOW
    prog = ffi.new("struct sock_fprog *", {"len": 1, "filter": allow})
    mode = ffi.cast("long", SECCOMP_SET_MODE_FILTER)
    if libc.syscall(SYS.seccomp, mode, ffi.cast("long", 0), prog) == -1:
        return ffi.errno
    return 0


def _check_pku(flags: set[str]) -> tuple[bool, str]:
    """Both the CPU flag (pku) and the kernel's use of it (ospke), and then a key that
    can really be had, since a hypervisor or kernel may still refuse."""
    missing = [f for f in ("pku", "ospke") if f not in flags]
    code = _in_child(_pkey_alloc)
    why = []
    if missing:
        why.append(f"no {' or '.join(missing)} in /proc/cpuinfo flags")
    if code:
        why.append(f"pkey_alloc: {_describe(code)}")
    return not why, "; ".join(why)


def _pkey_alloc() -> int:
    if libc.syscall(SYS.pkey_alloc, ffi.cast("long", 0), ffi.cast("long", 0)) == -1:
        return ffi.errno
    return 0


def _cpuid_faulting() -> int:
    if libc.syscall(SYS.arch_prctl, ffi.cast("long", ARCH_SET_CPUID), ffi.cast("long", 0)) == -1:
        return ffi.errno
    return 0


def _tsc_faulting() -> int:
    if libc.prctl(PR_SET_TSC, PR_TSC_SIGSEGV, 0, 0, 0) == -1:
        return ffi.errno
    return 0


def _check(call: str, probe) -> tuple[bool, str]:
    code = _in_child(probe)
    if code == 0:
        return True, ""
    if code == errno.ENODEV:
        return False, f"{call}: ENODEV, not supported by this CPU or hypervisor"
    return False, f"{call}: {_describe(code)}"


def _fork(probe) -> int:
    pid = os.fork()
    if pid == 0:
        code = 255
        try:
            code = probe()
        finally:
            # Never return into the caller's code (or its exception handlers) in the child.
            os._exit(code)
    return pid


def _in_child(probe) -> int:
    """probe()'s result, run in a child: 0, an errno, or minus the signal that killed it."""
    _, status = os.waitpid(_fork(probe), 0)
    return _exit_code(status)


def _ended(status: int) -> bool:
    return os.WIFEXITED(status) or os.WIFSIGNALED(status)


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _describe(code: int) -> str:
    if code < 0:
        return f"the probe was killed by {signal.Signals(-code).name}"
    if code in errno.errorcode:
        return f"{errno.errorcode[code]} ({os.strerror(code)})"
    return f"the probe failed (exit status {code})"
