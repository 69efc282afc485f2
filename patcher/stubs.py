"""Stub templates for patch mode: the code a site's 5-byte jump lands on.

Each template is assembled by keystone once per process (it costs 50-90 us a call)
into a byte string with named fields (rel32 displacements located by marker values),
and per-site values are filled in with struct.pack. A stub is

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
from dataclasses import dataclass, field
from functools import lru_cache

from keystone import KS_ARCH_X86, KS_MODE_64, Ks

RED_ZONE = 128
BRANCH_TABLE_SLOTS = 1 << 16          # direct-mapped by the target's low 16 bits: 512 KiB
CPUID_ENTRY = 32                       # leaf, subleaf, flags, eax, ebx, ecx, edx, pad (u32 each)
CPUID_ANY_SUBLEAF, CPUID_END = 1, 2
TRAP_SYSCALLS = (56, 57, 58, 435, 15)  # clone, fork, vfork, clone3, rt_sigreturn: see syscall body

# Marker displacements keystone encodes verbatim; each names a rel32 field.
_MARKERS = {
    0x11111111: "gadget_slot",    # the side cache's slot holding the patch gadget address
    0x22222222: "site_end",       # the original address after the site
    0x33333333: "cpuid_table",    # the side cache's cpuid table
    0x44444444: "branch_table",   # the side cache's slot holding the branch table address
}


@dataclass(frozen=True)
class Body:
    code: bytes
    fields: dict = field(default_factory=dict)   # name -> offset of its rel32
    trap: int | None = None                      # offset of the int3, if any


def _assemble(text: str) -> Body:
    encoding, _ = Ks(KS_ARCH_X86, KS_MODE_64).asm(text, 0)
    code = bytes(encoding)
    fields = {}
    for marker, name in _MARKERS.items():
        packed = struct.pack("<i", marker)
        # keystone encodes [rip + m] with disp = m - insn_end: look for both forms
        at = code.find(packed)
        if at < 0:
            for off in range(len(code) - 3):
                disp = struct.unpack_from("<i", code, off)[0]
                if disp + off + 4 == marker:
                    at = off
                    break
        if at >= 0:
            fields[name] = at
    trap = code.find(b"\xcc")
    return Body(code, fields, trap if trap >= 0 else None)


@lru_cache(maxsize=None)
def syscall_body() -> Body:
    """Plain syscalls go through the patch gadget (`syscall; ret`) with a call, so they
    never leave the guest. The ones that must not run on a lowered stack or return
    through it (clone/fork/vfork/clone3: the child resumes on another stack or shares
    this one; rt_sigreturn reads its frame at rsp) trap to the monitor instead.
    rcx is left as the site's own syscall would leave it (the address after the site).
    The trap is two int3s and the monitor resumes after both: when a signal restarts
    the syscall, the kernel rewinds rip by the length of a syscall instruction (2),
    which lands on the first int3 and traps again, as a restart on the site would."""
    checks = "\n".join(f"cmp rax, {nr}\nje trap" for nr in TRAP_SYSCALLS)
    return _assemble(f"""
        lea rsp, [rsp - {RED_ZONE}]
        pushfq
        {checks}
        popfq
        call qword ptr [rip + 0x11111111]
        lea rsp, [rsp + {RED_ZONE}]
        jmp done
    trap:
        popfq
        lea rsp, [rsp + {RED_ZONE}]
        int3
        int3
    done:
        lea rcx, [rip + 0x22222222]
    """)


@lru_cache(maxsize=None)
def cpuid_body() -> Body:
    """cpuid answered from the virtual CPU table in the side cache (the same model the
    monitor's emulation uses); a leaf the table lacks traps to the monitor."""
    e = CPUID_ENTRY
    return _assemble(f"""
        lea rsp, [rsp - {RED_ZONE}]
        pushfq
        push rsi
        lea rsi, [rip + 0x33333333]
    next:
        test byte ptr [rsi + 8], {CPUID_END}
        jnz miss
        cmp eax, dword ptr [rsi]
        jne skip
        test byte ptr [rsi + 8], {CPUID_ANY_SUBLEAF}
        jnz hit
        cmp ecx, dword ptr [rsi + 4]
        je hit
    skip:
        add rsi, {e}
        jmp next
    miss:
        pop rsi
        popfq
        lea rsp, [rsp + {RED_ZONE}]
        int3
        jmp done
    hit:
        mov eax, dword ptr [rsi + 12]
        mov ebx, dword ptr [rsi + 16]
        mov ecx, dword ptr [rsi + 20]
        mov edx, dword ptr [rsi + 24]
        pop rsi
        popfq
        lea rsp, [rsp + {RED_ZONE}]
    done:
    """)


BRANCH_BIAS = RED_ZONE + 8 + 8 + 8 + 8   # red zone, target slot, three scratch pushes


@lru_cache(maxsize=None)
def branch_parts(is_call: bool, scratch: str) -> tuple[Body, Body]:
    """An indirect jmp/call whose target is checked in the guest against the branch
    table (targets the monitor has validated: decoded instruction starts). The body
    is split around the instruction that loads the target into `scratch`, which is the
    site's own operand re-encoded (patcher.relocate.load_operand) with rsp biased by
    BRANCH_BIAS. The check touches no flags (so no pushfq/popfq, the costliest part of
    a stub run on every dispatch of a switch): the slot index is a zero-extending
    movzx, the difference is `not` + `lea`, and `jrcxz` tests it. A hit leaves with
    `ret imm16`, which pops the target and restores rsp in one instruction (a call's
    return address, the original one, is written where the call would have pushed
    it); a miss restores everything and traps."""
    other = "r10" if scratch == "r11" else "r11"
    head = _assemble(f"""
        lea rsp, [rsp - {RED_ZONE}]
        lea rsp, [rsp - 8]
        push {scratch}
        push {other}
        push rcx
    """)
    push_call = f"""
        lea {other}, [rip + 0x22222222]
        mov qword ptr [rsp + {BRANCH_BIAS - 8}], {other}
    """ if is_call else ""
    tail = _assemble(f"""
        movzx {other}d, {scratch}w
        mov rcx, qword ptr [rip + 0x44444444]
        mov rcx, qword ptr [rcx + {other} * 8]
        not rcx
        lea rcx, [rcx + {scratch} + 1]
        jrcxz hit
        pop rcx
        pop {other}
        pop {scratch}
        lea rsp, [rsp + {RED_ZONE + 8}]
        int3
    hit:
        mov qword ptr [rsp + 24], {scratch}
        {push_call}
        pop rcx
        pop {other}
        pop {scratch}
        ret {RED_ZONE - 8 if is_call else RED_ZONE}
    """)
    return head, tail


def rel32(source_end: int, target: int) -> bytes:
    disp = target - source_end
    if not -(1 << 31) <= disp < (1 << 31):
        raise ValueError(f"rel32 out of reach: {source_end:#x} -> {target:#x}")
    return struct.pack("<i", disp)


def jmp5(source: int, target: int) -> bytes:
    return b"\xe9" + rel32(source + 5, target)


def fill(body: Body, at: int, values: dict) -> bytes:
    """The body placed at address `at`, its fields pointing at `values[name]`."""
    code = bytearray(body.code)
    for name, offset in body.fields.items():
        code[offset:offset + 4] = rel32(at + offset + 4, values[name])
    return bytes(code)
