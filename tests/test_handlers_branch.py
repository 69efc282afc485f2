"""Indirect jmp/call emulation against real encodings of every operand form."""
from __future__ import annotations

import errno

import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from hypothesis import given, settings
from hypothesis import strategies as st
from keystone import KS_ARCH_X86, KS_MODE_64, Ks

from sbe.handlers import branch
from sbe.handlers.effect import RESUME, STEP
from sbe.meta.site import Site

MASK64 = (1 << 64) - 1
ADDRESS = 0x401000
HIGH_ADDRESS = 0x7F12_3456_7000  # above 4 GiB, so 32-bit address wrap shows

GPRS = ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]

_CS = Cs(CS_ARCH_X86, CS_MODE_64)
_KS = Ks(KS_ARCH_X86, KS_MODE_64)


def make_site(code: bytes, address: int = ADDRESS) -> Site:
    insn = next(_CS.disasm(code, address, 1))
    assert insn.size == len(code), f"{code.hex()} is more than one instruction"
    return Site(address, insn.size, "branch", insn.mnemonic, insn.op_str, code)


def assemble(source: str, address: int) -> bytes:
    return bytes(_KS.asm(source, address)[0])


def base_regs() -> dict:
    # Distinct, upper-half-populated values so a wrong register or a missing mask
    # gives a different address.
    regs = {name: 0x5A00_0000_0000_0000 + (n + 1) * 0x0101_0101_0000
            for n, name in enumerate(GPRS)}
    regs.update(rip=ADDRESS, fs_base=0x7F00_0000_1000, gs_base=0x7E00_0000_2000,
                eflags=0x246, cs=0x33, ss=0x2B, ds=0, es=0, fs=0, gs=0, orig_rax=MASK64)
    return regs


class Memory:
    """Guest memory holding only the words a test put there; anything else faults."""

    def __init__(self, words: dict[int, int] | None = None):
        self.words = dict(words or {})
        self.reads = []

    def __call__(self, address: int, size: int) -> bytes:
        self.reads.append((address, size))
        if size != 8 or address not in self.words:
            raise OSError(errno.EFAULT, f"no guest memory at {address:#x}")
        return self.words[address].to_bytes(8, "little")


TARGET = 0x5555_5555_8A30  # what every memory operand in the table points to

