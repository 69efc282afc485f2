"""Which instructions sbe virtualizes, and how each one passes control on.

The tables are keyed by capstone instruction id, which names each instruction
exactly once, however capstone spells it; the scanner decodes with `disasm_lite`,
which gives only text, so they are turned into mnemonic tables once, here (the
tests check over the opcode space that the two agree). capstone's own instruction
groups cannot stand in for them: cpuid, rdtsc and rdpkru have no group, rdtscp is
filed under 'privilege' although it runs in ring 3, and loop/loope/loopne are not
in 'jump' (tests/test_scanner_sensitive.py pins those quirks).
"""
from __future__ import annotations

import re

from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from capstone import x86_const as x

# Instruction -> site kind. For jmp, call, int and mov the kind holds only for some
# operands; classify() narrows them.
SENSITIVE: dict[int, str] = {
    x.X86_INS_SYSCALL: "syscall",
    x.X86_INS_SYSENTER: "syscall",
    x.X86_INS_CPUID: "cpuid",
    x.X86_INS_RDTSC: "rdtsc",
    x.X86_INS_RDTSCP: "rdtscp",
    # PKRU is the guest's memory-protection-key register: xrstor* can load it too.
    x.X86_INS_RDPKRU: "pkru",
    x.X86_INS_WRPKRU: "pkru",
    x.X86_INS_XRSTOR: "pkru",
    x.X86_INS_XRSTOR64: "pkru",
    x.X86_INS_XRSTORS: "pkru",
    x.X86_INS_XRSTORS64: "pkru",
    # Ring-0-only (they fault in ring 3), or platform state a virtual machine answers.
    x.X86_INS_HLT: "privileged",
    x.X86_INS_IN: "privileged",
    x.X86_INS_INSB: "privileged",
    x.X86_INS_INSW: "privileged",
    x.X86_INS_INSD: "privileged",
    x.X86_INS_OUT: "privileged",
    x.X86_INS_OUTSB: "privileged",
    x.X86_INS_OUTSW: "privileged",
    x.X86_INS_OUTSD: "privileged",
    x.X86_INS_CLI: "privileged",
    x.X86_INS_STI: "privileged",
    x.X86_INS_CLAC: "privileged",
    x.X86_INS_STAC: "privileged",
    x.X86_INS_LGDT: "privileged",
    x.X86_INS_LIDT: "privileged",
    x.X86_INS_LLDT: "privileged",
    x.X86_INS_LTR: "privileged",
    # Readable in ring 3 unless UMIP is on, and they reveal host tables either way.
    x.X86_INS_SGDT: "privileged",
    x.X86_INS_SIDT: "privileged",
    x.X86_INS_SLDT: "privileged",
    x.X86_INS_STR: "privileged",
    x.X86_INS_SMSW: "privileged",
    x.X86_INS_CLTS: "privileged",
    x.X86_INS_LMSW: "privileged",
    x.X86_INS_INVD: "privileged",
    x.X86_INS_WBINVD: "privileged",
    x.X86_INS_WBNOINVD: "privileged",
    x.X86_INS_INVLPG: "privileged",
    x.X86_INS_INVPCID: "privileged",
    x.X86_INS_RDMSR: "privileged",
    x.X86_INS_WRMSR: "privileged",
    x.X86_INS_SWAPGS: "privileged",
    x.X86_INS_SYSRET: "privileged",
    x.X86_INS_SYSRETQ: "privileged",
    x.X86_INS_SYSEXIT: "privileged",
    x.X86_INS_SYSEXITQ: "privileged",
    x.X86_INS_RSM: "privileged",
    x.X86_INS_RDPMC: "privileged",
    x.X86_INS_MONITOR: "privileged",
    x.X86_INS_MWAIT: "privileged",
    x.X86_INS_XSETBV: "privileged",
    x.X86_INS_XSAVES: "privileged",
    x.X86_INS_XSAVES64: "privileged",
    x.X86_INS_PCONFIG: "privileged",
    x.X86_INS_ENCLS: "privileged",
    x.X86_INS_ENCLV: "privileged",
    # Intel VMX and AMD SVM.
    x.X86_INS_VMCALL: "privileged",
    x.X86_INS_VMCLEAR: "privileged",
    x.X86_INS_VMFUNC: "privileged",
    x.X86_INS_VMLAUNCH: "privileged",
    x.X86_INS_VMPTRLD: "privileged",
    x.X86_INS_VMPTRST: "privileged",
    x.X86_INS_VMREAD: "privileged",
    x.X86_INS_VMRESUME: "privileged",
    x.X86_INS_VMWRITE: "privileged",
    x.X86_INS_VMXOFF: "privileged",
    x.X86_INS_VMXON: "privileged",
    x.X86_INS_INVEPT: "privileged",
    x.X86_INS_INVVPID: "privileged",
    x.X86_INS_VMMCALL: "privileged",
    x.X86_INS_VMRUN: "privileged",
    x.X86_INS_VMLOAD: "privileged",
    x.X86_INS_VMSAVE: "privileged",
    x.X86_INS_CLGI: "privileged",
    x.X86_INS_STGI: "privileged",
    x.X86_INS_SKINIT: "privileged",
    x.X86_INS_INVLPGA: "privileged",
    # Operand-dependent: int N except 0x80 (a syscall) and 3 (a breakpoint); mov to or
    # from a control or debug register; indirect jmp/call; far jmp/call, always indirect.
    x.X86_INS_INT: "privileged",
    x.X86_INS_MOV: "privileged",
    x.X86_INS_JMP: "branch",
    x.X86_INS_CALL: "branch",
    x.X86_INS_LJMP: "branch",
    x.X86_INS_LCALL: "branch",
}

