"""The thin ptrace binding the event loop runs on.

python-ptrace's debugger object lacks PTRACE_SEIZE/INTERRUPT, TRACESECCOMP and
EXITKILL, and its waits poll; here we call libc's ptrace through cffi (ABI mode, no
compiler needed) and keep register sets as cffi structs that are read and written in
one call each.
"""
from __future__ import annotations

import os

from cffi import FFI

ffi = FFI()
ffi.cdef(
    """
    struct user_regs_struct {
        unsigned long r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8;
        unsigned long rax, rcx, rdx, rsi, rdi, orig_rax, rip, cs, eflags, rsp, ss;
        unsigned long fs_base, gs_base, ds, es, fs, gs;
    };
    typedef struct {
        int si_signo; int si_errno; int si_code; int _pad0;
        union {
            struct { int pid; unsigned int uid; } kill;
            struct { unsigned long addr; short addr_lsb; } fault;
            struct { int pid; unsigned int uid; int status; } chld;
            int _pad[28];
        } u;
    } siginfo_t;
    struct sock_filter { unsigned short code; unsigned char jt; unsigned char jf; unsigned int k; };
    struct sock_fprog { unsigned short len; struct sock_filter *filter; };
    long ptrace(long request, int pid, void *addr, void *data);
    int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5);
    long syscall(long number, ...);
    """
)
libc = ffi.dlopen(None)

PTRACE_TRACEME = 0
PTRACE_CONT = 7
PTRACE_KILL = 8
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_ATTACH = 16
PTRACE_DETACH = 17
PTRACE_SYSCALL = 24
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_GETSIGINFO = 0x4202

PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_O_TRACEFORK = 0x2
PTRACE_O_TRACEVFORK = 0x4
PTRACE_O_TRACECLONE = 0x8
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_TRACESECCOMP = 0x80
PTRACE_O_EXITKILL = 0x100000

PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
PTRACE_EVENT_VFORK_DONE = 5
PTRACE_EVENT_EXIT = 6
PTRACE_EVENT_SECCOMP = 7

TRACE_OPTIONS = (
    PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACECLONE
    | PTRACE_O_TRACEEXEC | PTRACE_O_TRACESECCOMP | PTRACE_O_EXITKILL
)

REG_NAMES = (
    "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax rip cs eflags "
    "rsp ss fs_base gs_base ds es fs gs"
).split()

WALL = 0x40000000


class PtraceError(OSError):
    pass


def _check(result: int, what: str, pid: int) -> int:
    if result == -1:
        err = ffi.errno
        raise PtraceError(err, f"{what}({pid}): {os.strerror(err)}")
    return result


def traceme() -> None:
    _check(libc.ptrace(PTRACE_TRACEME, 0, ffi.NULL, ffi.NULL), "PTRACE_TRACEME", 0)


def setoptions(pid: int, options: int = TRACE_OPTIONS) -> None:
    _check(libc.ptrace(PTRACE_SETOPTIONS, pid, ffi.NULL, ffi.cast("void *", options)),
           "PTRACE_SETOPTIONS", pid)


def resume(pid: int, sig: int = 0, request: int = PTRACE_CONT) -> None:
    _check(libc.ptrace(request, pid, ffi.NULL, ffi.cast("void *", sig)), "PTRACE_CONT", pid)


def try_resume(pid: int, sig: int = 0, request: int = PTRACE_CONT) -> bool:
    """Resume, tolerating a task that died meanwhile (SIGKILL from elsewhere)."""
    return libc.ptrace(request, pid, ffi.NULL, ffi.cast("void *", sig)) != -1


def new_regs():
    return ffi.new("struct user_regs_struct *")


def getregs(pid: int, regs=None):
    regs = regs if regs is not None else new_regs()
    _check(libc.ptrace(PTRACE_GETREGS, pid, ffi.NULL, regs), "PTRACE_GETREGS", pid)
    return regs


def setregs(pid: int, regs) -> None:
    _check(libc.ptrace(PTRACE_SETREGS, pid, ffi.NULL, regs), "PTRACE_SETREGS", pid)


def copy_regs(regs):
    twin = new_regs()
    ffi.memmove(twin, regs, ffi.sizeof("struct user_regs_struct"))
    return twin


def getsiginfo(pid: int):
    info = ffi.new("siginfo_t *")
    _check(libc.ptrace(PTRACE_GETSIGINFO, pid, ffi.NULL, info), "PTRACE_GETSIGINFO", pid)
    return info


def geteventmsg(pid: int) -> int:
    msg = ffi.new("unsigned long *")
    _check(libc.ptrace(PTRACE_GETEVENTMSG, pid, ffi.NULL, msg), "PTRACE_GETEVENTMSG", pid)
    return msg[0]


def kill_tree(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, 9)
        except OSError:
            pass


class Regs:
    """Mapping view of a cffi register struct, the interface handlers read registers
    through (tests give them plain dicts instead)."""

    __slots__ = ("raw",)

    def __init__(self, raw) -> None:
        self.raw = raw

    def __getitem__(self, name: str) -> int:
        return getattr(self.raw, name)

    def __setitem__(self, name: str, value: int) -> None:
        setattr(self.raw, name, value & 0xFFFFFFFFFFFFFFFF)

    def get(self, name: str, default=None):
        return getattr(self.raw, name, default)
