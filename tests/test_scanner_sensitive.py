"""The site table and control-flow rules, checked against real encodings."""
from __future__ import annotations

import itertools

import capstone
import pytest
from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from capstone import x86_const as x
from hypothesis import given, settings
from hypothesis import strategies as st

from sbe.scanner.sensitive import (DIRECT_BRANCHES, SENSITIVE, TERMINATORS, classify, direct_target,
                                   is_terminator)

LITE = Cs(CS_ARCH_X86, CS_MODE_64)
# The tables by instruction id: every id capstone names with a name they hold.
NAMES = {i: LITE.insn_name(i) for i in range(1, x.X86_INS_ENDING)}
SENSITIVE_IDS = {i: SENSITIVE[name] for i, name in NAMES.items() if name in SENSITIVE}
TERMINATOR_IDS = {i for i, name in NAMES.items() if name in TERMINATORS}
DIRECT_IDS = {i for i, name in NAMES.items() if name in DIRECT_BRANCHES}
DETAIL = Cs(CS_ARCH_X86, CS_MODE_64)
DETAIL.detail = True
ADDRESS = 0x401000


def lite(hex_bytes: str) -> tuple[str, str]:
    """The first instruction of `hex_bytes`, as disasm_lite's mnemonic and operands."""
    (_, _, mnemonic, op_str), *_ = LITE.disasm_lite(bytes.fromhex(hex_bytes), ADDRESS)
    return mnemonic, op_str


def detailed(hex_bytes: str) -> capstone.CsInsn:
    return next(DETAIL.disasm(bytes.fromhex(hex_bytes), ADDRESS))


def groups(hex_bytes: str) -> set[str]:
    insn = detailed(hex_bytes)
    return {insn.group_name(g) for g in insn.groups}


# -- capstone quirks the tables work around; a capstone upgrade that changes any of
# -- them must make someone look at scanner/sensitive.py again.

def test_capstone_is_the_5_0_series():
    assert capstone.__version__.startswith("5.0.")


def test_capstone_groups_miss_sensitive_instructions():
    assert groups("0fa2") == set()       # cpuid: no group at all
    assert groups("0f31") == set()       # rdtsc
    assert groups("0f01ee") == set()     # rdpkru
    assert groups("0f01ef") == set()     # wrpkru
    assert groups("0f32") == set()       # rdmsr, though ring-0 only
    assert groups("0f06") == set()       # clts, likewise


def test_capstone_files_rdtscp_as_privileged():
    assert "privilege" in groups("0f01f9")


def test_capstone_loop_is_not_a_jump():
    for encoding in ("e2fe", "e1fe", "e0fe"):  # loop, loope, loopne
        assert "jump" not in groups(encoding)
        assert "branch_relative" in groups(encoding)


def test_capstone_far_jmp_without_rex_is_plain_jmp():
    # ff /5 with no prefix: a far jump through memory, which capstone files under
    # X86_INS_JMP and prints as "jmp ptr [...]"; only with REX.W or 0x66 is it "ljmp".
    assert detailed("ff28").id == x.X86_INS_JMP
    assert lite("ff28") == ("jmp", "ptr [rax]")
    assert lite("48ff28") == ("ljmp", "[rax]")
    assert lite("66ff28") == ("ljmp", "[rax]")
    assert lite("ff18") == ("call", "ptr [rax]")
    assert lite("48ff18") == ("lcall", "[rax]")


def test_capstone_writes_prefixes_into_the_mnemonic():
    assert lite("3effe0") == ("notrack jmp", "rax")
    assert lite("f2ffd0") == ("bnd call", "rax")
    assert lite("f3c3") == ("repz ret", "")
    assert lite("f2f0830001") == ("xacquire lock add", "dword ptr [rax], 1")


def test_capstone_prints_small_immediates_in_decimal():
    assert lite("cd03") == ("int", "3")
    assert lite("cd80") == ("int", "0x80")
    assert list(LITE.disasm_lite(bytes.fromhex("eb00"), 0)) == [(0, 2, "jmp", "2")]


def test_capstone_ignores_prefixes_that_make_other_instructions():
    # f3 0f 01 ee is CLUI and f3 0f 01 d9 VMGEXIT; capstone 5.0 knows neither and
    # decodes the prefix-less instruction instead.
    assert lite("f30f01ee") == ("rdpkru", "")
    assert lite("f30f01d9") == ("vmmcall", "")


def test_capstone_decodes_ud0_and_ud1_without_modrm():
    assert next(LITE.disasm_lite(bytes.fromhex("0fb9c0"), 0))[1] == 2
    assert next(LITE.disasm_lite(bytes.fromhex("0fffc0"), 0))[1] == 2


