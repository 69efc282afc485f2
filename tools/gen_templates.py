"""Writes patcher/templates.py: the patch-mode stub templates as literal bytes.

The stubs are written here in assembly, as rr keeps its in
`src/assembly_templates.py`, and keystone assembles them only when this script runs,
so sbe needs no assembler at run time. What each body does, and why, is said by its
function in sbe.patcher.stubs.

A field (a rel32 the emitter fills in per site) is written `[rip + {name}]`. It is
found by assembling the text again with that one marker changed: the four bytes that
differ are the field, so no other bytes can be mistaken for it. The trap is the first
`int3` in capstone's decoding of the result, not the first 0xcc byte.

    .venv/bin/python tools/gen_templates.py     # rewrites patcher/templates.py

tests/test_patcher_stubs.py runs `generate()` and compares it with the committed
module, so a change here, to the constants in sbe.patcher.stubs or to the syscall
table that is not regenerated fails the suite.
"""
from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

from capstone import CS_ARCH_X86, CS_MODE_64, Cs
from keystone import KS_ARCH_X86, KS_MODE_64, Ks

from sbe.meta.syscalls import TRAPS_IN_STUB, name
from sbe.patcher.stubs import BRANCH_BIAS, CPUID_ANY_SUBLEAF, CPUID_END, CPUID_ENTRY, RED_ZONE

OUTPUT = Path(__file__).resolve().parents[1] / "patcher" / "templates.py"
SCRATCH = ("r10", "r11")

# Each field's marker, a disp32 whatever the instruction; the committed bytes hold it.
MARKERS = {"gadget_slot": 0x11111111, "site_end": 0x22222222,
           "cpuid_table": 0x33333333, "branch_table": 0x44444444}
_OTHER_MARKER = 0x77777777   # differs from every marker in each of its four bytes


def syscall_text(at: dict) -> str:
    # The check leaves flags alone (`lea` and `jrcxz`, no pushfq/popfq, whose popfq
    # is the costliest instruction a stub would run), and compares the low 32 bits,
    # the number as the kernel reads it. rcx is free: the syscall overwrites it.
    checks = "\n".join(f"lea ecx, [rax - {nr}]\njrcxz trap" for nr in TRAPS_IN_STUB)
    return f"""
        lea rsp, [rsp - {RED_ZONE}]
        {checks}
        lea rcx, [rip + back]
        push rcx
        jmp qword ptr [rip + {at['gadget_slot']}]
    back:
        lea rsp, [rsp + {RED_ZONE + 8}]
        jmp done
    trap:
        lea rsp, [rsp + {RED_ZONE}]
        int3
        int3
    done:
        lea rcx, [rip + {at['site_end']}]
    """


def cpuid_text(at: dict) -> str:
    return f"""
        lea rsp, [rsp - {RED_ZONE}]
        pushfq
        push rsi
        lea rsi, [rip + {at['cpuid_table']}]
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
        add rsi, {CPUID_ENTRY}
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
    """


def _other(scratch: str) -> str:
    return "r10" if scratch == "r11" else "r11"


def branch_head_text(scratch: str) -> str:
    return f"""
        lea rsp, [rsp - {RED_ZONE}]
        lea rsp, [rsp - 8]
        push {scratch}
        push {_other(scratch)}
        push rcx
    """


def _check_text(scratch: str, at: dict, hit: str) -> str:
    """The branch table check of the target in `scratch`: a miss restores everything
    and traps; a hit runs `hit` with the three pushes still on the stack."""
    other = _other(scratch)
    return f"""
        movzx {other}d, {scratch}w
        mov rcx, qword ptr [rip + {at['branch_table']}]
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
        {hit}
        pop rcx
        pop {other}
        pop {scratch}
    """


def branch_tail_text(is_call: bool, scratch: str, at: dict) -> str:
    other = _other(scratch)
    push_call = f"""
        lea {other}, [rip + {at['site_end']}]
        mov qword ptr [rsp + {BRANCH_BIAS - 8}], {other}
    """ if is_call else ""
    return _check_text(scratch, at, f"""
        mov qword ptr [rsp + 24], {scratch}
        {push_call}
    """) + f"""
        lea rsp, [rsp + {RED_ZONE if is_call else RED_ZONE + 8}]
        jmp qword ptr [rsp - {RED_ZONE if is_call else RED_ZONE + 8}]
    """


