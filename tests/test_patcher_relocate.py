"""Relocation of displaced instructions: tables of forms, and execution at two places.

Inputs are assembled by keystone at their original address, and used only after
capstone reads them back as meant: keystone silently mis-assembles `eip`-relative,
`fs:`-relative and absolute-address operands (and `loop`/`jrcxz`), so those bytes are
written by hand.

The execution tests run random straight-line code natively at one address and
relocated at another, 1 or 2 GiB away, from the same registers, flags and memory, and
compare everything after. Each example runs in a forked child, so a relocation that
crashes fails that example (and is shrunk) instead of killing the test run.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import random
import select
import signal
import struct
import time
from dataclasses import dataclass, replace

import capstone
import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from capstone import x86_const as x86
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from keystone import KS_ARCH_X86, KS_MODE_64, Ks

from sbe.patcher.relocate import NotRelocatable, ScratchInUse, load_operand, relocate, rip_relative

MASK64 = (1 << 64) - 1
MASK32 = (1 << 32) - 1

_KS = Ks(KS_ARCH_X86, KS_MODE_64)
_CS = Cs(CS_ARCH_X86, CS_MODE_64)
_CS.detail = True

GPRS = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]  # encoding order


# --- encoding, checked by capstone -----------------------------------------------------

def decode(code: bytes, address: int):
    insns = list(_CS.disasm(code, address))
    assert len(insns) == 1 and insns[0].size == len(code), \
        f"{code.hex()} is not one instruction: {[f'{i.mnemonic} {i.op_str}' for i in insns]}"
    return insns[0]


def text(code: bytes, address: int) -> str:
    insn = decode(code, address)
    return f"{insn.mnemonic} {insn.op_str}".strip()


def operand_target(insn) -> int | None:
    """The rip-relative operand's address, from capstone's operands alone."""
    for op in insn.operands:
        if op.type == x86.X86_OP_MEM and op.mem.base in (x86.X86_REG_RIP, x86.X86_REG_EIP):
            mask = MASK32 if op.mem.base == x86.X86_REG_EIP else MASK64
            return (insn.address + insn.size + op.mem.disp) & mask
    return None


def sdisp(value: int) -> str:
    """A displacement as capstone prints it after a register."""
    if value == 0:
        return ""
    sign = "-" if value < 0 else "+"
    return f" {sign} {abs(value) if abs(value) < 10 else hex(abs(value))}"


def imm(value: int) -> str:
    return f"-{-value:#x}" if value < 0 else f"{value:#x}"


def asm(source: str, address: int) -> bytes:
    """keystone's encoding of `source`, once capstone prints it back as `source`."""
    code = bytes(_KS.asm(source, address)[0])
    assert text(code, address) == source, f"keystone: {source!r} -> {code.hex()} ({text(code, address)!r})"
    return code


def encode(source: str, address: int, target: int | None = None, *, prefix: bytes = b"",
           hand: tuple[bytes, bytes] | bytes | None = None, exact: bool = True) -> bytes:
    """`source` at `address`; `{m}` in it is a rip-relative operand naming `target`.

    `prefix` (a segment or 0x67 prefix) goes in front by hand; `hand` replaces keystone:
    the whole instruction, or with `{m}` the bytes before and after its disp32. With
    `exact`, capstone must print the result as `source`; always, it must find `target`.
    """
    if "{m}" not in source:
        code = hand if hand is not None else bytes(_KS.asm(source, address)[0])
        shown = source
    else:
        mask = MASK32 if 0x67 in prefix else MASK64

        def body(disp):
            if hand is not None:
                return hand[0] + struct.pack("<i", disp) + hand[1]
            return bytes(_KS.asm(source.format(m=f"[rip{sdisp(disp)}]"), address)[0])

        size = len(prefix) + len(body(0))
        disp = ((target - address - size + (1 << 31)) & mask) - (1 << 31)
        assert -(1 << 31) <= disp < 1 << 31, f"{target:#x} is out of reach of {address:#x}"
        code = prefix + body(disp)
        segment = {0x64: "fs:", 0x65: "gs:"}.get(next((b for b in prefix if b in (0x64, 0x65)), 0), "")
        shown = source.format(m=f"{segment}[{'eip' if mask == MASK32 else 'rip'}{sdisp(disp)}]")
        assert operand_target(decode(code, address)) == target, f"{code.hex()} misses {target:#x}"
    if exact:
        assert text(code, address) == shown, f"{code.hex()} is {text(code, address)!r}, not {shown!r}"
    else:
        decode(code, address)
    return code


# --- relocate: tables ------------------------------------------------------------------

RIP_FORMS = [
    "mov rax, qword ptr {m}",
    "mov qword ptr {m}, r13",
    "mov r9d, dword ptr {m}",
    "mov dword ptr {m}, 0x12345678",
    "mov word ptr {m}, 0x1234",
    "mov byte ptr {m}, 0x12",
    "cmp byte ptr {m}, 1",
    "add qword ptr {m}, -0x80",
    "imul eax, dword ptr {m}, 0x3e8",
    "imul r9w, word ptr {m}, 0x7fff",
    "lea rax, {m}",
    "lea r15, {m}",
    "push qword ptr {m}",
    "pop qword ptr {m}",
    "jmp qword ptr {m}",
    "shl qword ptr {m}, 3",
    "bt dword ptr {m}, 5",
    "movzx eax, byte ptr {m}",
    "movsxd rax, dword ptr {m}",
    "cmovae eax, dword ptr {m}",
    "setae byte ptr {m}",
    "test qword ptr {m}, rax",
    "lock add dword ptr {m}, eax",
    "lock cmpxchg qword ptr {m}, rcx",
    "xchg qword ptr {m}, rax",
    "pshufd xmm0, xmmword ptr {m}, 0x1b",
    "movdqu xmm9, xmmword ptr {m}",
    "pinsrq xmm0, qword ptr {m}, 1",
    "cvtsi2sd xmm0, qword ptr {m}",
    "vpaddq ymm1, ymm2, ymmword ptr {m}",
    "vpermq ymm0, ymmword ptr {m}, 0x1b",
    "andn rax, rbx, qword ptr {m}",
    "fld qword ptr {m}",
    "prefetcht0 byte ptr {m}",
    "clflush byte ptr {m}",
]
# (hand encoding around the disp32, source): what keystone cannot write.
HAND_RIP_FORMS = [
    ((bytes.fromhex("62f1fe086f05"), b""), "vmovdqu64 xmm0, xmmword ptr {m}"),
    ((bytes.fromhex("62f17d087005"), b"\x1b"), "vpshufd xmm0, xmmword ptr {m}, 0x1b"),
    ((bytes.fromhex("0f0f05"), b"\xb4"), "pfmul mm0, qword ptr {m}"),
    ((bytes.fromhex("0f1f05"), b""), "nop dword ptr {m}"),
    ((bytes.fromhex("66c705"), b"\x34\x12"), "mov word ptr {m}, 0x1234"),
    ((bytes.fromhex("66ff05"), b""), "inc word ptr {m}"),  # capstone's disp_size says 2 here
    ((bytes.fromhex("ff2d"), b""), "jmp ptr {m}"),  # far: a selector and an offset
]
# (prefix, source): segment overrides, put in front of keystone's encoding by hand.
PREFIXED_RIP_FORMS = [
    (b"\x64", "mov rax, qword ptr {m}"),
    (b"\x65", "mov qword ptr {m}, rbx"),
    (b"\x65", "add dword ptr {m}, 0x12345678"),
]

# (old, new, target): far apart both ways, in the high canonical half, next door.
PLACES = [
    (0x0040_1000, 0x7FFF_F000, 0x0060_0000),
    (0x7F12_3456_7000, 0x7F11_C456_7A31, 0x7F12_0000_0010),
    (0x5555_5555_4123, 0x5555_5555_4180, 0x5555_5555_4100),
    (0x7FFF_0000_0000, 0x7FFF_7FFF_0000, 0x7FFF_4000_0000),
]


@pytest.mark.parametrize("old,new,target", PLACES)
@pytest.mark.parametrize("source", RIP_FORMS)
def test_rip_relative_operand_is_reaimed(source, old, new, target):
    code = encode(source, old, target)
    moved = relocate(code, old, new)
    assert moved == encode(source, new, target)
    assert rip_relative(code, old) == target == rip_relative(moved, new)