def test_capstone_rejects_what_64_bit_mode_lacks():
    for invalid in ("ce", "9a000000000000", "ea000000000000", "0f01e8"):  # into, far call/jmp imm, serialize
        assert list(LITE.disasm_lite(bytes.fromhex(invalid), 0)) == []


# -- classification of real encodings. Each row names the instruction as capstone
# -- prints it, so a wrong hand-written encoding fails loudly instead of testing nothing.

CLASSIFIED = [
    # syscall
    ("0f05", "syscall", "syscall"),
    ("480f05", "syscall", "syscall"),
    ("0f34", "sysenter", "syscall"),
    ("cd80", "int 0x80", "syscall"),
    # cpuid, rdtsc, rdtscp
    ("0fa2", "cpuid", "cpuid"),
    ("0f31", "rdtsc", "rdtsc"),
    ("0f01f9", "rdtscp", "rdtscp"),
    # pkru
    ("0f01ee", "rdpkru", "pkru"),
    ("0f01ef", "wrpkru", "pkru"),
    ("0fae6c2440", "xrstor ptr [rsp + 0x40]", "pkru"),
    ("480fae28", "xrstor64 ptr [rax]", "pkru"),
    ("0fc718", "xrstors ptr [rax]", "pkru"),
    ("480fc718", "xrstors64 ptr [rax]", "pkru"),
    # privileged
    ("f4", "hlt", "privileged"),
    ("ec", "in al, dx", "privileged"),
    ("e510", "in eax, 0x10", "privileged"),
    ("ee", "out dx, al", "privileged"),
    ("e680", "out 0x80, al", "privileged"),
    ("6c", "insb byte ptr [rdi], dx", "privileged"),
    ("f36d", "rep insd dword ptr [rdi], dx", "privileged"),
    ("666e", "outsb dx, byte ptr [rsi]", "privileged"),
    ("666f", "outsw dx, word ptr [rsi]", "privileged"),
    ("fa", "cli", "privileged"),
    ("fb", "sti", "privileged"),
    ("0f01ca", "clac", "privileged"),
    ("0f0110", "lgdt [rax]", "privileged"),
    ("0f0118", "lidt [rax]", "privileged"),
    ("0f0010", "lldt word ptr [rax]", "privileged"),
    ("0f0018", "ltr word ptr [rax]", "privileged"),
    ("0f0100", "sgdt [rax]", "privileged"),
    ("0f0108", "sidt [rax]", "privileged"),
    ("0f0000", "sldt word ptr [rax]", "privileged"),
    ("0f0008", "str word ptr [rax]", "privileged"),
    ("0f01e0", "smsw eax", "privileged"),
    ("0f06", "clts", "privileged"),
    ("0f0130", "lmsw word ptr [rax]", "privileged"),
    ("0f08", "invd", "privileged"),
    ("0f09", "wbinvd", "privileged"),
    ("0f0138", "invlpg byte ptr [rax]", "privileged"),
    ("660f388208", "invpcid rcx, xmmword ptr [rax]", "privileged"),
    ("0f32", "rdmsr", "privileged"),
    ("0f30", "wrmsr", "privileged"),
    ("0f01f8", "swapgs", "privileged"),
    ("0f07", "sysret", "privileged"),
    ("480f07", "sysretq", "privileged"),
    ("0f35", "sysexit", "privileged"),
    ("0f20c0", "mov rax, cr0", "privileged"),
    ("0f22d8", "mov cr3, rax", "privileged"),
    ("440f20c0", "mov rax, cr8", "privileged"),
    ("0f21f8", "mov rax, dr7", "privileged"),
    ("0f23c0", "mov dr0, rax", "privileged"),
    ("0f33", "rdpmc", "privileged"),
    ("0f01c8", "monitor", "privileged"),
    ("0f01c9", "mwait", "privileged"),
    ("0f01d1", "xsetbv", "privileged"),
    ("0fc728", "xsaves ptr [rax]", "privileged"),
    ("0f01c1", "vmcall", "privileged"),
    ("0f01c2", "vmlaunch", "privileged"),
    ("0f01c3", "vmresume", "privileged"),
    ("0f01c4", "vmxoff", "privileged"),
    ("f30fc730", "vmxon qword ptr [rax]", "privileged"),
    ("660fc730", "vmclear qword ptr [rax]", "privileged"),
    ("0fc730", "vmptrld qword ptr [rax]", "privileged"),
    ("0f7800", "vmread qword ptr [rax], rax", "privileged"),
    ("0f7900", "vmwrite rax, qword ptr [rax]", "privileged"),
    ("0f01d4", "vmfunc", "privileged"),
    ("660f388000", "invept rax, xmmword ptr [rax]", "privileged"),
    ("0f01d9", "vmmcall", "privileged"),
    ("0f01d8", "vmrun rax", "privileged"),
    ("0f01dd", "clgi", "privileged"),
    ("cd21", "int 0x21", "privileged"),
    ("cd04", "int 4", "privileged"),
    ("cdff", "int 0xff", "privileged"),
    # branch
    ("ffe0", "jmp rax", "branch"),
    ("41ffe3", "jmp r11", "branch"),
    ("ff20", "jmp qword ptr [rax]", "branch"),
    ("ff2510000000", "jmp qword ptr [rip + 0x10]", "branch"),
    ("64ff142510000000", "call qword ptr fs:[0x10]", "branch"),
    ("ffd0", "call rax", "branch"),
    ("ff14c5f8ffffff", "call qword ptr [rax*8 - 8]", "branch"),
    ("3effe0", "notrack jmp rax", "branch"),
    ("3eff10", "notrack call qword ptr ds:[rax]", "branch"),
    ("f2ffe0", "bnd jmp rax", "branch"),
    ("f2ff2510000000", "bnd jmp qword ptr [rip + 0x10]", "branch"),
    ("ff28", "jmp ptr [rax]", "branch"),
    ("48ff28", "ljmp [rax]", "branch"),
    ("ff18", "call ptr [rax]", "branch"),
    ("48ff18", "lcall [rax]", "branch"),
    # not sites
    ("eb00", "jmp 0x401002", None),
    ("e9fbffffff", "jmp 0x401000", None),
    ("e800000000", "call 0x401005", None),
    ("f2e800000000", "bnd call 0x401006", None),
    ("7500", "jne 0x401002", None),
    ("e2fe", "loop 0x401000", None),
    ("c3", "ret", None),
    ("f2c3", "bnd ret", None),
    ("cc", "int3", None),
    ("cd03", "int 3", None),
    ("f1", "int1", None),
    ("4889d8", "mov rax, rbx", None),
    ("64488b042528000000", "mov rax, qword ptr fs:[0x28]", None),
    ("b80f050000", "mov eax, 0x50f", None),
    ("f0830001", "lock add dword ptr [rax], 1", None),
    ("f3a4", "rep movsb byte ptr [rdi], byte ptr [rsi]", None),
    ("f30f1efa", "endbr64", None),
    ("90", "nop", None),
    ("0fae20", "xsave ptr [rax]", None),
    ("0fae642440", "xsave ptr [rsp + 0x40]", None),
    ("0f01d0", "xgetbv", None),
    ("0fc7f0", "rdrand eax", None),
    ("f30fc7f8", "rdpid rax", None),
    ("0f0b", "ud2", None),
]


