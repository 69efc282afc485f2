"""Stub emission: the bytes of one site's stub at its address in a side cache.

    [before, relocated] [kind body, fields filled] [after, relocated] jmp -> window end

(a guarded branch: [before, relocated] [the target's check] jmp -> the site itself;
a slot call: [before, relocated] [the target's check] jmp -> the window's last 4
bytes, `call [rsp - 8]`)

Displaced instructions are relocated (rip-relative operands re-aimed); the body comes
from sbe.patcher.stubs' templates; branch bodies re-encode the site's own operand as a
load of the target. Everything here is a function of bytes and addresses.
"""
from __future__ import annotations

import struct

from sbe.meta.record import Record
from sbe.patcher import stubs
from sbe.scanner.window import SLOT_CALL, slot_call
from sbe.scanner.x86 import MASK64


class EmitError(ValueError):
    pass


class Stub(Record):
    __slots__ = ("code", "trap", "resume", "displaced", "fields")

    def __init__(self, code: bytes, trap: int | None, resume: int | None, displaced: tuple = (),
                 fields: tuple = ()) -> None:
        self.code = code
        self.trap = trap            # offset of the body's int3
        self.resume = resume        # offset where the stub goes on after that trap
        # (offset in the stub, original address) of each point where the guest's
        # state is that of an original instruction: each displaced one's, and a slot
        # call's check, which a thread found on the slot call is sent back to.
        self.displaced = displaced
        # (offset in the stub, target, "guest" or "cache", bytes from the field's end
        # to the end of its instruction, whence the rel32 counts) of each rel32 it
        # holds: what `placed` re-aims when the same stub is wanted for code mapped
        # elsewhere.
        self.fields = fields


_REL32 = struct.Struct("<i")

# The body fields that name the side cache's header; the others name guest code.
_CACHE_FIELDS = frozenset({"gadget_slot", "cpuid_table", "branch_table"})


def _relocated(relocate, insns, original, window_start: int, at: int, placed: list, fields: list,
               stub_at: int) -> bytes:
    out = b""
    for insn in insns:
        raw = original[insn.address - window_start:insn.address - window_start + insn.size]
        placed.append((at + len(out), insn.address))
        out += _aimed(relocate, raw, insn.address, at + len(out), fields, stub_at)
    return out


def _aimed(encode, raw, old: int, new: int, fields: list, stub_at: int, *args) -> bytes:
    """`encode`'s instruction at `new`, its re-aimed rel32 (if any) noted in `fields`."""
    found: list = []
    code = encode(raw, old, new, *args, fields=found)
    for offset, target, mask, tail in found:
        fields.append((new - stub_at + offset, target, "guest" if mask == MASK64 else "guest32", tail))
    return code


def _filled(body, here: int, values: dict, fields: list, stub_at: int) -> bytes:
    for name, offset in body.fields.items():
        fields.append((here - stub_at + offset, values[name], "cache" if name in _CACHE_FIELDS else "guest", 0))
    return stubs.fill(body, here, values)


