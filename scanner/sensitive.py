"""Which instructions sbe virtualizes, and how each one passes control on.

The tables are keyed by the names capstone gives its instruction ids
(`cs_insn_name`), which name each instruction exactly once, however the decoder
spells it, and are what `disasm_lite` prints once prefixes are stripped: so they
apply to the scanner's text directly, and need no capstone to be read (importing
capstone's Python binding costs a warm start 50 ms). The tests check, over the
opcode space, that every name is one of capstone's and that the printed mnemonic
and the id agree. capstone's own instruction groups cannot stand in for them:
cpuid, rdtsc and rdpkru have no group, rdtscp is filed under 'privilege' although
it runs in ring 3, and loop/loope/loopne are not in 'jump'
(tests/test_scanner_sensitive.py pins those quirks).
"""
from __future__ import annotations

import re

# Instruction -> site kind. For jmp, call, int and mov the kind holds only for some
# operands; classify() narrows them.
SENSITIVE: dict[str, str] = {
    "syscall": "syscall",
    "sysenter": "syscall",
    "cpuid": "cpuid",
    "rdtsc": "rdtsc",
    "rdtscp": "rdtscp",
    # PKRU is the guest's memory-protection-key register: xrstor* can load it too.
    "rdpkru": "pkru",
    "wrpkru": "pkru",
    "xrstor": "pkru",
    "xrstor64": "pkru",
    "xrstors": "pkru",
    "xrstors64": "pkru",
    # Ring-0-only (they fault in ring 3), or platform state a virtual machine answers.
    "hlt": "privileged",
    "in": "privileged",
    "insb": "privileged",
    "insw": "privileged",
    "insd": "privileged",
    "out": "privileged",
    "outsb": "privileged",
    "outsw": "privileged",
    "outsd": "privileged",
    "cli": "privileged",
    "sti": "privileged",
    "clac": "privileged",
    "stac": "privileged",
    "lgdt": "privileged",
    "lidt": "privileged",
    "lldt": "privileged",
    "ltr": "privileged",
    # Readable in ring 3 unless UMIP is on, and they reveal host tables either way.
    "sgdt": "privileged",
    "sidt": "privileged",
    "sldt": "privileged",
    "str": "privileged",
    "smsw": "privileged",
    "clts": "privileged",
    "lmsw": "privileged",
    "invd": "privileged",
    "wbinvd": "privileged",
    "wbnoinvd": "privileged",
    "invlpg": "privileged",
    "invpcid": "privileged",
    "rdmsr": "privileged",
    "wrmsr": "privileged",
    "swapgs": "privileged",
    "sysret": "privileged",
    "sysretq": "privileged",
    "sysexit": "privileged",
    "sysexitq": "privileged",
    "rsm": "privileged",
    "rdpmc": "privileged",
    "monitor": "privileged",
    "mwait": "privileged",
    "xsetbv": "privileged",
    "xsaves": "privileged",
    "xsaves64": "privileged",
    "pconfig": "privileged",
    "encls": "privileged",
    "enclv": "privileged",
    # Intel VMX and AMD SVM.
    "vmcall": "privileged",
    "vmclear": "privileged",
    "vmfunc": "privileged",
    "vmlaunch": "privileged",
    "vmptrld": "privileged",
    "vmptrst": "privileged",
    "vmread": "privileged",
    "vmresume": "privileged",
    "vmwrite": "privileged",
    "vmxoff": "privileged",
    "vmxon": "privileged",
    "invept": "privileged",
    "invvpid": "privileged",
    "vmmcall": "privileged",
    "vmrun": "privileged",
    "vmload": "privileged",
    "vmsave": "privileged",
    "clgi": "privileged",
    "stgi": "privileged",
    "skinit": "privileged",
    "invlpga": "privileged",
    # Operand-dependent: int N except 0x80 (a syscall) and 3 (a breakpoint); mov to or
    # from a control or debug register; indirect jmp/call; far jmp/call, always indirect.
    "int": "privileged",
    "mov": "privileged",
    "jmp": "branch",
    "call": "branch",
    "ljmp": "branch",
    "lcall": "branch",
}

# No fall-through: execution never reaches the next instruction. ud0/ud1/iretd and
# sysret/sysexit (which fault in ring 3) have none either; `int 3` is int3 spelled long.
TERMINATORS: frozenset[str] = frozenset({
    "jmp", "ljmp",
    "ret", "retf", "retfq",
    "iret", "iretd", "iretq",
    "sysret", "sysretq", "sysexit", "sysexitq",
    "ud0", "ud1", "ud2",
    "hlt", "int3",
})

# Branches whose immediate operand is an address that may be executed next. xbegin's
# is the transaction's abort handler.
DIRECT_BRANCHES: frozenset[str] = frozenset({
    "jmp", "call",
    "jo", "jno", "jb", "jae",
    "je", "jne", "jbe", "ja",
    "js", "jns", "jp", "jnp",
    "jl", "jge", "jle", "jg",
    "jcxz", "jecxz", "jrcxz",
    "loop", "loope", "loopne",
    "xbegin",
})

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
    kind = SENSITIVE.get(name)
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
    return name in TERMINATORS or (name == "int" and int(op_str, 0) == 3)


def direct_target(mnemonic: str, op_str: str) -> int | None:
    """Where a branch may go that is known without running it, or None."""
    if mnemonic.rpartition(" ")[2] in DIRECT_BRANCHES and _is_immediate(op_str):
        return int(op_str, 0)
    return None