@pytest.mark.parametrize("encoding, text, kind", CLASSIFIED, ids=[row[1] for row in CLASSIFIED])
def test_classify(encoding, text, kind):
    mnemonic, op_str = lite(encoding)
    assert f"{mnemonic} {op_str}".strip() == text
    assert classify(mnemonic, op_str) == kind


def test_every_kind_is_covered():
    from sbe.meta.site import KINDS
    assert {kind for _, _, kind in CLASSIFIED} - {None} == set(KINDS)
    assert set(SENSITIVE.values()) == set(KINDS)


def test_the_tables_name_capstone_instructions_once():
    """A misspelt name would silently never match; two ids of one name would make
    the tables say one thing of two instructions."""
    assert set(SENSITIVE) | TERMINATORS | DIRECT_BRANCHES <= set(NAMES.values())
    assert len(set(NAMES.values())) == len(NAMES)


def test_the_tables_need_no_capstone_binding():
    """The scanner's tables, its C scan and the branch decoder load without capstone's
    Python binding, which costs every start 50 ms: a warm run decodes nothing."""
    import subprocess
    import sys
    code = ("import sys; from sbe.scanner import scan, sensitive, window; from sbe.handlers import dispatch;"
            "from sbe.patcher import patcher; assert scan.lib is not None, 'the C scan did not load';"
            "assert 'capstone' not in sys.modules, 'capstone was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("encoding, target", [
    ("eb00", ADDRESS + 2),
    ("ebfe", ADDRESS),
    ("e9fb0f0000", ADDRESS + 0x1000),
    ("e800000000", ADDRESS + 5),
    ("f2e800000000", ADDRESS + 6),       # bnd call
    ("7405", ADDRESS + 7),               # je rel8
    ("0f8f00010000", ADDRESS + 0x106),   # jg rel32
    ("e2fe", ADDRESS),                   # loop
    ("e1fe", ADDRESS),                   # loope
    ("e0fe", ADDRESS),                   # loopne
    ("e3fe", ADDRESS),                   # jrcxz
    ("67e3fe", ADDRESS + 1),             # jecxz
    ("c7f810000000", ADDRESS + 0x16),    # xbegin: the abort handler
    ("ffe0", None),
    ("ff25f0ffffff", None),
    ("ffd0", None),
    ("48ff28", None),
    ("c3", None),
    ("0f05", None),
    ("b800104000", None),                # mov eax, 0x401000: an immediate, but no branch
])
def test_direct_target(encoding, target):
    assert direct_target(*lite(encoding)) == target


