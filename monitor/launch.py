"""Starting a guest: find the program the way a shell would, refuse what sbe cannot
run with the shell's exit status, and start it traced, with the seccomp net in place
before its first instruction.
"""
from __future__ import annotations

import os
import stat

from sbe.monitor import ptrace_api as pt
from sbe.monitor import seccomp

ELF_MAGIC = b"\x7fELF"
EM_X86_64 = 62


class LaunchError(Exception):
    """A program sbe cannot start; carries the exit status a shell would give."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def resolve(name: str) -> str:
    """The path execvp would run, or a LaunchError worded like a shell's."""
    if "/" in name:
        path = name
        if not os.path.exists(path):
            raise LaunchError(f"{name}: No such file or directory", 127)
    else:
        for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
            candidate = os.path.join(directory or ".", name)
            if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                path = candidate
                break
        else:
            raise LaunchError(f"{name}: command not found", 127)
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise LaunchError(f"{name}: Is a directory", 126)
    if not os.access(path, os.X_OK):
        raise LaunchError(f"{name}: Permission denied", 126)
    check_image(path, name)
    return path


def check_image(path: str, name: str) -> None:
    """Refuse files the kernel would not run as an x86-64 program (or would, but sbe
    cannot virtualize). `#!` scripts pass: their interpreter is checked at exec."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError as e:
        raise LaunchError(f"{name}: {e.strerror}", 126) from None
    if head.startswith(b"#!"):
        return
    if not head.startswith(ELF_MAGIC):
        raise LaunchError(f"{name}: cannot execute binary file: Exec format error", 126)
    if len(head) < 20 or head[4] != 2:
        raise LaunchError(f"{name}: is a 32-bit ELF; sbe runs x86-64 programs only", 126)
    machine = int.from_bytes(head[18:20], "little")
    if machine != EM_X86_64:
        raise LaunchError(f"{name}: is an ELF for machine {machine}, not x86-64", 126)


def spawn(path: str, argv: list[str]) -> int:
    """Fork the guest-to-be and seize it before it runs anything of its own: the child
    waits on a pipe until it is traced with every option set (seccomp's TRACE verdict
    needs PTRACE_O_TRACESECCOMP before the filter is used), then installs the filter
    and execs. Seized, not TRACEME'd: any of its tasks can be stopped at will, and its
    group-stops are reported as such."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: keep to async-signal-safe-ish calls, and never return
        try:
            os.close(w)
            if os.read(r, 1) != b"g":
                os._exit(127)     # the monitor could not trace it, and said so
            os.close(r)
            seccomp.install()
            os.execv(path, argv)
        except BaseException as e:  # noqa: BLE001 - report and leave, whatever it was
            os.write(2, f"sbe: {argv[0]}: {e}\n".encode())
        os._exit(127)
    os.close(r)
    try:
        pt.seize(pid)
    except pt.PtraceError as e:
        os.close(w)
        os.waitpid(pid, 0)
        raise LaunchError(f"{argv[0]}: could not start under ptrace: {e.strerror}", 126) from None
    os.write(w, b"g")
    os.close(w)
    return pid