# (assembly text or hand-written bytes, capstone's op_str, site address,
#  register overrides, the register holding the target or the operand's address)
CASES = [
    ("jmp rax", "rax", ADDRESS, {"rax": 0x4012A0}, "rax"),
    ("call r11", "r11", ADDRESS, {"r11": 0x7F00_1234_5678}, "r11"),
    ("call rsp", "rsp", ADDRESS, {}, "rsp"),
    ("jmp qword ptr [rax]", "qword ptr [rax]", ADDRESS, {"rax": 0x602000}, 0x602000),
    ("call qword ptr [rbx + 0x18]", "qword ptr [rbx + 0x18]", ADDRESS, {"rbx": 0x602000}, 0x602018),
    ("jmp qword ptr [rax + rcx*8]", "qword ptr [rax + rcx*8]", ADDRESS,
     {"rax": 0x600000, "rcx": 7}, 0x600038),
    ("jmp qword ptr [r13 + r12*4 - 0x40]", "qword ptr [r13 + r12*4 - 0x40]", ADDRESS,
     {"r13": 0x600100, "r12": 2}, 0x6000C8),
    ("jmp qword ptr [rbp + rdi*2 + 0x7fffffff]", "qword ptr [rbp + rdi*2 + 0x7fffffff]", ADDRESS,
     {"rbp": 0x1000, "rdi": 3}, 0x8000_1005),
    ("call qword ptr [rax*8 + 0x600000]", "qword ptr [rax*8 + 0x600000]", ADDRESS,
     {"rax": 5}, 0x600028),
    # The operand is read before the call pushes: [rsp + 8] uses the old rsp.
    ("call qword ptr [rsp + 8]", "qword ptr [rsp + 8]", ADDRESS, {"rsp": 0x7FFF_FFFF_E000},
     0x7FFF_FFFF_E008),
    ("jmp qword ptr [rip + 0x200]", "qword ptr [rip + 0x200]", ADDRESS, {}, ADDRESS + 6 + 0x200),
    ("call qword ptr [rip - 0x100]", "qword ptr [rip - 0x100]", ADDRESS, {}, ADDRESS + 6 - 0x100),
    # Address wraps around the top of the address space.
    ("jmp qword ptr [rax - 8]", "qword ptr [rax - 8]", ADDRESS, {"rax": 4}, MASK64 - 3),
    (bytes.fromhex("ff24e0"), "qword ptr [rax + riz*8]", ADDRESS, {"rax": 0x602000}, 0x602000),
    # Prefixes that change nothing for the target.
    (bytes.fromhex("3effe0"), "rax", ADDRESS, {"rax": 0x401800}, "rax"),
    (bytes.fromhex("3eff1425f0000000"), "qword ptr ds:[0xf0]", ADDRESS, {}, 0xF0),
    (bytes.fromhex("f2ff2510000000"), "qword ptr [rip + 0x10]", ADDRESS, {}, ADDRESS + 7 + 0x10),
    (bytes.fromhex("2eff20"), "qword ptr cs:[rax]", ADDRESS, {"rax": 0x602000}, 0x602000),
    (bytes.fromhex("48ffe0"), "rax", ADDRESS, {"rax": 0x401800}, "rax"),
    # Segment overrides (keystone turns these into rip-relative operands).
    (bytes.fromhex("64ff242510000000"), "qword ptr fs:[0x10]", ADDRESS, {}, 0x7F00_0000_1010),
    (bytes.fromhex("65ff142508000000"), "qword ptr gs:[8]", ADDRESS, {}, 0x7E00_0000_2008),
    (bytes.fromhex("64ff20"), "qword ptr fs:[rax]", ADDRESS, {"rax": 0x28}, 0x7F00_0000_1028),
    (bytes.fromhex("65ff24c8"), "qword ptr gs:[rax + rcx*8]", ADDRESS,
     {"rax": 0x100, "rcx": 3}, 0x7E00_0000_2118),
    # Absolute addresses: disp32 is sign-extended in 64-bit addressing.
    (bytes.fromhex("ff242534126000"), "qword ptr [0x601234]", ADDRESS, {}, 0x601234),
    (bytes.fromhex("ff242500000080"), "qword ptr [0xffffffff80000000]", ADDRESS, {},
     0xFFFF_FFFF_8000_0000),
    # 32-bit address size: the sum is truncated, then a segment base is added.
    ("jmp qword ptr [eax]", "qword ptr [eax]", ADDRESS, {"rax": 0xDEAD_0000_0060_2000}, 0x602000),
    ("call qword ptr [r8d + 4]", "qword ptr [r8d + 4]", ADDRESS, {"r8": 0xFFFF_FFFF_FFFF_FFFE}, 2),
    (bytes.fromhex("67ff248510000000"), "qword ptr [eax*4 + 0x10]", ADDRESS,
     {"rax": 0x4000_0001}, 0x14),
    # Capstone shows disp32 sign-extended; the 32-bit address is not.
    (bytes.fromhex("67ff242500000080"), "qword ptr [0xffffffff80000000]", ADDRESS, {},
     0x8000_0000),
    (bytes.fromhex("67ff2500010000"), "qword ptr [eip + 0x100]", HIGH_ADDRESS, {},
     (HIGH_ADDRESS + 7 + 0x100) & 0xFFFF_FFFF),
    (bytes.fromhex("6467ff20"), "qword ptr fs:[eax]", ADDRESS, {"rax": 0x1_0000_0010},
     0x7F00_0000_1010),
]


@pytest.mark.parametrize("code, op_str, address, overrides, where", CASES,
                         ids=[code if isinstance(code, str) else code.hex() for code, *_ in CASES])