def test_direct_target_reads_decimal_targets():
    (_, _, mnemonic, op_str), = LITE.disasm_lite(bytes.fromhex("eb04"), 0)
    assert direct_target(mnemonic, op_str) == 6


@pytest.mark.parametrize("encoding, ends", [
    ("ebfe", True), ("ffe0", True), ("3effe0", True), ("f2ff20", True), ("ff28", True),
    ("48ff28", True), ("c3", True), ("f2c3", True), ("f3c3", True), ("c20800", True),
    ("cb", True), ("48cb", True), ("48cf", True), ("0f0b", True), ("f4", True),
    ("cc", True), ("cd03", True), ("0f07", True),
    ("e800000000", False), ("ffd0", False), ("48ff18", False), ("7400", False),
    ("e2fe", False), ("0f05", False), ("cd80", False), ("cd21", False), ("90", False),
    ("c7f800000000", False), ("0fa2", False),
])
def test_is_terminator(encoding, ends):
    assert is_terminator(*lite(encoding)) is ends


# -- the tables are written by instruction id but applied to printed mnemonics; these
# -- check, over much of the opcode space, that the two say the same thing.

OPERAND_DEPENDENT = {"int", "mov", "jmp", "call"}


def check_names_agree_with_ids(insn: capstone.CsInsn) -> None:
    name = insn.mnemonic.rpartition(" ")[2]
    kind = classify(insn.mnemonic, insn.op_str)
    if insn.id in SENSITIVE_IDS and name not in OPERAND_DEPENDENT:
        assert kind == SENSITIVE_IDS[insn.id], insn
    if kind is not None:
        assert insn.id in SENSITIVE_IDS, insn
    if is_terminator(insn.mnemonic, insn.op_str) and name != "int":
        assert insn.id in TERMINATOR_IDS, insn
    elif insn.id in TERMINATOR_IDS:
        assert False, f"{insn} has no fall-through but is not a terminator"
    if direct_target(insn.mnemonic, insn.op_str) is not None:
        assert insn.id in DIRECT_IDS, insn
    elif insn.id in DIRECT_IDS:
        assert not insn.op_str[:1].isdigit(), insn


def opcode_space():
    """One- to three-byte opcodes with every ModRM class, under common prefixes."""
    modrms = [f"{m:02x}" for m in itertools.chain(range(0, 0x40, 8), range(0xC0, 0x100))]
    short = [f"{op:02x}" for op in range(256)] + [f"0f{op:02x}" for op in range(256)]
    long = [f"0f38{op:02x}" for op in range(256)] + [f"0f3a{op:02x}" for op in range(256)]
    for prefixes, opcodes in ((["", "66", "f2", "f3", "48", "f348", "4c"], short),
                              (["", "66", "f2", "f3"], long)):
        for prefix, opcode, modrm in itertools.product(prefixes, opcodes, modrms):
            yield bytes.fromhex(prefix + opcode + modrm + "00" * 12)


def test_names_agree_with_ids_over_the_opcode_space():
    seen = set()
    plain = Cs(CS_ARCH_X86, CS_MODE_64)
    for code in opcode_space():
        for insn in plain.disasm(code, ADDRESS, 1):
            seen.add(insn.id)
            check_names_agree_with_ids(insn)
    # The walk must have met every instruction the tables name, or it checked little.
    # jcxz is the one that cannot occur: 64-bit mode has no 16-bit address size.
    missed = {NAMES[i] for i in (set(SENSITIVE_IDS) | TERMINATOR_IDS | DIRECT_IDS) - seen}
    assert missed == {"jcxz"}


@settings(max_examples=3000, deadline=None)
@given(st.binary(min_size=1, max_size=16))
def test_names_agree_with_ids_on_any_bytes(code):
    for insn in Cs(CS_ARCH_X86, CS_MODE_64).disasm(code, ADDRESS, 1):
        check_names_agree_with_ids(insn)