@pytest.mark.parametrize("old,new,target", PLACES)
@pytest.mark.parametrize("hand,source", HAND_RIP_FORMS)
def test_rip_relative_operand_is_reaimed_in_hand_encodings(hand, source, old, new, target):
    code = encode(source, old, target, hand=hand)
    moved = relocate(code, old, new)
    assert moved == encode(source, new, target, hand=hand)
    assert rip_relative(moved, new) == target


@pytest.mark.parametrize("old,new,target", PLACES)
@pytest.mark.parametrize("prefix,source", PREFIXED_RIP_FORMS)
def test_segment_override_is_kept_and_the_offset_reaimed(prefix, source, old, new, target):
    code = encode(source, old, target, prefix=prefix)
    moved = relocate(code, old, new)
    assert moved == encode(source, new, target, prefix=prefix)
    assert rip_relative(moved, new) == target  # the offset; the segment base adds to it


@pytest.mark.parametrize("source", ["mov eax, dword ptr {m}", "mov dword ptr {m}, 0x12345678",
                                    "lea rax, {m}"])
@pytest.mark.parametrize("old,new", [(0x7F12_3456_7000, 0x0040_1000), (0x0040_1000, 0x7F12_3456_7000),
                                     (0x1_2000_0000, 0x5555_0000_0000)])
def test_eip_relative_operand_wraps_at_4_gib_and_is_always_in_reach(source, old, new):
    target = 0x3456_9000  # an address the 0x67 form can name: its sum has 32 bits
    code = encode(source, old, target, prefix=b"\x67")
    moved = relocate(code, old, new)
    assert moved == encode(source, new, target, prefix=b"\x67")
    assert rip_relative(code, old) == target == rip_relative(moved, new)


@pytest.mark.parametrize("delta,fits", [(2**31 - 1, True), (-2**31, True),
                                        (2**31, False), (-2**31 - 1, False)])
def test_reach_is_exactly_a_signed_disp32(delta, fits):
    old = 0x7F00_0000_0000
    target = old + 0x1000
    code = encode("mov dword ptr {m}, 0x12345678", old, target)
    new = target - delta - len(code)  # the new disp32 would be `delta`
    if fits:
        assert rip_relative(relocate(code, old, new), new) == target
    else:
        with pytest.raises(NotRelocatable, match="reach"):
            relocate(code, old, new)


COPIED = [
    "mov rax, rbx", "push rbp", "mov rbp, rsp", "sub rsp, 0x18", "xor eax, eax", "mov eax, 0x27",
    "movabs rax, 0x123456789abcdef0", "mov rax, qword ptr [rsp + 8]",
    "lea rax, [rbx + rcx*8 + 0x10]", "mov qword ptr [rbx + 0x12345678], rax",
    "cmp byte ptr [rbp - 0x11], 0", "imul eax, dword ptr [rbx + rcx*4 + 0x100], 0x3e8",
    "jmp rax", "jmp qword ptr [rax + 8]", "ret", "ret 8", "nop word ptr cs:[rax + rax]",
    "rdtsc", "rdtscp", "cpuid", "ud2", "rep stosq qword ptr [rdi], rax", "vmovdqu ymm0, ymmword ptr [rdi]",
    "fld qword ptr [rsp]", "leave", "pushfq",
]
HAND_COPIED = [
    ("64488b042528000000", "mov rax, qword ptr fs:[0x28]"),
    ("65488b042500000000", "mov rax, qword ptr gs:[0]"),
    ("488b042578563412", "mov rax, qword ptr [0x12345678]"),
    ("48a1f0debc9a78563412", "movabs rax, qword ptr [0x123456789abcdef0]"),
    ("48a3f0debc9a78563412", "movabs qword ptr [0x123456789abcdef0], rax"),
    ("f30f1efa", "endbr64"),
    ("0f2005", "mov rbp, cr0"),  # ModRM 05 without a memory operand
    ("ff6500", "jmp qword ptr [rbp]"),
    ("41ff6500", "jmp qword ptr [r13]"),
]


@pytest.mark.parametrize("old,new", [(0x401000, 0x7F12_3456_7000), (0x7F12_3456_7000, 0x401000)])
@pytest.mark.parametrize("source", COPIED)
def test_what_does_not_depend_on_its_address_is_copied(source, old, new):
    code = asm(source, old)
    assert relocate(code, old, new) == code
    assert rip_relative(code, old) is None


@pytest.mark.parametrize("hexcode,source", HAND_COPIED)
def test_absolute_and_segment_operands_are_copied(hexcode, source):
    code = bytes.fromhex(hexcode)
    assert text(code, 0x401000) == source
    assert relocate(code, 0x401000, 0x7F12_3456_7000) == code
    assert rip_relative(code, 0x401000) is None


REFUSED = [
    ("ebfe", "relative branch"), ("e900100000", "relative branch"), ("e800100000", "pushes"),
    ("2e7410", "relative branch"), ("3e0f8400100000", "relative branch"),   # prefixed jcc
    ("e0fe", "relative branch"), ("e1fe", "relative branch"), ("e2fe", "relative branch"),
    ("e3fe", "relative branch"), ("67e3fe", "relative branch"), ("c7f800100000", "relative branch"),
    ("f2e900100000", "relative branch"), ("f2e800100000", "pushes"),
    ("ffd0", "pushes"), ("41ffd3", "pushes"), ("ff10", "pushes"), ("ff1500100000", "pushes"),
    ("ff18", "pushes"), ("ff1c24", "pushes"), ("f2ff10", "pushes"),
    ("0f05", "rcx"), ("0f34", "kernel"), ("cc", "kernel"), ("cd80", "kernel"), ("f1", "kernel"),
    ("06", "decode"), ("ce", "decode"),  # push es, into: no instructions in 64-bit mode
]


@pytest.mark.parametrize("hexcode,reason", REFUSED)
def test_what_depends_on_its_address_otherwise_is_refused(hexcode, reason):
    with pytest.raises(NotRelocatable, match=reason) as refused:
        relocate(bytes.fromhex(hexcode), 0x401000, 0x402000)
    assert isinstance(refused.value, ValueError)


@pytest.mark.parametrize("cc", range(16))
@pytest.mark.parametrize("new", [0x402000, 0x400010, 0x7FFF_0000])
def test_a_conditional_jump_keeps_its_condition_and_target(cc, new):
    """rel8 and rel32 forms alike become `jcc rel32` naming the same target, the
    rel32 noted as a guest field."""
    for code in (bytes((0x70 + cc, 0x10)), bytes((0x0F, 0x80 + cc)) + (-0x20).to_bytes(4, "little", signed=True)):
        target = 0x401000 + len(code) + int.from_bytes(code[-1:] if len(code) == 2 else code[2:], "little",
                                                        signed=True)
        fields = []
        moved = relocate(code, 0x401000, new, fields)
        assert moved[:2] == bytes((0x0F, 0x80 + cc)) and len(moved) == 6
        assert new + 6 + int.from_bytes(moved[2:], "little", signed=True) == target
        assert fields == [(2, target, (1 << 64) - 1, 0)]
        assert text(moved, new).split()[0] == text(code, 0x401000).split()[0]


def test_a_conditional_jump_out_of_reach_is_refused():
    with pytest.raises(NotRelocatable, match="reach"):
        relocate(bytes.fromhex("7410"), 0x401000, 0x7F00_0000_0000)


def test_a_call_through_a_rip_relative_operand_is_refused_but_its_operand_is_known():
    code = encode("call qword ptr {m}", 0x401000, 0x404000)
    assert rip_relative(code, 0x401000) == 0x404000
    with pytest.raises(NotRelocatable):
        relocate(code, 0x401000, 0x402000)


@pytest.mark.parametrize("hexcode", ["", "9090", "488b0500000000c3", "90" * 16])
def test_anything_but_one_instruction_is_an_error(hexcode):
    with pytest.raises(ValueError) as error:
        relocate(bytes.fromhex(hexcode), 0x401000, 0x402000)
    assert not isinstance(error.value, NotRelocatable)


# Random instructions, heavy on ModRM rip-relative forms and odd prefixes.
_MODRM_OPCODES = [b"\x8b", b"\x89", b"\x03", b"\xc7", b"\x80", b"\x81", b"\xff", b"\x0f\x1f", b"\x0f\xb6",
                  b"\x0f\x10", b"\x0f\xc1", b"\x69", b"\xd1", b"\xf6", b"\xc5\xf1\xd4", b"\xc4\xe2\xe0\xf2"]