# No fall-through: execution never reaches the next instruction. ud0/ud1/iretd and
# sysret/sysexit (which fault in ring 3) have none either; `int 3` is int3 spelled long.
TERMINATORS: frozenset[int] = frozenset({
    x.X86_INS_JMP, x.X86_INS_LJMP,
    x.X86_INS_RET, x.X86_INS_RETF, x.X86_INS_RETFQ,
    x.X86_INS_IRET, x.X86_INS_IRETD, x.X86_INS_IRETQ,
    x.X86_INS_SYSRET, x.X86_INS_SYSRETQ, x.X86_INS_SYSEXIT, x.X86_INS_SYSEXITQ,
    x.X86_INS_UD0, x.X86_INS_UD1, x.X86_INS_UD2,
    x.X86_INS_HLT, x.X86_INS_INT3,
})

# Branches whose immediate operand is an address that may be executed next. xbegin's
# is the transaction's abort handler.
DIRECT_BRANCHES: frozenset[int] = frozenset({
    x.X86_INS_JMP, x.X86_INS_CALL,
    x.X86_INS_JO, x.X86_INS_JNO, x.X86_INS_JB, x.X86_INS_JAE,
    x.X86_INS_JE, x.X86_INS_JNE, x.X86_INS_JBE, x.X86_INS_JA,
    x.X86_INS_JS, x.X86_INS_JNS, x.X86_INS_JP, x.X86_INS_JNP,
    x.X86_INS_JL, x.X86_INS_JGE, x.X86_INS_JLE, x.X86_INS_JG,
    x.X86_INS_JCXZ, x.X86_INS_JECXZ, x.X86_INS_JRCXZ,
    x.X86_INS_LOOP, x.X86_INS_LOOPE, x.X86_INS_LOOPNE,
    x.X86_INS_XBEGIN,
})

_names = Cs(CS_ARCH_X86, CS_MODE_64).insn_name
KIND_BY_MNEMONIC: dict[str, str] = {_names(i): kind for i, kind in SENSITIVE.items()}
_TERMINATOR_MNEMONICS = frozenset(map(_names, TERMINATORS))
_DIRECT_MNEMONICS = frozenset(map(_names, DIRECT_BRANCHES))

_SYSTEM_REGISTER = re.compile(r"\b[cd]r\d+\b")
_INT_VECTORS = {0x80: "syscall", 3: None}  # the 32-bit syscall gate; the breakpoint


def _is_immediate(op_str: str) -> bool:
    # Immediates print as numbers; registers and memory operands start with a letter or '['.
    return op_str[:1].isdigit()


# Each function below strips the prefixes capstone writes into the mnemonic
# ("notrack jmp", "xacquire lock add") with an inline rpartition: they run once per
# decoded instruction, where a helper call would be a noticeable share of the scan.

def classify(mnemonic: str, op_str: str) -> str | None:
    """The site kind of one `disasm_lite` instruction, or None if it runs natively."""
    name = mnemonic.rpartition(" ")[2]
    kind = KIND_BY_MNEMONIC.get(name)
    if kind is None:
        return None
    if name == "int":
        return _INT_VECTORS.get(int(op_str, 0), kind)
    if name == "mov":
        return kind if _SYSTEM_REGISTER.search(op_str) else None
    if name in ("jmp", "call") and _is_immediate(op_str):
        return None
    return kind


def is_terminator(mnemonic: str, op_str: str) -> bool:
    """Whether decoding past this instruction would be guessing, not following control."""
    name = mnemonic.rpartition(" ")[2]
    return name in _TERMINATOR_MNEMONICS or (name == "int" and int(op_str, 0) == 3)


def direct_target(mnemonic: str, op_str: str) -> int | None:
    """Where a branch may go that is known without running it, or None."""
    if mnemonic.rpartition(" ")[2] in _DIRECT_MNEMONICS and _is_immediate(op_str):
        return int(op_str, 0)
    return None