def test_operand_forms(code, op_str, address, overrides, where):
    if isinstance(code, str):
        code = assemble(code, address)
    site = make_site(code, address)
    assert site.op_str == op_str  # the bytes are the instruction the case means
    regs = base_regs() | {"rip": address} | overrides
    if isinstance(where, str):
        memory, expected = Memory(), regs[where]
    else:
        memory, expected = Memory({where: TARGET}), TARGET

    assert branch.branch_target(site, regs, memory) == expected

    effect = branch.emulate(site, regs, memory)
    assert effect.action == RESUME
    if site.mnemonic.endswith("call"):
        pushed = (regs["rsp"] - 8) & MASK64
        assert effect.regs == {"rsp": pushed, "rip": expected}
        assert effect.writes == [(pushed, site.end.to_bytes(8, "little"))]
    else:
        assert effect.regs == {"rip": expected}
        assert effect.writes == []


def test_call_pushes_the_address_after_the_site():
    site = make_site(assemble("call qword ptr [rax + 0x10]", ADDRESS))  # ff 50 10
    regs = base_regs() | {"rax": 0x603000, "rsp": 0x7FFF_FFFF_E010}
    effect = branch.emulate(site, regs, Memory({0x603010: TARGET}))
    assert effect.regs == {"rsp": 0x7FFF_FFFF_E008, "rip": TARGET}
    assert effect.writes == [(0x7FFF_FFFF_E008, (ADDRESS + 3).to_bytes(8, "little"))]
    # rsp wraps as the CPU's does.
    effect = branch.emulate(site, regs | {"rsp": 4}, Memory({0x603010: TARGET}))
    assert effect.regs["rsp"] == MASK64 - 3


@pytest.mark.parametrize("code, text", [
    ("48ff2c24", "ljmp [rsp]"),             # far jmp m16:64
    ("48ff1c24", "lcall [rsp]"),            # far call m16:64
    ("ff6c2408", "jmp ptr [rsp + 8]"),      # far jmp m16:32, which capstone calls jmp
    ("ff1c24", "call ptr [rsp]"),           # far call m16:32, which capstone calls call
    ("66ffe0", "jmp rax"),                  # 16-bit target on AMD, 64-bit on Intel
    ("66ff10", "call qword ptr [rax]"),
    ("c3", "ret"),
    ("e3fe", "jrcxz 0x401000"),
    ("e2fe", "loop 0x401000"),
    ("e9fb0f0000", "jmp 0x402000"),
])
def test_forms_left_to_the_cpu_step(code, text):
    site = make_site(bytes.fromhex(code))
    assert site.insn == text
    regs = base_regs() | {"rsp": 0x602000}
    memory = Memory({0x602000: TARGET, 0x602008: TARGET, regs["rax"]: TARGET})
    effect = branch.emulate(site, regs, memory)
    assert effect.action == STEP
    assert effect.regs == {} and effect.writes == []
    with pytest.raises(ValueError):
        branch.branch_target(site, regs, memory)


def test_unreadable_operand_steps_so_the_guest_faults_natively():
    site = make_site(assemble("call qword ptr [rax]", ADDRESS))
    regs = base_regs() | {"rax": 0}
    assert branch.emulate(site, regs, Memory()).action == STEP
    with pytest.raises(OSError):
        branch.branch_target(site, regs, Memory())


def test_operand_is_decoded_once(monkeypatch):
    site = make_site(assemble("jmp qword ptr [rbx + rsi*4 + 0x20]", ADDRESS))
    regs = base_regs() | {"rbx": 0x600000, "rsi": 2}
    memory = Memory({0x600028: TARGET})
    assert branch.branch_target(site, regs, memory) == TARGET
    assert "branch" in site.decoded

    def no_decoding(*args):
        raise AssertionError("a site was decoded a second time")

    monkeypatch.setattr(branch, "near_indirect", no_decoding)
    for _ in range(3):
        assert branch.branch_target(site, regs, memory) == TARGET
        assert branch.emulate(site, regs, memory).regs == {"rip": TARGET}
    # The stub is in force: a site not yet decoded does reach it.
    with pytest.raises(AssertionError):
        branch.emulate(make_site(site.original), regs, memory)