_PREFIXES = [b"", b"\x66", b"\x67", b"\x64", b"\x65", b"\xf2", b"\xf3", b"\xf0", b"\x2e", b"\x48", b"\x4d",
             b"\x66\x48"]


# ... and on what hands its address on: branches, calls, syscall, interrupts.
_ADDRESS_OPCODES = [b"\xe8", b"\xe9", b"\xeb", b"\x74", b"\x0f\x84", b"\xe0", b"\xe1", b"\xe2", b"\xe3",
                    b"\xc7\xf8", b"\xff\x15", b"\xff\x1d", b"\xff\xd0", b"\x0f\x05", b"\x0f\x34", b"\xcc",
                    b"\xcd", b"\xf1"]


@st.composite
def instruction_bytes(draw):
    kind = draw(st.sampled_from(["random", "modrm", "address"]))
    if kind == "random":
        return draw(st.binary(min_size=15, max_size=15))
    if kind == "address":
        head = draw(st.sampled_from(_PREFIXES)) + draw(st.sampled_from(_ADDRESS_OPCODES))
    else:
        rip = draw(st.booleans())
        modrm = draw(st.sampled_from([0x05, 0x0D, 0x15, 0x25, 0x3D]) if rip else st.integers(0, 255))
        head = draw(st.sampled_from(_PREFIXES)) + draw(st.sampled_from(_MODRM_OPCODES)) + bytes([modrm])
    return (head + draw(st.binary(min_size=15, max_size=15)))[:15]


def test_capstone_is_the_5_x_binding_relocate_reads_in_place():
    """relocate calls the binding's private cs_disasm and cs_free and reads its
    _cs_insn in place (the public CsInsn is several times slower): names and layouts
    of capstone 5, so another capstone must fail here rather than in a guest."""
    assert 5 <= int(capstone.__version__.split(".")[0]) < 6, capstone.__version__
    assert capstone.cs_version()[0] == 5
    assert callable(capstone._cs.cs_disasm) and callable(capstone._cs.cs_free)
    assert {"id", "size", "detail"} <= {name for name, _ in capstone._cs_insn._fields_}
    x86_detail = {name for name, _ in capstone.x86.CsX86._fields_}
    assert {"modrm", "encoding", "op_count", "operands"} <= x86_detail
    assert "modrm_offset" in {name for name, _ in capstone.x86.CsX86Encoding._fields_}


@settings(max_examples=3000, deadline=None)
@given(data=instruction_bytes(), address=st.sampled_from([0x401000, 0x7F12_3456_7FF0]))
def test_decoding_agrees_with_capstone_public_detail(data, address):
    """relocate reads capstone's detail in place, for speed; this holds it to the
    binding's public operands and groups over random instructions."""
    insn = next(_CS.disasm(data, address, 1), None)
    assume(insn is not None)
    code = data[:insn.size]
    assert rip_relative(code, address) == operand_target(insn)
    refused = bool({x86.X86_GRP_BRANCH_RELATIVE, x86.X86_GRP_CALL, x86.X86_GRP_INT} & set(insn.groups))
    target, new = operand_target(insn), address + 0x1234_5678
    try:
        moved = relocate(code, address, new)
    except NotRelocatable:
        delta = ((target or 0) - new - len(code) + (1 << 63)) % (1 << 64) - (1 << 63)
        in_reach = target is None or insn.addr_size == 4 or -(1 << 31) <= delta < 1 << 31
        assert refused or not in_reach, f"{code.hex()} ({insn.mnemonic} {insn.op_str}) refused"
    else:
        if insn.mnemonic.startswith("j") and x86.X86_GRP_BRANCH_RELATIVE in insn.groups:
            # a conditional jump, re-encoded: the same condition and target
            (again,) = _CS.disasm(moved, new, 1)
            assert (again.mnemonic, operand_target(again) or int(again.op_str, 0)) == (
                insn.mnemonic, int(insn.op_str, 0))
            return
        assert not refused, f"{code.hex()} ({insn.mnemonic} {insn.op_str}) relocated"
        assert rip_relative(moved, new) == target


# --- load_operand: tables --------------------------------------------------------------

OLD, NEW = 0x7F12_3456_7000, 0x7F12_0000_1000

LOADS = [  # (branch, bias, scratch, load)
    ("jmp rax", 128, "r11", "mov r11, rax"),
    ("call r15", 128, "r11", "mov r11, r15"),
    ("call r11", 128, "r10", "mov r10, r11"),
    ("jmp rsp", 0, "r11", "mov r11, rsp"),
    ("jmp rsp", 128, "r11", "lea r11, [rsp + 0x80]"),
    ("jmp rsp", 8, "r10", "lea r10, [rsp + 8]"),
    ("call qword ptr [rsp + 8]", 128, "r11", "mov r11, qword ptr [rsp + 0x88]"),
    ("call qword ptr [rsp]", 8, "r10", "mov r10, qword ptr [rsp + 8]"),
    ("call qword ptr [rsp]", 0, "r10", "mov r10, qword ptr [rsp]"),
    ("jmp qword ptr [rsp + 0x7f]", 1, "r11", "mov r11, qword ptr [rsp + 0x80]"),
    ("jmp qword ptr [rsp - 0x80]", 128, "r11", "mov r11, qword ptr [rsp]"),
    ("jmp qword ptr [rsp + 0x7fffff7f]", 128, "r11", "mov r11, qword ptr [rsp + 0x7fffffff]"),
    ("jmp qword ptr [rsp + rax*8 + 0x10]", 128, "r11", "mov r11, qword ptr [rsp + rax*8 + 0x90]"),
    ("jmp qword ptr [rsp + r12*2]", 160, "r10", "mov r10, qword ptr [rsp + r12*2 + 0xa0]"),
    ("jmp qword ptr [r12 + 8]", 128, "r11", "mov r11, qword ptr [r12 + 8]"),
    ("jmp qword ptr [r12]", 128, "r11", "mov r11, qword ptr [r12]"),
    ("jmp qword ptr [r13]", 128, "r11", "mov r11, qword ptr [r13]"),
    ("jmp qword ptr [rbp - 8]", 128, "r11", "mov r11, qword ptr [rbp - 8]"),
    ("jmp qword ptr [rbx + r12*4]", 128, "r10", "mov r10, qword ptr [rbx + r12*4]"),
    ("call qword ptr [rax + rcx*8 - 0x1234]", 128, "r10", "mov r10, qword ptr [rax + rcx*8 - 0x1234]"),
    ("call qword ptr [r14 + r15*8 + 0x12345678]", 136, "r11",
     "mov r11, qword ptr [r14 + r15*8 + 0x12345678]"),
]
HAND_LOADS = [  # (branch bytes, bias, scratch, load)
    ("64ff242528000000", 128, "r11", "mov r11, qword ptr fs:[0x28]"),
    ("65ff10", 128, "r11", "mov r11, qword ptr gs:[rax]"),
    ("6541ff542408", 128, "r10", "mov r10, qword ptr gs:[r12 + 8]"),
    ("65ff542408", 128, "r10", "mov r10, qword ptr gs:[rsp + 0x88]"),
    ("3effe0", 128, "r11", "mov r11, rax"),  # notrack
    ("3eff24c500104000", 128, "r11", "mov r11, qword ptr [rax*8 + 0x401000]"),
    ("f2ff10", 128, "r11", "mov r11, qword ptr [rax]"),  # bnd
    ("2eff10", 128, "r11", "mov r11, qword ptr [rax]"),  # a branch hint
    ("4cffd0", 128, "r11", "mov r11, rax"),  # REX.R extends no register of FF /2
    ("48ffe0", 128, "r11", "mov r11, rax"),
    ("41ff2424", 128, "r11", "mov r11, qword ptr [r12]"),
    ("ff242500104000", 128, "r11", "mov r11, qword ptr [0x401000]"),
    # SIB base 101 at mod 00: no base, REX.B or not
    ("41ff2425f0ffffff", 128, "r11", "mov r11, qword ptr [0xfffffffffffffff0]"),
    ("42ff24e5f0ffffff", 128, "r11", "mov r11, qword ptr [r12*8 - 0x10]"),  # SIB index 100 with REX.X: r12
    ("67ff20", 128, "r11", "mov r11, qword ptr [eax]"),
    ("67ff642408", 128, "r11", "mov r11, qword ptr [esp + 0x88]"),
    ("67ffa42480ffff7f", 128, "r11", "mov r11, qword ptr [esp - 0x80000000]"),  # wraps, as esp does
]