def branch_slot_text(scratch: str, at: dict) -> str:
    """The check of a slot call (scanner.window.slot_call): a hit leaves the target
    at [rsp - 8] as the site sees rsp, restores everything, and the emitter's jump
    to the window's `call [rsp - 8]` follows."""
    return _check_text(scratch, at, f"""
        mov qword ptr [rsp + {24 + RED_ZONE}], {scratch}
    """) + f"""
        lea rsp, [rsp + {RED_ZONE + 8}]
    """


def branch_guard_text(scratch: str, at: dict) -> str:
    """The check of a guarded site (scanner.window.Window.guard): a hit restores
    everything and goes on to the site itself (the emitter's jump back follows)."""
    return _check_text(scratch, at, "") + f"""
        lea rsp, [rsp + {RED_ZONE + 8}]
    """


_KS = Ks(KS_ARCH_X86, KS_MODE_64)
_CS = Cs(CS_ARCH_X86, CS_MODE_64)


def _assemble(text: str) -> bytes:
    return bytes(_KS.asm(text, 0)[0])


def _field(text_of, name: str, code: bytes) -> int | None:
    """The offset of field `name`'s rel32 in `code`, or None when the text has none."""
    moved = _assemble(text_of({**MARKERS, name: _OTHER_MARKER}))
    differ = [i for i, (a, b) in enumerate(zip(code, moved)) if a != b]
    if not differ:
        return None
    if len(moved) != len(code) or differ != list(range(differ[0], differ[0] + 4)):
        raise ValueError(f"field {name} is not one rel32: bytes {differ} differ")
    return differ[0]


def template(text_of) -> tuple:
    """(code, {field: offset of its rel32}, offset of the first int3 or None) of the
    text `text_of(markers)`."""
    code = _assemble(text_of(MARKERS))
    fields = {name: at for name in MARKERS if (at := _field(text_of, name, code)) is not None}
    insns = list(_CS.disasm(code, 0))
    if sum(insn.size for insn in insns) != len(code):
        raise ValueError(f"template {code.hex()} does not decode whole")
    trap = next((insn.address for insn in insns if insn.mnemonic == "int3"), None)
    return code, fields, trap


def templates() -> dict:
    """Every template, by the name the generated module gives it."""
    return {
        "SYSCALL": template(syscall_text),
        "CPUID": template(cpuid_text),
        "BRANCH_HEADS": {scratch: template(lambda at: branch_head_text(scratch))
                         for scratch in SCRATCH},
        "BRANCH_TAILS": {(is_call, scratch): template(partial(branch_tail_text, is_call, scratch))
                         for is_call in (False, True) for scratch in SCRATCH},
        "BRANCH_GUARDS": {scratch: template(partial(branch_guard_text, scratch)) for scratch in SCRATCH},
        "BRANCH_SLOTS": {scratch: template(partial(branch_slot_text, scratch)) for scratch in SCRATCH},
    }


def _py(value) -> str:
    return repr(value).replace("'", '"')


def _literal(value: tuple, indent: str) -> str:
    """A template as Python source, one instruction's bytes a line beside its text."""
    code, fields, trap = value
    rows = "".join(f"{indent}        {_py(insn.bytes.hex()):<20}  # {insn.address:2}: "
                   f"{insn.mnemonic} {insn.op_str}".rstrip() + "\n"
                   for insn in _CS.disasm(code, 0))
    return (f"(\n{indent}    bytes.fromhex(\n{rows}{indent}    ),\n"
            f"{indent}    {_py(fields)},\n{indent}    {trap},\n{indent})")


HEADER = '''"""Stub templates as literal bytes. GENERATED by tools/gen_templates.py: do not edit.

Each template is (code, {field: offset of its rel32 in code}, offset of its trap
`int3` or None); sbe.patcher.stubs gives them meaning. After a change to the
assembly text in tools/gen_templates.py, to the constants in sbe.patcher.stubs or to
sbe.meta.syscalls.TRAPS_IN_STUB, rewrite this file with
`.venv/bin/python tools/gen_templates.py`.
"""
'''


def generate() -> str:
    """The source of patcher/templates.py."""
    out = [HEADER, "\n# The syscalls SYSCALL traps for: sbe.meta.syscalls.TRAPS_IN_STUB when generated.\n",
           f"TRAPS_IN_STUB = {TRAPS_IN_STUB!r}  # {', '.join(map(name, TRAPS_IN_STUB))}\n"]
    for label, value in templates().items():
        if isinstance(value, tuple):
            out.append(f"\n{label} = {_literal(value, '')}\n")
        else:
            entries = "".join(f"    {_py(key)}: {_literal(each, '    ')},\n" for key, each in value.items())
            out.append(f"\n{label} = {{\n{entries}}}\n")
    return "".join(out)


def main() -> int:
    OUTPUT.write_text(generate())
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