# --- random operands against a reference computation ------------------------

_NUMBER = {name: n for n, name in enumerate(GPRS)}
_SEGMENT_PREFIX = {"fs": b"\x64", "gs": b"\x65"}


def encode(is_call, segment, addr32, base, index, scale, disp) -> bytes:
    """`call`/`jmp qword ptr seg:[base + index*scale + disp32]` (base may be "rip")."""
    prefixes = (_SEGMENT_PREFIX[segment] if segment else b"") + (b"\x67" if addr32 else b"")
    reg = 2 if is_call else 4
    disp32 = disp.to_bytes(4, "little", signed=True)
    if base == "rip":
        return prefixes + bytes([0xFF, reg << 3 | 0b101]) + disp32
    rex = 0x40
    if index is None:
        index_field = 0b100
    else:
        index_field = _NUMBER[index] & 7
        rex |= (_NUMBER[index] >> 3) << 1
    if base is None:
        mod, base_field = 0b00, 0b101
    else:
        mod, base_field = 0b10, _NUMBER[base] & 7
        rex |= _NUMBER[base] >> 3
    sib = {1: 0, 2: 1, 4: 2, 8: 3}[scale] << 6 | index_field << 3 | base_field
    return (prefixes + (bytes([rex]) if rex != 0x40 else b"")
            + bytes([0xFF, mod << 6 | reg << 3 | 0b100, sib]) + disp32)


def scrambled(address: int) -> int:
    return (address * 0x9E37_79B9_7F4A_7C15 + 0x632B_E59B_D9B4_E019) & MASK64


def scrambled_memory(address: int, size: int) -> bytes:
    # Every address holds a different word, so a wrong address gives a wrong target.
    return scrambled(address).to_bytes(size, "little")


u64 = st.integers(0, MASK64)


@st.composite
def operands(draw):
    base = draw(st.sampled_from([None, "rip"] + GPRS))
    indexes = [None] + [r for r in GPRS if r != "rsp"]  # rsp's number means "no index"
    index = None if base == "rip" else draw(st.sampled_from(indexes))
    return dict(
        is_call=draw(st.booleans()),
        segment=draw(st.sampled_from([None, "fs", "gs"])),
        addr32=draw(st.booleans()),
        base=base, index=index,
        scale=draw(st.sampled_from([1, 2, 4, 8])),
        disp=draw(st.integers(-(1 << 31), (1 << 31) - 1)),
    )


@settings(max_examples=400, deadline=None)
@given(operand=operands(), values=st.lists(u64, min_size=18, max_size=18),
       address=st.integers(0x1000, 0x7FFF_FFFF_F000))
def test_random_operands_match_reference(operand, values, address):
    code = encode(**operand)
    site = make_site(code, address)
    regs = dict(zip(GPRS + ["fs_base", "gs_base"], values)) | {"rip": address}

    base, index = operand["base"], operand["index"]
    mask = 0xFFFF_FFFF if operand["addr32"] else MASK64
    ea = operand["disp"]
    ea += site.end if base == "rip" else regs[base] if base else 0
    ea += regs[index] * operand["scale"] if index else 0
    ea &= mask
    ea += regs[operand["segment"] + "_base"] if operand["segment"] else 0
    expected = scrambled(ea & MASK64)

    assert branch.branch_target(site, regs, scrambled_memory) == expected
    effect = branch.emulate(site, regs, scrambled_memory)
    assert effect.regs["rip"] == expected
    if operand["is_call"]:
        assert effect.regs["rsp"] == (regs["rsp"] - 8) & MASK64
        assert effect.writes == [(effect.regs["rsp"], site.end.to_bytes(8, "little"))]
    else:
        assert set(effect.regs) == {"rip"} and effect.writes == []


# --- the byte decoder against capstone's detail, over any ModRM, SIB and prefixes --