@pytest.mark.parametrize("branch,bias,scratch,load", LOADS)
def test_load_operand(branch, bias, scratch, load):
    assert text(load_operand(asm(branch, OLD), OLD, NEW, scratch, bias), NEW) == load


@pytest.mark.parametrize("hexcode,bias,scratch,load", HAND_LOADS)
def test_load_operand_hand_encodings(hexcode, bias, scratch, load):
    decode(bytes.fromhex(hexcode), OLD)
    assert text(load_operand(bytes.fromhex(hexcode), OLD, NEW, scratch, bias), NEW) == load


@pytest.mark.parametrize("old,new,target", PLACES)
@pytest.mark.parametrize("prefix,branch", [(b"", "jmp qword ptr {m}"), (b"", "call qword ptr {m}"),
                                           (b"\x3e", "notrack jmp qword ptr {m}"),
                                           (b"\x65", "jmp qword ptr {m}")])
def test_load_operand_reaims_a_rip_relative_operand(prefix, branch, old, new, target):
    code = encode(branch.replace("notrack ", ""), old, target, prefix=prefix, exact=False)
    load = load_operand(code, old, new, "r11", 128)
    segment = "gs:" if prefix == b"\x65" else ""
    assert text(load, new).startswith(f"mov r11, qword ptr {segment}[rip")
    assert rip_relative(load, new) == target


def test_load_operand_keeps_an_eip_operand_in_32_bits():
    code = encode("jmp qword ptr {m}", 0x7F12_3456_7000, 0x3456_9000, prefix=b"\x67")
    load = load_operand(code, 0x7F12_3456_7000, 0x5555_0000_0000, "r10", 128)
    assert text(load, 0x5555_0000_0000).startswith("mov r10, qword ptr [eip")
    assert rip_relative(load, 0x5555_0000_0000) == 0x3456_9000


@pytest.mark.parametrize("branch,scratch", [
    ("call r11", "r11"), ("jmp r10", "r10"), ("jmp qword ptr [r11 + 8]", "r11"),
    ("jmp qword ptr [rax + r11*8]", "r11"), ("call qword ptr [r10]", "r10"),
    ("jmp qword ptr [r10 + r10]", "r10"),
])
def test_an_operand_that_reads_the_scratch_register_asks_for_the_other(branch, scratch):
    code = asm(branch, OLD)
    with pytest.raises(ScratchInUse):
        load_operand(code, OLD, NEW, scratch, 128)
    other = "r10" if scratch == "r11" else "r11"
    assert text(load_operand(code, OLD, NEW, other, 128), NEW).startswith(f"mov {other}, ")


@pytest.mark.parametrize("hexcode,bias", [
    ("ffa42480ffff7f", 0x80),  # jmp [rsp + 0x7fffff80]: the disp32 overflows
    ("ffe4", 1 << 31),  # jmp rsp: the bias itself does not fit
    ("66ffe0", 0), ("f3ffe0", 0), ("f0ff10", 0),  # what these prefixes do is the CPU's choice
    ("6465ff20", 0), ("3e64ff20", 0),  # which segment counts is the CPU's choice
    ("483eff20", 0), ("4848ff20", 0),  # a REX that is not next to the opcode
])
def test_load_operand_refuses_what_no_load_matches(hexcode, bias):
    with pytest.raises(NotRelocatable):
        load_operand(bytes.fromhex(hexcode), OLD, NEW, "r11", bias)


@pytest.mark.parametrize("delta,fits", [(2**31 - 1, True), (-2**31, True),
                                        (2**31, False), (-2**31 - 1, False)])
def test_load_operand_reach_is_exactly_a_signed_disp32(delta, fits):
    target = OLD + 0x1000
    code = encode("jmp qword ptr {m}", OLD, target)
    new = target - delta - 7  # the load, REX.W 8B ModRM disp32, would have `delta`
    if fits:
        assert rip_relative(load_operand(code, OLD, new, "r11", 128), new) == target
    else:
        with pytest.raises(NotRelocatable, match="reach"):
            load_operand(code, OLD, new, "r11", 128)


@pytest.mark.parametrize("hexcode", [
    "ff30",  # push
    "ff18", "ff28",  # far call and jmp
    "ff00", "e800000000", "c3",  # inc, a relative call, ret
    "", "ff", "ff24", "ff250000", "ff2500000000ff", "ffe0c3", "66" * 14 + "ffe0",  # too short or too long
])
def test_load_operand_wants_one_indirect_near_branch(hexcode):
    with pytest.raises(ValueError) as error:
        load_operand(bytes.fromhex(hexcode), OLD, NEW, "r11", 128)
    assert not isinstance(error.value, NotRelocatable)


@pytest.mark.parametrize("scratch", ["rsp", "eax", "xmm0", "r11d", ""])
def test_load_operand_wants_a_64_bit_scratch_register(scratch):
    with pytest.raises(ValueError):
        load_operand(bytes.fromhex("ffe0"), OLD, NEW, scratch, 128)


@dataclass(frozen=True)
class Branch:
    """An indirect near jmp/call, by its fields, so a test can aim its operand."""
    reg: int  # ModRM.reg: 2 call, 4 jmp
    form: str  # reg, rip, base, sib
    legacy: bytes = b""  # prefixes other than 0x67 and REX
    addr32: bool = False
    rex: int | None = None  # W and R bits only; X and B come from the registers
    source: int | None = None  # register operand
    base: int | str | None = None  # register number, "rip", or None
    index: int | None = None
    scale: int = 1
    mod: int = 0
    disp: int = 0
    hidden_b: int = 0  # REX.B where it names no register (rip, SIB without base)
    hidden_x: int = 0  # REX.X where there is no SIB (in a SIB, index 100 with X is r12)

    @property
    def segment(self) -> int | None:
        return next((b for b in self.legacy if b in (0x64, 0x65)), None)

    @property
    def code(self) -> bytes:
        if self.form == "reg":
            b, x, modrm, tail = self.source >> 3, 0, 0xC0 | self.reg << 3 | self.source & 7, b""
        elif self.form == "rip":
            b, x, modrm = self.hidden_b, self.hidden_x, self.reg << 3 | 5
            tail = struct.pack("<i", self.disp)
        else:
            sib = self.form == "sib"
            b = self.base >> 3 if isinstance(self.base, int) else self.hidden_b
            x = self.index >> 3 if self.index is not None else 0 if sib else self.hidden_x
            rm = 4 if sib else self.base & 7
            modrm = self.mod << 6 | self.reg << 3 | rm
            index = 4 if self.index is None else self.index & 7
            base = 5 if self.base is None else self.base & 7
            tail = bytes([[1, 2, 4, 8].index(self.scale) << 6 | index << 3 | base]) if sib else b""
            disp_size = 4 if self.mod == 2 or self.base is None else self.mod
            tail += self.disp.to_bytes(disp_size, "little", signed=True) if disp_size else b""
        rex = (self.rex or 0x40) | x << 1 | b
        use_rex = self.rex is not None or rex != 0x40
        return (self.legacy + (b"\x67" if self.addr32 else b"") + (bytes([rex]) if use_rex else b"")
                + bytes([0xFF, modrm]) + tail)


@st.composite
def branches(draw, registers=tuple(range(16)), segments=(None, None, 0x64, 0x65)):
    """Every encoding of FF /2 and FF /4 with register numbers from `registers`."""
    legacy = draw(st.lists(st.sampled_from([0x3E, 0xF2, 0x2E, 0x26, 0x36]), max_size=3, unique=True))
    segment = draw(st.sampled_from(segments))
    if segment:  # with fs/gs, other segment prefixes would make the segment the CPU's choice
        legacy = [b for b in legacy if b == 0xF2] + [segment]
    fields = dict(reg=draw(st.sampled_from([2, 4])), legacy=bytes(legacy),
                  rex=draw(st.sampled_from([None, 0x40, 0x44, 0x48, 0x4C])),
                  hidden_b=draw(st.integers(0, 1)), hidden_x=draw(st.integers(0, 1)))
    form = draw(st.sampled_from(["reg", "rip", "base", "sib", "sib"]))

    def register(pool):  # rsp, which a stub's bias moves, one time in four
        return 4 if 4 in pool and draw(st.integers(0, 3)) == 0 else draw(st.sampled_from(pool))

    if form == "reg":
        return Branch(form=form, source=register(registers), **fields)
    addr32 = draw(st.booleans())
    disp32 = st.integers(-(1 << 31), (1 << 31) - 1)
    if form == "rip":
        return Branch(form=form, addr32=addr32, base="rip", disp=draw(disp32), **fields)
    if form == "base":
        base = draw(st.sampled_from([n for n in registers if n & 7 != 4]))  # rm 100 means a SIB
        index, scale = None, 1
    else:
        base = register([None, *registers])
        index = draw(st.sampled_from([None, *(n for n in registers if n != 4)]))
        scale = draw(st.sampled_from([1, 2, 4, 8]))
    if base is None:
        mod = 0
    else:
        mod = draw(st.sampled_from([1, 2] if base & 7 == 5 else [0, 1, 2]))  # mod 00 base 101 has none
    disp = 0 if mod == 0 and base is not None else draw(st.integers(-128, 127) if mod == 1 else disp32)
    return Branch(form=form, addr32=addr32, base=base, index=index, scale=scale, mod=mod, disp=disp,
                  **fields)


