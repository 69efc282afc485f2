"""Stub emission: the bytes of one site's stub at its address in a side cache.

    [before, relocated] [kind body, fields filled] [after, relocated] jmp -> window end

Displaced instructions are relocated (rip-relative operands re-aimed); the body comes
from sbe.patcher.stubs' templates; branch bodies re-encode the site's own operand as a
load of the target. Everything here is a function of bytes and addresses.
"""
from __future__ import annotations

from dataclasses import dataclass

from sbe.patcher import stubs
from sbe.patcher.relocate import ScratchInUse, load_operand, relocate


class EmitError(ValueError):
    pass


@dataclass
class Stub:
    code: bytes
    trap: int | None      # offset of the body's int3
    resume: int | None    # offset where the stub goes on after that trap
    displaced: tuple = () # (offset in the stub, original address) of each displaced insn


def _relocated(insns, original, window_start: int, at: int, placed: list) -> bytes:
    out = b""
    for insn in insns:
        raw = original[insn.address - window_start:insn.address - window_start + insn.size]
        placed.append((at + len(out), insn.address))
        out += relocate(raw, insn.address, at + len(out))
    return out


def compose(kind: str, site_insn, window, window_bytes: bytes, at: int, cache) -> Stub:
    """The stub for `site_insn` (its window's original bytes `window_bytes`) placed at
    `at` in `cache`."""
    try:
        placed: list = []
        code = _relocated(window.before, window_bytes, window.start, at, placed)
        site_raw = window_bytes[site_insn.address - window.start:site_insn.address - window.start + site_insn.size]
        here = at + len(code)
        trap = resume = None
        values = {"gadget_slot": cache.gadget_slot, "site_end": site_insn.address + site_insn.size,
                  "cpuid_table": cache.cpuid_table, "branch_table": cache.branch_slot}
        if kind == "syscall":
            body = stubs.syscall_body()
            code += stubs.fill(body, here, values)
            trap, resume = here - at + body.trap, here - at + body.trap + 2
        elif kind == "cpuid":
            body = stubs.cpuid_body()
            code += stubs.fill(body, here, values)
            trap, resume = here - at + body.trap, here - at + body.trap + 1
        elif kind in ("rdtsc", "rdtscp"):
            code += relocate(site_raw, site_insn.address, here)   # the host clock: native
        elif kind == "branch":
            is_call = site_insn.mnemonic.split()[-1] == "call"
            for scratch in ("r11", "r10"):
                head, tail = stubs.branch_parts(is_call, scratch)
                try:
                    load = load_operand(site_raw, site_insn.address, here + len(head.code), scratch,
                                        stubs.BRANCH_BIAS)
                    break
                except ScratchInUse:
                    continue
            else:
                raise EmitError("operand uses both scratch registers")
            code += head.code + load
            tail_at = at + len(code)
            code += stubs.fill(tail, tail_at, values)
            trap = tail_at - at + tail.trap
            return Stub(code, trap, None, _offsets(placed, at))   # a branch leaves for its target
        else:
            raise EmitError(f"no stub for kind {kind}")
        code += _relocated(window.after, window_bytes, window.start, at + len(code), placed)
        code += stubs.jmp5(at + len(code), window.end)
        return Stub(code, trap, resume, _offsets(placed, at))
    except ValueError as e:
        raise EmitError(str(e)) from None


def _offsets(placed, at: int) -> tuple:
    return tuple((address - at, original) for address, original in placed)
