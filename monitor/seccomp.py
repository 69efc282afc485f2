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
BPF_JGE_K = 0x35
BPF_RET_K = 0x06
# At most this many numbers are compared one by one; more are halved with a jge.
_LEAF = 3

Insn = tuple[int, int, int, int]


def program() -> list[Insn]:
    """The BPF program as (code, jt, jf, k) tuples; seccomp_data is
    {int nr; u32 arch; u64 instruction_pointer; u64 args[6]}.

    The numbers the monitor must see are found by a binary search, not a chain of
    compares: the filter runs on every syscall a stub makes, and a getppid from the
    gadget went through all 23 compares (about 10 ns of the stub's 60).
    """
    emulate_ret, patch_ret = gadget.SYSCALL_RET, gadget.PATCH_RET
    assert emulate_ret >> 32 == patch_ret >> 32
    # (code, jt label, jf label, k) with labels resolved at the end (a string in the
    # code position marks a label); None falls through.
    code: list[tuple[int | str, str | None, str | None, int]] = [
        (BPF_LD_W_ABS, None, None, 4),
        (BPF_JEQ_K, None, "trace", AUDIT_ARCH_X86_64),
        (BPF_LD_W_ABS, None, None, 8),
        (BPF_JEQ_K, "ip.hi", None, emulate_ret & 0xFFFFFFFF),
        (BPF_JEQ_K, None, "trace", patch_ret & 0xFFFFFFFF),
        ("ip.hi", None, None, 0),
        (BPF_LD_W_ABS, None, None, 12),
        (BPF_JEQ_K, None, "trace", emulate_ret >> 32),
        (BPF_LD_W_ABS, None, None, 0),
    ]
    code += _search(sorted(MUST_SEE), "n")
    code += [("allow", None, None, 0), (BPF_RET_K, None, None, SECCOMP_RET_ALLOW),
             ("trace", None, None, 0), (BPF_RET_K, None, None, SECCOMP_RET_TRACE)]
    return _assemble(code)


def _search(numbers: list[int], name: str) -> list:
    """Code that jumps to "trace" if the accumulator is one of the sorted `numbers`
    and to "allow" if not."""
    if len(numbers) <= _LEAF:
        return [(BPF_JEQ_K, "trace", None if nr != numbers[-1] else "allow", nr) for nr in numbers]
    mid = len(numbers) // 2
    upper = name + "1"
    return ([(BPF_JGE_K, upper, None, numbers[mid])] + _search(numbers[:mid], name + "0")
            + [(upper, None, None, 0)] + _search(numbers[mid:], upper))


def _assemble(code: list) -> list[Insn]:
    """Resolve labels (a string in the code position marks one) to jump offsets, which
    count from the next instruction."""
    where, pc = {}, 0
    for op, *_ in code:
        if isinstance(op, str):
            where[op] = pc
        else:
            pc += 1
    out: list[Insn] = []
    for op, jt, jf, k in code:
        if isinstance(op, str):
            continue
        here = len(out) + 1
        off = [where[t] - here if t else 0 for t in (jt, jf)]
        assert all(0 <= o < 256 for o in off), "a BPF jump reaches 255 instructions at most"
        out.append((op, off[0], off[1], k))
    return out


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