def _memory_operand(insn, n):
    op = insn.operands[n]
    if op.type == x86.X86_OP_REG:
        return ("reg", insn.reg_name(op.reg))
    m = op.mem
    return (insn.reg_name(m.segment) if m.segment else None, insn.reg_name(m.base) if m.base else None,
            insn.reg_name(m.index) if m.index else None, m.scale, m.disp)


@settings(max_examples=1500, deadline=None)
@given(branch=branches(), scratch=st.sampled_from(["r10", "r11"]),
       bias=st.sampled_from([0, 8, 128, 160]) | st.integers(0, 1 << 20))
def test_load_operand_agrees_with_capstone(branch, scratch, bias):
    """The same segment, base, index and scale, in capstone's reading of both."""
    code = branch.code
    original = decode(code, OLD)
    assert original.mnemonic.split()[-1] == ("call" if branch.reg == 2 else "jmp")
    want = _memory_operand(original, 0)
    try:
        load = load_operand(code, OLD, NEW, scratch, bias)
    except ScratchInUse:
        assert scratch in want or f"{scratch}d" in want
        return
    except NotRelocatable:
        if want[1] == "rip":
            size = 7 + (want[0] in ("fs", "gs"))  # [segment] REX.W 8B ModRM disp32
            assert not -(1 << 31) <= operand_target(original) - NEW - size < 1 << 31
        else:
            assert want[1] == "rsp" and not -(1 << 31) <= want[4] + bias < 1 << 31
        return
    moved = decode(load, NEW)
    assert moved.operands[0].type == x86.X86_OP_REG and moved.reg_name(moved.operands[0].reg) == scratch
    got = _memory_operand(moved, 1)
    if want[0] == "reg":
        if want[1] == "rsp" and bias:
            assert (moved.mnemonic, got) == ("lea", (None, "rsp", None, 1, bias))
        else:
            assert (moved.mnemonic, got) == ("mov", want)
        return
    assert moved.mnemonic == "mov" and moved.operands[1].size == 8
    segment = want[0] if want[0] in ("fs", "gs") else None
    if want[1] in ("rip", "eip"):
        assert got[:4] == (segment, *want[1:4]) and operand_target(moved) == operand_target(original)
    elif want[1] in ("rsp", "esp"):
        disp = want[4] + bias
        disp = ((disp + (1 << 31)) & MASK32) - (1 << 31) if want[1] == "esp" else disp
        assert got == (segment, *want[1:4], disp)
    else:
        assert got == (segment, *want[1:])


# --- execution -------------------------------------------------------------------------

CODE_HIGH = 0x1_1000_0000  # above 4 GiB
CODE_NEAR = 0x1_1001_0000
CODE_LOW = 0x0_9000_0000  # 2 GiB below CODE_HIGH, below 4 GiB
CODE_SIZE = 0x2000
DATA = 0x0_D000_0000  # 1 GiB from both: rip-relative reach from each, and 32-bit
DATA_SIZE = 0x1000  # what rip-relative operands name
STACK_SIZE = 0x8000
MEMORY_SIZE = DATA_SIZE + STACK_SIZE  # compared after every run
RSP0 = DATA + DATA_SIZE + STACK_SIZE // 2
GS_BASE = 0x1000_0000  # a gs: operand that lost its prefix lands in no mapping

FLAGS = 0x8D5  # CF PF AF ZF SF OF: the flags code computes
STATE_WORDS = 22  # 16 GPRs, rflags, entry, xmm0, xmm1
FLAGS_AT, ENTRY_AT, XMM_AT = 16, 17, 18

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_ulong]
_PROT_RWX = 7
_MAP_PRIVATE_ANONYMOUS, _MAP_FIXED_NOREPLACE = 0x22, 0x100000
_SYS_ARCH_PRCTL, _ARCH_SET_GS = 158, 0x1001


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


CPU = _cpu_flags()


def tail(continuation: int) -> bytes:
    """`jmp [rip]` to an absolute address stored after it: runs the same anywhere."""
    return b"\xff\x25\x00\x00\x00\x00" + struct.pack("<Q", continuation)


class Machine:
    """Code pages at fixed addresses, the data and stack, and a harness that runs code
    at an address from a state block: `harness(state)` loads every GPR, rflags, xmm0
    and xmm1 from it, jumps to its entry; code that ends with tail(continuation) stores
    them back."""

    def __init__(self):
        self.mapped = []
        for address, size in ((CODE_HIGH, CODE_SIZE), (CODE_NEAR, CODE_SIZE), (CODE_LOW, CODE_SIZE),
                              (DATA, MEMORY_SIZE)):
            got = _libc.mmap(address, size, _PROT_RWX, _MAP_PRIVATE_ANONYMOUS | _MAP_FIXED_NOREPLACE, -1, 0)
            if got != address:
                self.close()
                pytest.skip(f"cannot map {address:#x}: {os.strerror(ctypes.get_errno())}")
            self.mapped.append((address, size))
        self.harness = _libc.mmap(None, 0x1000, _PROT_RWX, _MAP_PRIVATE_ANONYMOUS, -1, 0)
        self.mapped.append((self.harness, 0x1000))
        code, self.continuation = self._harness_code(self.harness)
        ctypes.memmove(self.harness, code, len(code))
        self.call = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(self.harness)

    @staticmethod
    def _harness_code(base: int) -> tuple[bytes, int]:
        saved_rsp, state, entry, spill = base + 0x800, base + 0x808, base + 0x810, base + 0x818
        loads = [(f"mov {r}, qword ptr [rdi{sdisp(8 * n)}]", None)
                 for n, r in enumerate(GPRS) if r != "rdi"]
        stores = [(f"mov qword ptr [rax{sdisp(8 * n)}], {r}", None)
                  for n, r in enumerate(GPRS) if r != "rax"]
        enter = [
            *((f"push {r}", None) for r in ("rbx", "rbp", "r12", "r13", "r14", "r15")),
            ("mov qword ptr {m}, rsp", saved_rsp), ("mov qword ptr {m}, rdi", state),
            (f"mov rax, qword ptr [rdi + {8 * ENTRY_AT:#x}]", None), ("mov qword ptr {m}, rax", entry),
            ("fninit", None),
            (f"movdqu xmm0, xmmword ptr [rdi + {8 * XMM_AT:#x}]", None),
            (f"movdqu xmm1, xmmword ptr [rdi + {8 * XMM_AT + 16:#x}]", None),
            (f"push qword ptr [rdi + {8 * FLAGS_AT:#x}]", None), ("popfq", None),
            *loads, ("mov rdi, qword ptr [rdi + 0x38]", None),
            ("jmp qword ptr {m}", entry),
        ]
        leave = [
            ("mov qword ptr {m}, rax", spill), ("mov rax, qword ptr {m}", state), *stores,
            ("mov rcx, qword ptr {m}", spill), ("mov qword ptr [rax], rcx", None),
            ("mov rsp, qword ptr {m}", saved_rsp),
            ("pushfq", None), (f"pop qword ptr [rax + {8 * FLAGS_AT:#x}]", None),
            (f"movdqu xmmword ptr [rax + {8 * XMM_AT:#x}], xmm0", None),
            (f"movdqu xmmword ptr [rax + {8 * XMM_AT + 16:#x}], xmm1", None),
            ("cld", None),
            *((f"pop {r}", None) for r in ("r15", "r14", "r13", "r12", "rbp", "rbx")),
            ("ret", None),
        ]
        code = b""
        continuation = None
        for part in (enter, leave):
            continuation = base + len(code)
            for source, target in part:
                code += encode(source, base + len(code), target)
        assert len(code) < 0x800
        return code, continuation

    def run(self, placements, regs: dict, memory: bytes, gs_base: int | None = None) -> dict:
        """Runs in the calling process: only ever in a child (see isolated)."""
        for address, code in placements:
            ctypes.memmove(address, code, len(code))
        ctypes.memmove(DATA, memory, MEMORY_SIZE)
        if gs_base is not None:
            assert _libc.syscall(_SYS_ARCH_PRCTL, _ARCH_SET_GS, gs_base) == 0
        state = (ctypes.c_uint64 * STATE_WORDS)()
        for n, name in enumerate(GPRS):
            state[n] = regs[name]
        state[FLAGS_AT] = 0x202 | regs["flags"] & FLAGS
        state[ENTRY_AT] = placements[0][0]
        for n in range(4):
            state[XMM_AT + n] = regs["xmm"][n]
        self.call(ctypes.addressof(state))
        after = {name: state[n] for n, name in enumerate(GPRS)}
        after["flags"] = state[FLAGS_AT] & (FLAGS | 0x400)
        after["xmm"] = tuple(state[XMM_AT:XMM_AT + 4])
        after["memory"] = ctypes.string_at(DATA, MEMORY_SIZE)
        return after

    def close(self):
        for address, size in self.mapped:
            _libc.munmap(address, size)
        self.mapped = []