_DETAIL = Cs(CS_ARCH_X86, CS_MODE_64)
_DETAIL.detail = True


def _wide(name: str) -> str:
    return name if name in GPRS or name == "rip" else ("r" + name[1:] if name.startswith("e") else name[:-1])


def capstone_target(code: bytes, address: int, regs: dict, read):
    """(is_call, target) as capstone's operand detail gives them: the reference."""
    from capstone.x86 import X86_OP_REG
    insn = next(_DETAIL.disasm(code, address, 1))
    operand = insn.operands[0]
    is_call = insn.modrm >> 3 & 7 == 2
    if operand.type == X86_OP_REG:
        return is_call, regs[_wide(insn.reg_name(operand.reg))]
    mem = operand.mem
    ea = mem.disp
    if mem.base:
        base = _wide(insn.reg_name(mem.base))
        ea += address + insn.size if base == "rip" else regs[base]
    if mem.index and insn.reg_name(mem.index) not in ("riz", "eiz"):
        ea += regs[_wide(insn.reg_name(mem.index))] * mem.scale
    ea &= 0xFFFF_FFFF if insn.addr_size == 4 else MASK64
    if mem.segment:
        ea += regs.get(insn.reg_name(mem.segment) + "_base", 0)
    return is_call, int.from_bytes(read(ea & MASK64, 8), "little")


@st.composite
def indirect_encodings(draw):
    prefixes = draw(st.lists(st.sampled_from([0x64, 0x65, 0x2E, 0x3E, 0x26, 0x36, 0x67, 0xF2, 0xF3, 0x66,
                                              0xF0]), max_size=3))
    rex = draw(st.sampled_from([None] + list(range(0x40, 0x50))))
    modrm = draw(st.integers(0, 255)) & ~0x38 | draw(st.sampled_from([2, 4])) << 3
    tail = draw(st.binary(min_size=0, max_size=6))
    return bytes(prefixes) + (bytes([rex]) if rex is not None else b"") + bytes([0xFF, modrm]) + tail


@settings(max_examples=3000, deadline=None)
@given(code=indirect_encodings(), values=st.lists(u64, min_size=18, max_size=18),
       address=st.integers(0x1000, 0x7FFF_FFFF_F000))
def test_the_byte_decoder_agrees_with_capstone(code, values, address):
    """Wherever near_indirect decodes an instruction, capstone reads the same one and
    the same target; it declines only the forms it leaves to run natively."""
    from sbe.scanner.x86 import near_indirect
    insn = next(_DETAIL.disasm(code, address, 1), None)
    if insn is not None:
        code = code[:insn.size]
    decoded = near_indirect(code, address)
    if decoded is None:
        assert insn is None or insn.opcode[0] != 0xFF or _left_to_the_cpu(code[:code.index(0xFF)]), code.hex()
        return
    assert insn is not None and insn.size == len(code), code.hex()
    regs = dict(zip(GPRS + ["fs_base", "gs_base"], values)) | {"rip": address}
    site = Site(address, len(code), "branch", insn.mnemonic, insn.op_str, code)
    expected_call, expected = capstone_target(code, address, regs, scrambled_memory)
    assert decoded[0] == expected_call
    assert branch.branch_target(site, regs, scrambled_memory) == expected, (code.hex(), insn.op_str)


def _left_to_the_cpu(prefixes: bytes) -> bool:
    """Prefixes near_indirect declines: 0x66, lock and rep, one group twice, or a REX
    that does not come last (the CPU ignores it there)."""
    segments = sum(p in (0x64, 0x65, 0x2E, 0x3E, 0x26, 0x36) for p in prefixes)
    legacy = [p for p in prefixes if not 0x40 <= p <= 0x4F]
    misplaced_rex = any(0x40 <= p <= 0x4F for p in prefixes[:-1])
    return (bool({0x66, 0xF0, 0xF3} & set(prefixes)) or segments > 1 or misplaced_rex
            or len(legacy) != len(set(legacy)))
