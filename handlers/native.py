"""The host's own CPUID and TSC, read from inside the monitor's process.

Python cannot issue these instructions, and a C extension would add a compiler to
the build. Instead a few SysV-ABI routines, kept as machine code beside their
assembly text (a test has keystone assemble the text and compares, so no assembler
is needed at run time), are copied into an anonymous page that is written, then made
executable (never both), and called through ctypes. Each routine returns its result
in rax, or in rax:rdx as a two-word struct, so no call needs an output buffer.
"""
from __future__ import annotations

import ctypes
import functools
import mmap

# cpuid(leaf=edi, subleaf=esi) -> rax = ebx:eax, rdx = edx:ecx. rbx is callee-saved,
# and cpuid overwrites it. cpuid and rdtsc(p) zero the upper halves of the
# registers they write, so shift-and-or packs them without masking.
_CPUID = (
    ("53", "push rbx"),
    ("89f8", "mov eax, edi"),
    ("89f1", "mov ecx, esi"),
    ("0fa2", "cpuid"),
    ("48c1e320", "shl rbx, 32"),
    ("4809d8", "or rax, rbx"),
    ("48c1e220", "shl rdx, 32"),
    ("4809ca", "or rdx, rcx"),
    ("5b", "pop rbx"),
    ("c3", "ret"),
)
_RDTSC = (
    ("0f31", "rdtsc"),
    ("48c1e220", "shl rdx, 32"),
    ("4809d0", "or rax, rdx"),
    ("c3", "ret"),
)
# rdtscp -> rax = tsc, rdx = TSC_AUX.
_RDTSCP = (
    ("0f01f9", "rdtscp"),
    ("48c1e220", "shl rdx, 32"),
    ("4809d0", "or rax, rdx"),
    ("89ca", "mov edx, ecx"),
    ("c3", "ret"),
)
_ROUTINES = (_CPUID, _RDTSC, _RDTSCP)   # (machine code in hex, its assembly) a line


def _code(routine) -> bytes:
    return bytes.fromhex("".join(encoding for encoding, _ in routine))


class _Pair(ctypes.Structure):
    # Two eightbytes of INTEGER class: the ABI returns them in rax:rdx.
    _fields_ = [("low", ctypes.c_uint64), ("high", ctypes.c_uint64)]


def _executable(code: bytes) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    address = libc.mmap(None, len(code), mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if address == ctypes.c_void_p(-1).value:  # MAP_FAILED
        raise OSError(ctypes.get_errno(), "mmap of the native routines failed")
    ctypes.memmove(address, code, len(code))
    if libc.mprotect(address, len(code), mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        raise OSError(ctypes.get_errno(), "mprotect of the native routines failed")
    return address


@functools.cache
def _routines():
    # Built on first use, so importing the handlers costs nothing on a host that
    # forbids executable anonymous memory until CPUID or TSC is actually needed.
    parts = [_code(routine) for routine in _ROUTINES]
    base = _executable(b"".join(parts))
    offsets = [0, len(parts[0]), len(parts[0]) + len(parts[1])]
    cpuid = ctypes.CFUNCTYPE(_Pair, ctypes.c_uint32, ctypes.c_uint32)(base + offsets[0])
    rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(base + offsets[1])
    rdtscp = ctypes.CFUNCTYPE(_Pair)(base + offsets[2])
    return cpuid, rdtsc, rdtscp


def host_cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    pair = _routines()[0](leaf, subleaf)
    return (pair.low & 0xFFFFFFFF, pair.low >> 32, pair.high & 0xFFFFFFFF, pair.high >> 32)


def host_rdtsc() -> int:
    return _routines()[1]()


def host_rdtscp() -> tuple[int, int]:
    """(tsc, TSC_AUX); Linux puts the CPU number (and NUMA node << 12) in TSC_AUX."""
    pair = _routines()[2]()
    return pair.low, pair.high
