"""Stub templates for patch mode: the code a site's 5-byte jump lands on.

Each template is literal bytes with named fields (rel32 displacements) and the
offset of its trap, kept in sbe.patcher.templates; tools/gen_templates.py holds their
assembly text and generates that module with keystone, so no assembler runs (or
needs installing) at run time. Per-site values are filled in with struct.pack. A stub is

    [displaced instructions before the site, relocated]
    [the kind's body]          <- may hold one `int3`: "emulate the site here"
    [displaced instructions after the site, relocated]
    jmp rel32 -> window end

Every body first moves rsp below the red zone (`lea` leaves flags alone), saves
flags with pushfq before any flag-changing instruction, and restores both before
the continuation, so every register and flag the site does not architecturally
change is as it was. A body's `int3` is reached with the guest's registers exactly as
at the site; the monitor emulates the site there and resumes at the byte after the
`int3` (`resume`), or at the branch target for branch bodies.
"""
from __future__ import annotations

import struct
from collections import namedtuple

from sbe.patcher import templates

RED_ZONE = 128
BRANCH_TABLE_SLOTS = 1 << 16          # direct-mapped by the target's low 16 bits: 512 KiB
CPUID_ENTRY = 32                       # leaf, subleaf, flags, eax, ebx, ecx, edx, pad (u32 each)
CPUID_ANY_SUBLEAF, CPUID_END = 1, 2
BRANCH_BIAS = RED_ZONE + 8 + 8 + 8 + 8   # red zone, target slot, three scratch pushes


# A template's bytes, its fields (name -> offset of its rel32) and the offset of its
# int3, if any.
Body = namedtuple("Body", "code fields trap", defaults=(None,))


_SYSCALL = Body(*templates.SYSCALL)
_CPUID = Body(*templates.CPUID)
_BRANCH_HEADS = {scratch: Body(*t) for scratch, t in templates.BRANCH_HEADS.items()}
_BRANCH_TAILS = {key: Body(*t) for key, t in templates.BRANCH_TAILS.items()}
_BRANCH_GUARDS = {scratch: Body(*t) for scratch, t in templates.BRANCH_GUARDS.items()}
_BRANCH_SLOTS = {scratch: Body(*t) for scratch, t in templates.BRANCH_SLOTS.items()}
# What a slot call's window ends in (scanner.window.slot_call).
SLOT_CALL_CODE = bytes.fromhex("ff5424f8")      # call qword ptr [rsp - 8]


def syscall_body() -> Body:
    """Plain syscalls go through the patch gadget (`syscall; jmp [rsp]`): the stub
    pushes where to go on and jumps there, so they never leave the guest. The ones
    that must not run on a lowered stack or return through it
    (sbe.meta.syscalls.TRAPS_IN_STUB: clone/fork/vfork/clone3, whose child resumes
    on another stack or shares this one) trap to the monitor instead. rt_sigreturn,
    which reads its frame at rsp, goes through the gadget too: the monitor sees it
    there (seccomp) and raises rsp to the frame (syscall_hooks.rt_sigreturn), one
    stop per signal where a trap in the stub took two.
    rcx is left as the site's own syscall would leave it (the address after the site).
    The trap is two int3s and the monitor resumes after both: when a signal restarts
    the syscall, the kernel rewinds rip by the length of a syscall instruction (2),
    which lands on the first int3 and traps again, as a restart on the site would."""
    return _SYSCALL


def cpuid_body() -> Body:
    """cpuid answered from the virtual CPU table in the side cache (the same model the
    monitor's emulation uses); a leaf the table lacks traps to the monitor."""
    return _CPUID


def branch_parts(is_call: bool, scratch: str) -> tuple[Body, Body]:
    """An indirect jmp/call whose target is checked in the guest against the branch
    table (targets the monitor has validated: decoded instruction starts). The body
    is split around the instruction that loads the target into `scratch`, which is the
    site's own operand re-encoded (patcher.relocate.load_operand) with rsp biased by
    BRANCH_BIAS. The check touches no flags (so no pushfq/popfq, the costliest part of
    a stub run on every dispatch of a switch): the slot index is a zero-extending
    movzx, the difference is `not` + `lea`, and `jrcxz` tests it. A hit writes the
    target below the red zone (a call's return address, the original one, where the
    call would have pushed it), restores rsp with `lea` and leaves by `jmp` through
    that slot: an indirect jmp of the stub's own, which the branch predictor learns
    per site as it learned the guest's. (`ret imm16` did it in one instruction, but
    a `ret` no `call` matched misses the return-stack predictor every time: 4.5 s
    instead of 5.1 s for the branchy bench guest once it left.) A signal between the
    `lea` and the `jmp` is harmless: walk_out steps a thread out of a stub before a
    frame is built. A miss restores everything and traps. `scratch` is r10 or r11,
    the two the templates are generated for."""
    return _BRANCH_HEADS[scratch], _BRANCH_TAILS[is_call, scratch]


def branch_guard(scratch: str) -> tuple[Body, Body]:
    """The head and check of a guarded branch site (scanner.window.Window.guard): the
    same check as branch_parts', whose hit restores everything and leaves for the
    site itself, which then branches natively."""
    return _BRANCH_HEADS[scratch], _BRANCH_GUARDS[scratch]


def branch_slot(scratch: str) -> tuple[Body, Body]:
    """The head and check of a slot call (scanner.window.slot_call): the same check
    as branch_parts', whose hit leaves the target at [rsp - 8] (rsp as at the site),
    restores everything, and goes on to the window's SLOT_CALL."""
    return _BRANCH_HEADS[scratch], _BRANCH_SLOTS[scratch]


def rel32(source_end: int, target: int) -> bytes:
    disp = target - source_end
    if not -(1 << 31) <= disp < (1 << 31):
        raise ValueError(f"rel32 out of reach: {source_end:#x} -> {target:#x}")
    return struct.pack("<i", disp)


def jmp5(source: int, target: int) -> bytes:
    return b"\xe9" + rel32(source + 5, target)


def jmp2(source: int, target: int) -> bytes:
    """`jmp rel8`: a padding window's jump to its island."""
    disp = target - (source + 2)
    if not -128 <= disp < 128:
        raise ValueError(f"rel8 out of reach: {source + 2:#x} -> {target:#x}")
    return b"\xeb" + struct.pack("<b", disp)


def fill(body: Body, at: int, values: dict) -> bytes:
    """The body placed at address `at`, its fields pointing at `values[name]`."""
    code = bytearray(body.code)
    for name, offset in body.fields.items():
        code[offset:offset + 4] = rel32(at + offset + 4, values[name])
    return bytes(code)