@pytest.fixture(scope="module")
def machine():
    m = Machine()
    yield m
    m.close()


def isolated(machine: Machine, jobs: list, timeout: float = 20.0) -> list[dict]:
    """machine.run(*job) for each job, in order, in one forked child.

    A job that kills the child fails the test with its number and signal.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no return from here
        status = 1
        try:
            os.close(read_end)
            with os.fdopen(write_end, "wb") as out:
                for job in jobs:
                    data = pickle.dumps(machine.run(*job))
                    out.write(struct.pack("<Q", len(data)) + data)
                    out.flush()
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    received = b""
    deadline = time.monotonic() + timeout
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while True:
            ready, _, _ = select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                break
            chunk = pipe.read(1 << 16)
            if not chunk:
                break
            received += chunk
    _, status = os.waitpid(pid, 0)
    results = []
    while len(received) >= 8:
        (size,) = struct.unpack_from("<Q", received)
        results.append(pickle.loads(received[8:8 + size]))
        received = received[8 + size:]
    if os.WIFSIGNALED(status) or len(results) < len(jobs):
        how = (signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status)
               else f"exit status {os.WEXITSTATUS(status)}")
        raise AssertionError(f"job {len(results)} of {len(jobs)} did not finish: {how}")
    return results


def differences(want: dict, got: dict) -> list[str]:
    out = [f"{k}: {want[k]:#x} != {got[k]:#x}" for k in GPRS + ["flags"] if want[k] != got[k]]
    if want["xmm"] != got["xmm"]:
        out.append(f"xmm0/xmm1: {want['xmm']} != {got['xmm']}")
    if want["memory"] != got["memory"]:
        at = next(n for n, (a, b) in enumerate(zip(want["memory"], got["memory"])) if a != b)
        out.append(f"memory differs first at {DATA + at:#x}")
    return out


def test_harness_round_trips_a_state(machine):
    """Code that is only the tail changes nothing: the harness loses no register."""
    rng = random.Random(5)
    regs = {name: rng.getrandbits(64) for name in GPRS}
    regs.update(rsp=RSP0, flags=FLAGS, xmm=tuple(rng.getrandbits(64) for _ in range(4)))
    memory = rng.randbytes(MEMORY_SIZE)
    (after,) = isolated(machine, [([(CODE_HIGH, tail(machine.continuation))], regs, memory)])
    assert not differences({**regs, "flags": FLAGS, "memory": memory}, after)
    # and the comparison sees one changed bit in a register, the flags and memory
    code = asm("xor r13, 0x100", CODE_LOW) + asm("cmc", CODE_LOW) + asm("inc byte ptr [rsp]", CODE_LOW)
    (after,) = isolated(machine, [([(CODE_LOW, code + tail(machine.continuation))], regs, memory)])
    assert [d.split(":")[0] for d in differences({**regs, "flags": FLAGS, "memory": memory}, after)] == \
        ["r13", "flags", "memory differs first at 0xd0005000"]


# Random straight-line code. Registers: all but rsp, which only balanced push/pop moves.
R64 = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp"] + [f"r{n}" for n in range(8, 16)]
NAMES = {
    64: R64,
    32: ["eax", "ebx", "ecx", "edx", "esi", "edi", "ebp"] + [f"r{n}d" for n in range(8, 16)],
    16: ["ax", "bx", "cx", "dx", "si", "di", "bp"] + [f"r{n}w" for n in range(8, 16)],
    8: ["al", "bl", "cl", "dl", "sil", "dil", "bpl"] + [f"r{n}b" for n in range(8, 16)],
}
PTR = {8: "byte ptr", 16: "word ptr", 32: "dword ptr", 64: "qword ptr", 128: "xmmword ptr"}
CC = ["o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g"]
ALU = ["mov", "add", "sub", "xor", "and", "or", "adc", "sbb", "cmp"]


@dataclass(frozen=True)
class Spec:
    """One instruction of a random program; `{m}` names `target` rip-relative."""
    source: str
    target: int | None = None
    prefix: bytes = b""
    hand: tuple[bytes, bytes] | bytes | None = None
    stack: int = 0  # pushes minus pops

    def at(self, address: int) -> bytes:
        return encode(self.source, address, self.target, prefix=self.prefix, hand=self.hand, exact=False)


widths = st.sampled_from([8, 16, 32, 64])


def reg(draw, width):
    return draw(st.sampled_from(NAMES[width]))


def immediate(draw, width):
    bits = min(width, 32)
    return imm(draw(st.integers(-(1 << bits - 1), (1 << bits - 1) - 1)))


def data_target(draw, size=8, align=1):
    return DATA + align * draw(st.integers(0, (DATA_SIZE - size) // align))


@st.composite
def rip_specs(draw):
    """An instruction with a rip-relative operand into DATA."""
    w = draw(widths)
    r, m = reg(draw, w), f"{PTR[w]} {{m}}"
    family = draw(st.sampled_from(["load", "store", "store_imm", "lea", "imul", "unary", "shift", "setcc",
                                   "cmovcc", "extend", "bit", "atomic", "sse", "gs", "eip"]
                                  + ["avx"] * ("avx" in CPU) + ["evex"] * ("avx512vl" in CPU)
                                  + ["bmi"] * ("bmi1" in CPU)))
    t = data_target(draw, 16)
    if family == "load":
        return Spec(f"{draw(st.sampled_from(ALU))} {r}, {m}", t)
    if family == "store":
        return Spec(f"{draw(st.sampled_from(ALU + ['xchg', 'test']))} {m}, {r}", t)
    if family == "store_imm":
        return Spec(f"{draw(st.sampled_from(ALU + ['test']))} {m}, {immediate(draw, w)}", t)
    if family == "lea":
        return Spec(f"lea {reg(draw, draw(st.sampled_from([32, 64])))}, {{m}}", t)
    if family == "imul":
        w = draw(st.sampled_from([16, 32, 64]))
        form = draw(st.sampled_from(["", f", {immediate(draw, 8)}", f", {immediate(draw, w)}"]))
        return Spec(f"imul {reg(draw, w)}, {PTR[w]} {{m}}{form}", t)
    if family == "unary":
        return Spec(f"{draw(st.sampled_from(['neg', 'not', 'inc', 'dec', 'mul']))} {m}", t)
    if family == "shift":
        op = draw(st.sampled_from(["shl", "shr", "sar", "rol", "ror", "rcl", "rcr"]))
        return Spec(f"{op} {m}, {draw(st.sampled_from(['1', 'cl', str(draw(st.integers(0, 63)))]))}", t)
    if family == "setcc":
        return Spec(f"set{draw(st.sampled_from(CC))} byte ptr {{m}}", t)
    if family == "cmovcc":
        w = draw(st.sampled_from([16, 32, 64]))
        return Spec(f"cmov{draw(st.sampled_from(CC))} {reg(draw, w)}, {PTR[w]} {{m}}", t)
    if family == "extend":
        return draw(st.sampled_from([
            Spec(f"movzx {reg(draw, 32)}, byte ptr {{m}}", t),
            Spec(f"movsx {reg(draw, 64)}, word ptr {{m}}", t),
            Spec(f"movsxd {reg(draw, 64)}, dword ptr {{m}}", t)]))
    if family == "bit":
        w = draw(st.sampled_from([16, 32, 64]))
        op = draw(st.sampled_from(["bt", "bts", "btr", "btc"]))
        return Spec(f"{op} {PTR[w]} {{m}}, {draw(st.integers(0, w - 1))}", t)
    if family == "atomic":
        w = draw(st.sampled_from([32, 64]))
        op = draw(st.sampled_from(["lock add", "lock xadd", "lock cmpxchg", "xadd", "cmpxchg"]))
        return Spec(f"{op} {PTR[w]} {{m}}, {reg(draw, w)}", t)
    shuffle = imm(draw(st.integers(0, 255)))
    if family == "sse":
        aligned = data_target(draw, 16, 16)  # legacy SSE arithmetic faults on unaligned memory
        return draw(st.sampled_from([
            Spec("movq xmm0, qword ptr {m}", t), Spec("movq qword ptr {m}, xmm1", t),
            Spec("movdqu xmm1, xmmword ptr {m}", t), Spec("movdqu xmmword ptr {m}, xmm0", t),
            Spec("paddq xmm0, xmmword ptr {m}", aligned),
            Spec(f"pshufd xmm1, xmmword ptr {{m}}, {shuffle}", aligned),
            Spec("pinsrq xmm0, qword ptr {m}, 1", t), Spec("ptest xmm1, xmmword ptr {m}", aligned),
            Spec("movq rax, xmm0"), Spec("movq xmm1, rbx"), Spec("pextrq rcx, xmm1, 1"),
            Spec("cvtsi2sd xmm0, qword ptr {m}", t)]))
    if family == "avx":
        return draw(st.sampled_from([
            Spec("vpaddq xmm0, xmm1, xmmword ptr {m}", t),
            Spec(f"vpshufd xmm1, xmmword ptr {{m}}, {shuffle}", t),
            Spec("vmovdqu xmmword ptr {m}, xmm1", t)]))
    if family == "evex":
        return draw(st.sampled_from([
            Spec("vmovdqu64 xmm0, xmmword ptr {m}", t, hand=(bytes.fromhex("62f1fe086f05"), b"")),
            Spec("vmovdqu64 xmmword ptr {m}, xmm1", t, hand=(bytes.fromhex("62f1fe087f0d"), b"")),
            Spec("vpshufd xmm0, xmmword ptr {m}, 0x1b", t, hand=(bytes.fromhex("62f17d087005"), b"\x1b"))]))
    if family == "bmi":
        return Spec(f"andn {reg(draw, 64)}, {reg(draw, 64)}, qword ptr {{m}}", t)
    if family == "gs":  # an offset that lands in DATA only with GS_BASE added
        op = draw(st.sampled_from([f"mov {r}, {m}", f"add {m}, {r}", f"cmp {m}, {immediate(draw, w)}"]))
        return Spec(op, t - GS_BASE, prefix=b"\x65")
    # eip: the 0x67 form, whose sum wraps at 4 GiB (the code at CODE_HIGH is above)
    w = draw(st.sampled_from([8, 32, 64]))
    op = draw(st.sampled_from([f"mov {reg(draw, w)}, {PTR[w]} {{m}}", f"lea {reg(draw, 64)}, {{m}}",
                               f"sub {PTR[w]} {{m}}, {immediate(draw, w)}"]))
    return Spec(op, t, prefix=b"\x67")


@st.composite
def plain_specs(draw):
    """Register, rsp-relative and absolute forms: relocate copies them."""
    w = draw(widths)
    r = reg(draw, w)
    family = draw(st.sampled_from(["rr", "ri", "lea", "imul", "shift", "cc", "misc", "rsp", "movabs"]))
    if family == "rr":
        return Spec(f"{draw(st.sampled_from(ALU + ['test', 'xchg']))} {r}, {reg(draw, w)}")
    if family == "ri":
        return Spec(f"{draw(st.sampled_from(ALU + ['test']))} {r}, {immediate(draw, w if w < 64 else 32)}")
    if family == "lea":
        index = draw(st.sampled_from(R64))
        return Spec(f"lea {reg(draw, 64)}, [{reg(draw, 64)} + {index}*{draw(st.sampled_from([1, 2, 4, 8]))}"
                    f"{sdisp(draw(st.integers(-(1 << 31), (1 << 31) - 1)))}]")
    if family == "imul":
        w = draw(st.sampled_from([16, 32, 64]))
        return Spec(f"imul {reg(draw, w)}, {reg(draw, w)}, {immediate(draw, 8)}")
    if family == "shift":
        op = draw(st.sampled_from(["shl", "shr", "sar", "rol", "ror", "rcl", "rcr"]))
        return Spec(f"{op} {r}, {draw(st.sampled_from(['1', 'cl', str(draw(st.integers(0, 63)))]))}")
    if family == "cc":
        w = draw(st.sampled_from([16, 32, 64]))
        cc = draw(st.sampled_from(CC))
        return draw(st.sampled_from([Spec(f"set{cc} {reg(draw, 8)}"),
                                     Spec(f"cmov{cc} {reg(draw, w)}, {reg(draw, w)}")]))
    if family == "misc":
        return Spec(draw(st.sampled_from([
            "cqo", "cdq", "cdqe", "cwde", "clc", "stc", "cmc", "lahf", "sahf", f"bswap {reg(draw, 64)}",
            f"neg {r}", f"not {r}", f"inc {r}", f"mul {r}", f"bt {reg(draw, 64)}, {reg(draw, 64)}",
            f"movzx {reg(draw, 32)}, {reg(draw, 8)}", f"movsx {reg(draw, 64)}, {reg(draw, 16)}"])))
    if family == "rsp":
        d = sdisp(draw(st.integers(-0x100, 0x100)))
        return draw(st.sampled_from([
            Spec(f"mov {r}, {PTR[w]} [rsp{d}]"), Spec(f"mov {PTR[w]} [rsp{d}], {r}"),
            Spec(f"add {PTR[w]} [rsp{d}], {immediate(draw, w)}"), Spec(f"lea {reg(draw, 64)}, [rsp{d}]")]))
    address = struct.pack("<Q", data_target(draw))  # moffs64: keystone gets these wrong
    return draw(st.sampled_from([Spec("movabs rax, qword ptr [abs]", hand=b"\x48\xa1" + address),
                                 Spec("movabs qword ptr [abs], rax", hand=b"\x48\xa3" + address)]))


@st.composite
def stack_specs(draw):
    t = data_target(draw)
    d = sdisp(8 * draw(st.integers(-4, 4)))
    return draw(st.sampled_from([
        Spec(f"push {reg(draw, 64)}", stack=1), Spec("push qword ptr {m}", t, stack=1),
        Spec(f"push {immediate(draw, 8)}", stack=1), Spec(f"push qword ptr [rsp{d}]", stack=1),
        Spec("pushfq", stack=1),
        Spec(f"pop {reg(draw, 64)}", stack=-1), Spec("pop qword ptr {m}", t, stack=-1)]))


@st.composite
def x87_specs(draw):
    return [Spec("fld qword ptr {m}", data_target(draw)), Spec("fstp qword ptr {m}", data_target(draw))]


@st.composite
def programs(draw):
    chosen = draw(st.lists(st.one_of(rip_specs(), rip_specs(), plain_specs(), stack_specs(), x87_specs()),
                           min_size=1, max_size=24))
    program, depth = [], 0
    for item in chosen:
        for spec in item if isinstance(item, list) else [item]:
            if depth + spec.stack >= 0:
                program.append(spec)
                depth += spec.stack
    program += [Spec(f"pop {reg(draw, 64)}", stack=-1) for _ in range(depth)]
    return program


register_values = st.integers(0, MASK64) | st.sampled_from([0, 1, MASK64, 1 << 63, (1 << 63) - 1, 0x80])
CODE_PAGES = (CODE_HIGH, CODE_NEAR, CODE_LOW)
PAIRS = [(a, b) for a in CODE_PAGES for b in CODE_PAGES if a != b]  # (original, relocated)


@st.composite
def machine_states(draw):
    regs = {name: draw(register_values) for name in GPRS}
    regs.update(rsp=RSP0, flags=draw(st.integers(0, FLAGS)) & FLAGS,
                xmm=tuple(draw(st.integers(0, MASK64)) for _ in range(4)))
    return regs


@settings(max_examples=600, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(program=programs(), regs=machine_states(), seed=st.integers(0, 2**32),
       pair=st.sampled_from(PAIRS), offsets=st.tuples(st.integers(0, 0x400), st.integers(0, 0x400)))
def test_relocated_code_runs_as_the_original(machine, program, regs, seed, pair, offsets):
    old, new = pair[0] + offsets[0], pair[1] + offsets[1]
    original, address = [], old
    for spec in program:
        original.append((address, spec.at(address)))
        address += len(original[-1][1])
    moved = [relocate(code, at, at - old + new) for at, code in original]
    back = tail(machine.continuation)
    memory = random.Random(seed).randbytes(MEMORY_SIZE)
    native, relocated = isolated(machine, [
        ([(old, b"".join(code for _, code in original) + back)], regs, memory, GS_BASE),
        ([(new, b"".join(moved) + back)], regs, memory, GS_BASE),
    ])
    listing = "\n".join(f"  {at:#x} {text(code, at):48} -> {text(m, at - old + new)}"
                        for (at, code), m in zip(original, moved))
    assert not differences(native, relocated), f"{differences(native, relocated)}\n{listing}"


# load_operand: the original branch runs natively and reaches the harness's
# continuation only if its operand is where the test put the continuation's address;
# the load then runs at another address, rsp lowered by the bias, and must read it.

def effective_address(branch: Branch, regs: dict, address: int, gs_base: int) -> int:
    """The operand's linear address, from the branch's fields: the test's model, which
    the native run of the branch confirms."""
    mask = MASK32 if branch.addr32 else MASK64
    if branch.base == "rip":
        offset = address + len(branch.code) + branch.disp
    else:
        offset = branch.disp + (regs[GPRS[branch.base]] if branch.base is not None else 0)
        offset += regs[GPRS[branch.index]] * branch.scale if branch.index is not None else 0
    return (gs_base + (offset & mask)) & MASK64


def wrap32(value: int) -> int:
    return ((value + (1 << 31)) & MASK32) - (1 << 31)


def aim(draw, branch: Branch, regs: dict, address: int, ea: int):
    """(branch, gs base, ea): `regs`, the disp or the gs base set so that the operand
    of the branch at `address` names `ea`, which moves a little where the shape leaves
    no choice. None when the shape cannot name memory this test has."""
    mask, bits = (MASK32, 32) if branch.addr32 else (MASK64, 64)
    upper = (draw(st.integers(0, MASK32)) << 32) if branch.addr32 else 0  # a 32-bit address ignores it
    gs = branch.segment == 0x65
    gs_base = 8 * draw(st.integers(0, 1 << 27)) if gs else 0
    base, index, scale, disp = branch.base, branch.index, branch.scale, branch.disp
    if base == "rip" or (base is None and index is None):  # only the disp and the gs base are free
        start = address + len(branch.code) if base == "rip" else 0
        if gs:  # an offset below ea that the disp reaches, from every code page if rip-relative
            high = ea if branch.addr32 or base == "rip" else min(ea, (1 << 31) - 1)
            offset = draw(st.integers(ea - (1 << 28) if base == "rip" else 0, high))
            gs_base = ea - offset
        else:
            offset = ea
        branch = replace(branch, disp=wrap32(offset - start))
        if (start + branch.disp) & mask != offset:
            return None  # [disp32] sign-extends: no 64-bit address above 2 GiB
    elif base not in (None, 4):  # the base register is free
        rest = (ea - gs_base - disp) & mask
        if index == base:  # one register, 1 + scale times
            times = 1 + scale
            if times == 2:
                ea -= rest & 1
                value = (rest - (rest & 1)) >> 1
            else:
                value = rest * pow(times, -1, 1 << bits) & mask
        else:
            value = (rest - (regs[GPRS[index]] * scale if index is not None else 0)) & mask
        regs[GPRS[base]] = value | upper
    elif index is not None:  # [rsp or nothing + index*scale]: the index register is free
        rest = (ea - gs_base - disp - (regs["rsp"] if base == 4 else 0)) & mask
        ea -= rest % scale
        rest -= rest % scale
        alias = draw(st.integers(0, scale - 1)) * ((1 << bits) // scale)  # same product, other high bits
        regs[GPRS[index]] = (rest // scale + alias) & mask | upper
    elif branch.mod == 2:  # [rsp + disp32]: the disp is free
        branch = replace(branch, disp=wrap32(ea - gs_base - regs["rsp"]))
    else:  # [rsp] or [rsp + disp8]: the address is by rsp, and the gs base keeps it there
        offset = (regs["rsp"] + disp) & mask
        gs_base = 8 * draw(st.integers(0, (DATA + MEMORY_SIZE - 8 - offset) // 8)) if gs else 0
        ea = offset + gs_base
    return branch, (gs_base if gs else None), ea


@st.composite
def load_cases(draw):
    scratch = draw(st.sampled_from(["r10", "r11"]))
    branch = draw(branches(registers=tuple(n for n in range(16) if GPRS[n] != scratch),
                           segments=(None, None, 0x65)))  # fs: is this process's thread pointer
    regs = draw(machine_states())
    regs["rsp"] = RSP0 + 8 * draw(st.integers(-16, 16))
    old, new = draw(st.sampled_from(PAIRS))
    old, new = old + draw(st.integers(0, 0x400)), new + draw(st.integers(0, 0x400))
    ea, gs_base = None, None
    if branch.form != "reg":
        aimed = aim(draw, branch, regs, old, DATA + 8 + draw(st.integers(0, MEMORY_SIZE - 16)))
        assume(aimed is not None)
        branch, gs_base, ea = aimed
        assert effective_address(branch, regs, old, gs_base or 0) == ea
        assert DATA <= ea <= DATA + MEMORY_SIZE - 8
    return dict(branch=branch, regs=regs, old=old, new=new, scratch=scratch, ea=ea, gs_base=gs_base,
                bias=draw(st.sampled_from([0, 8, 128, 160, max(0, -branch.disp)])  # last: [rsp] in the stub
                          | st.integers(0, 1 << 20)),
                scratch_value=draw(register_values), seed=draw(st.integers(0, 2**32)))


@settings(max_examples=600, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=load_cases())
def test_load_operand_reads_what_the_branch_would_have(machine, case):
    branch, regs, bias = case["branch"], dict(case["regs"]), case["bias"]
    old, new = case["old"], case["new"]
    code = branch.code
    landing = machine.continuation
    memory = bytearray(random.Random(case["seed"]).randbytes(MEMORY_SIZE))
    if case["ea"] is not None:
        memory[case["ea"] - DATA:case["ea"] - DATA + 8] = struct.pack("<Q", landing)
    elif GPRS[branch.source] != "rsp":
        regs[GPRS[branch.source]] = landing
    expected = regs["rsp"] if branch.form == "reg" and GPRS[branch.source] == "rsp" else landing
    memory = bytes(memory)
    if branch.base == 4 and not branch.addr32 and not -(1 << 31) <= branch.disp + bias < 1 << 31:
        with pytest.raises(NotRelocatable):  # [rsp + disp32] with no disp32 for the stub
            load_operand(code, old, new, case["scratch"], bias)
        return
    load = load_operand(code, old, new, case["scratch"], bias)
    stub = dict(regs, rsp=(regs["rsp"] - bias) & MASK64, **{case["scratch"]: case["scratch_value"]})
    jobs = [([(new, load + tail(landing))], stub, memory, case["gs_base"])]
    if expected == landing:  # the branch itself, natively: it arrives only if the test aimed it
        jobs.insert(0, ([(old, code)], regs, memory, case["gs_base"]))
    results = isolated(machine, jobs)
    if expected == landing:
        native = results.pop(0)
        pushed = 8 if branch.reg == 2 else 0
        assert native["rsp"] == regs["rsp"] - pushed
        if pushed:
            at = native["rsp"] - DATA
            assert native["memory"][at:at + 8] == struct.pack("<Q", old + len(code))
    (after,) = results
    assert after[case["scratch"]] == expected, \
        f"{text(load, new)} loaded {after[case['scratch']]:#x}, not {expected:#x}"
    assert differences({**stub, case["scratch"]: expected, "flags": stub["flags"] & FLAGS,
                        "memory": memory}, after) == []
