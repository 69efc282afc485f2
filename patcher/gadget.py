"""The syscall gadget: the one place guest syscalls may be issued from without a trip
to the monitor.

The seccomp filter that backs containment outlives execve and cannot be changed, and
it allows syscalls by the address they come from; so the gadget lives at one fixed
address for the whole process tree, mapped again at that address after every exec
(forks inherit it). The address is far from where Linux places programs, libraries,
stacks and mmap regions.
"""
from __future__ import annotations

GADGET_BASE = 0x3FFE_0000_0000
GADGET_SIZE = 4096

SYSCALL = GADGET_BASE            # syscall ; int3
SYSCALL_RET = SYSCALL + 2        # the address seccomp reports for a gadget syscall
SYSCALL_TRAP = SYSCALL + 3       # rip after the int3 that ends a gadget syscall
INT80 = GADGET_BASE + 8          # int 0x80 ; int3
INT80_TRAP = INT80 + 3
# syscall ; jmp qword ptr [rsp]: patch-mode stubs push where to go on and jump here.
# Not `call` and `ret`: on the machine this was measured on, a `ret` right after a
# syscall cost 55 ns more a syscall than an indirect jmp back (a return-stack
# misprediction, by all signs); the jmp costs about what a plain syscall does.
PATCH = GADGET_BASE + 16
PATCH_RET = PATCH + 2

CODE = (bytes.fromhex("0f05cc") + b"\xcc" * 5 + bytes.fromhex("cd80cc") + b"\xcc" * 5
        + bytes.fromhex("0f05ff2424"))


def contains(address: int) -> bool:
    return GADGET_BASE <= address < GADGET_BASE + GADGET_SIZE