def compose(kind: str, site_insn, window, window_bytes: bytes, at: int, cache) -> Stub:
    """The stub for `site_insn` (its window's original bytes `window_bytes`) placed at
    `at` in `cache`."""
    # Here, not at import: relocation decodes with capstone, whose binding costs 50
    # ms to load, and a warm run places the stubs the scan cache kept instead.
    from sbe.patcher.relocate import ScratchInUse, load_operand, relocate
    try:
        placed: list = []
        fields: list = []
        code = _relocated(relocate, window.before, window_bytes, window.start, at, placed, fields, at)
        site_raw = window_bytes[site_insn.address - window.start:site_insn.address - window.start + site_insn.size]
        here = at + len(code)
        trap = resume = None
        values = {"gadget_slot": cache.gadget_slot, "site_end": site_insn.address + site_insn.size,
                  "cpuid_table": cache.cpuid_table, "branch_table": cache.branch_slot}
        if kind == "syscall":
            body = stubs.syscall_body()
            code += _filled(body, here, values, fields, at)
            trap, resume = here - at + body.trap, here - at + body.trap + 2
        elif kind == "cpuid":
            body = stubs.cpuid_body()
            code += _filled(body, here, values, fields, at)
            trap, resume = here - at + body.trap, here - at + body.trap + 1
        elif kind in ("rdtsc", "rdtscp"):
            code += _aimed(relocate, site_raw, site_insn.address, here, fields, at)   # the host clock: native
        elif kind == "branch" and window.table:
            # A proved table jump (scanner.jumptable): its bound and load ran above,
            # and the jump, which names no rip-relative address, runs as it is.
            return Stub(code + site_raw, None, None, _offsets(placed, at), tuple(fields))
        elif kind == "branch":
            is_call = site_insn.mnemonic.split()[-1] == "call"
            slot = window.guard and slot_call(site_insn, kind)
            for scratch in ("r11", "r10"):
                head, tail = (stubs.branch_slot(scratch) if slot else stubs.branch_guard(scratch) if window.guard
                              else stubs.branch_parts(is_call, scratch))
                try:
                    load = _aimed(load_operand, site_raw, site_insn.address, here + len(head.code), fields,
                                  at, scratch, stubs.BRANCH_BIAS)
                    break
                except ScratchInUse:
                    continue
            else:
                raise EmitError("operand uses both scratch registers")
            code += head.code + load
            tail_at = at + len(code)
            code += _filled(tail, tail_at, values, fields, at)
            trap = tail_at - at + tail.trap
            if not window.guard:
                return Stub(code, trap, None, _offsets(placed, at), tuple(fields))   # a branch leaves for its target
            if slot:
                placed.append((here, site_insn.address))
            back = window.end - SLOT_CALL if slot else site_insn.address   # the site runs as it is
            fields.append((len(code) + 1, back, "guest", 0))
            code += stubs.jmp5(at + len(code), back)
            return Stub(code, trap, None, _offsets(placed, at), tuple(fields))
        else:
            raise EmitError(f"no stub for kind {kind}")
        code += _relocated(relocate, window.after, window_bytes, window.start, at + len(code), placed, fields, at)
        fields.append((len(code) + 1, window.end, "guest", 0))
        code += stubs.jmp5(at + len(code), window.end)
        return Stub(code, trap, resume, _offsets(placed, at), tuple(fields))
    except ValueError as e:
        raise EmitError(str(e)) from None


def _offsets(placed, at: int) -> tuple:
    return tuple((address - at, original) for address, original in placed)


def detached(stub: Stub, guest_base: int, cache_base: int) -> Stub:
    """The stub with every address it names made relative: guest code's to
    `guest_base`, the side cache's to `cache_base`. Its bytes stay as they are;
    `placed` re-aims every field, wherever the stub was composed."""
    return Stub(stub.code, stub.trap, stub.resume,
                tuple((offset, original - guest_base) for offset, original in stub.displaced),
                tuple((offset, target - (cache_base if space == "cache" else guest_base), space, tail)
                      for offset, target, space, tail in stub.fields))


def placed(template: Stub, at: int, guest_base: int, cache_base: int) -> Stub | None:
    """A detached stub placed at `at`, for code whose addresses are relative to
    `guest_base`, in a side cache at `cache_base`: the same bytes with every rel32
    re-aimed (the placed stub has no fields: it is not detached again). None when a target is out of reach from there, or a field is one whose
    arithmetic wraps at 32 bits (the `eip` form), which is composed afresh instead."""
    code = bytearray(template.code)
    for offset, target, space, tail in template.fields:
        if space == "guest32":
            return None
        disp = target + (cache_base if space == "cache" else guest_base) - (at + offset + 4 + tail)
        if not -(1 << 31) <= disp < (1 << 31):
            return None
        _REL32.pack_into(code, offset, disp)
    return Stub(bytes(code), template.trap, template.resume,
                tuple((offset, original + guest_base) for offset, original in template.displaced))
