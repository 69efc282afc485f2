"""The seccomp filter: the kernel net under the scanner, and the syscall policy.

Every syscall is traced to the monitor unless it is issued from the gadget and is not
one the monitor must see (`MUST_SEE`, derived from meta/syscalls.py's table). A
syscall instruction the scanner missed therefore still stops in the monitor (an
*escape*), and a gadget syscall the monitor must see (memory mapping, processes,
signals, the nets themselves) stops there too.
"""
from __future__ import annotations

import errno

from sbe.meta.syscalls import MUST_SEE, SYS
from sbe.monitor.ptrace_api import ffi, libc
from sbe.patcher import gadget

SECCOMP_SET_MODE_FILTER = 1
PR_SET_NO_NEW_PRIVS = 38
AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_TRACE = 0x7FF00000

BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06

def program() -> list[tuple[int, int, int, int]]:
    """The BPF program as (code, jt, jf, k) tuples; seccomp_data is
    {int nr; u32 arch; u64 instruction_pointer; u64 args[6]}."""
    emulate_ret, patch_ret = gadget.SYSCALL_RET, gadget.PATCH_RET
    assert emulate_ret >> 32 == patch_ret >> 32
    numbers = sorted(MUST_SEE)
    n = len(numbers)
    # Layout: 0 ld arch, 1 jeq, 2 ld ip.lo, 3 jeq emulate gadget, 4 jeq patch gadget,
    # 5 ld ip.hi, 6 jeq, 7 ld nr, 8..8+n-1 jeq nr, 8+n ALLOW, 9+n TRACE.
    # Jump offsets count from the next instruction.
    trace_at = 9 + n
    prog = [
        (BPF_LD_W_ABS, 0, 0, 4),
        (BPF_JEQ_K, 0, trace_at - 2, AUDIT_ARCH_X86_64),
        (BPF_LD_W_ABS, 0, 0, 8),
        (BPF_JEQ_K, 1, 0, emulate_ret & 0xFFFFFFFF),
        (BPF_JEQ_K, 0, trace_at - 5, patch_ret & 0xFFFFFFFF),
        (BPF_LD_W_ABS, 0, 0, 12),
        (BPF_JEQ_K, 0, trace_at - 7, emulate_ret >> 32),
        (BPF_LD_W_ABS, 0, 0, 0),
    ]
    for i, nr in enumerate(numbers):
        here = 8 + i
        prog.append((BPF_JEQ_K, trace_at - here - 1, 0, nr))
    prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    prog.append((BPF_RET_K, 0, 0, SECCOMP_RET_TRACE))
    return prog


def install() -> None:
    """Install the filter on the calling thread (the guest-to-be, before exec).

    With CAP_SYS_ADMIN no-new-privs is not needed, and leaving it off keeps
    set-user-ID programs working as they would natively.
    """
    insns = program()
    filt = ffi.new("struct sock_filter[]", len(insns))
    for i, (code, jt, jf, k) in enumerate(insns):
        filt[i].code, filt[i].jt, filt[i].jf, filt[i].k = code, jt, jf, k
    prog = ffi.new("struct sock_fprog *")
    prog.len = len(insns)
    prog.filter = filt
    if libc.syscall(SYS.seccomp, ffi.cast("long", SECCOMP_SET_MODE_FILTER), ffi.cast("long", 0), prog) == 0:
        return
    if ffi.errno != errno.EACCES:
        raise OSError(ffi.errno, "seccomp")
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if libc.syscall(SYS.seccomp, ffi.cast("long", SECCOMP_SET_MODE_FILTER), ffi.cast("long", 0), prog) != 0:
        raise OSError(ffi.errno, "seccomp")

