"""Signal frames that show the guest its own addresses, never the side cache's.

A signal may arrive while a thread runs a stub (patch mode) or stands in the patch
gadget. The thread is first brought to a point where its state is the site's but for
rip/rsp/rcx (the stub's trap, the gadget's syscall, or just after it) by stepping it
through the stub; the signal is then delivered with PTRACE_SINGLESTEP, which stops
the thread at the handler's first instruction with the frame built, and the frame's
ucontext gets the guest's view: rip at the site (or after it), rsp above the stub's
red-zone skip. At rt_sigreturn the real values go back, unless the handler changed
them itself. A fault raised by a displaced instruction is shown at the instruction's
original address. A thread on a site's island is moved back to the site first, and
one on a slot call's `call [rsp - 8]` back to its stub's check.

A thread inside a stub whose site was since re-planted (a mode switch, a cache
flush) is translated by the patch that stub is of (SiteTable keeps it).
"""
from __future__ import annotations

import signal
import struct

from sbe.patcher.stubs import RED_ZONE
from sbe.monitor import ptrace_api as pt
from sbe.monitor.waiting import is_trap, run_until
from sbe.patcher import gadget

# struct rt_sigframe at the handler's rsp: pretcode (8), then ucontext: uc_flags (8),
# uc_link (8), uc_stack (24), then sigcontext's gregs r8..r15, rdi, rsi, rbp, rbx,
# rdx, rax, rcx, rsp, rip.
MCONTEXT = 8 + 8 + 8 + 24
GREG = {"rcx": 14, "rsp": 15, "rip": 16}
SYNCHRONOUS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL}
MAX_STEPS = 20000
CALL_SKIP = RED_ZONE + 8          # the red zone, and the address the stub pushed for the gadget


def guest_view(space, regs, sig: int) -> dict | None:
    """What the handler must see instead of the real rip/rsp/rcx, or None when the
    thread already stands on guest code."""
    rip = regs.rip
    if rip in (gadget.PATCH, gadget.PATCH_RET):
        ret = int.from_bytes(space.mem.read(regs.rsp, 8), "little")
        found = space.stub_at(ret)
        if found is None:
            return None
        site = found[0]
        if rip == gadget.PATCH:
            return {"rip": site.address, "rsp": regs.rsp + CALL_SKIP}
        return {"rip": site.end, "rsp": regs.rsp + CALL_SKIP, "rcx": site.end}
    found = space.stub_at(rip)
    if found is None:
        return None
    site, patch = found
    if rip == patch.trap:
        return {"rip": site.address}
    for stub_address, original in patch.displaced:
        if stub_address == rip:
            return {"rip": original}
    return None


def walk_out(thread, space) -> None:
    """Step a thread inside a stub to a point guest_view can name (or out of the
    stub). Signals that arrive meanwhile are kept for the thread."""
    for _ in range(MAX_STEPS):
        regs = pt.getregs(thread.tid)
        rip = regs.rip
        if leave_slot_call(thread.tid, space, regs):
            return     # stepped out onto a slot call: back at its check, which guest_view names
        if rip in (gadget.PATCH, gadget.PATCH_RET) or not space.in_cache(rip):
            return
        found = space.stub_at(rip)
        if found is None or rip == found[1].trap or any(a == rip for a, _ in found[1].displaced):
            return
        run_until(thread, pt.PTRACE_SINGLESTEP, is_trap)


def leave_island(tid: int, space, regs) -> bool:
    """A thread on a site's island (it ran the site's `jmp rel8` and nothing else)
    goes back to the site, where its state is the same: a handler then sees the
    site's address, and restoring the island cannot leave the thread in padding.
    Returns True when it moved."""
    site = space.island_site(regs.rip)
    if site is None:
        return False
    regs.rip = site.address
    pt.setregs(tid, regs)
    return True


def leave_slot_call(tid: int, space, regs) -> bool:
    """A thread on a slot call's `call [rsp - 8]` (its stub checked the target and
    left it there) goes back to the stub's check, where its state is the same: the
    window can then be restored under it (the stub then leaves by its trap), and a
    handler's frame returns to a check that reads the operand again. Returns True
    when it moved."""
    check = _slot_check(space, regs.rip)
    if check is None:
        return False
    regs.rip = check
    pt.setregs(tid, regs)
    return True


def frame_off_slot_call(space, rsp: int) -> None:
    """At rt_sigreturn: a frame a handler sent to a slot call's `call [rsp - 8]`
    goes to the stub's check instead, so no target the check has not seen is
    called from there."""
    check = _slot_check(space, frame_rip(space, rsp))
    if check is not None:
        space.mem.write(rsp - 8 + MCONTEXT + 8 * GREG["rip"], struct.pack("<Q", check))


def _slot_check(space, address: int) -> int | None:
    """The check of the slot call whose `call [rsp - 8]` is at `address`, or None."""
    found = space.slot_call_at(address)
    if found is None:
        return None
    site, patch = found
    return next(at for at, original in patch.displaced if original == site.address)


def deliver_translated(thread, space, sig: int) -> bool:
    """Deliver `sig` with a translated frame if the thread stands in side-cache code.
    Returns False when nothing needed translating (the caller delivers as usual)."""
    regs = pt.getregs(thread.tid)
    if leave_island(thread.tid, space, regs):
        return False
    leave_slot_call(thread.tid, space, regs)
    if not (space.in_cache(regs.rip) or regs.rip in (gadget.PATCH, gadget.PATCH_RET)):
        return False
    if sig not in SYNCHRONOUS:
        walk_out(thread, space)
        regs = pt.getregs(thread.tid)
    view = guest_view(space, regs, sig)
    if view is None or thread.signal_handlers.get(sig, 0) <= 1:
        return False     # nothing to show, or no handler to show it to
    run_until(thread, pt.PTRACE_SINGLESTEP, is_trap, sig)
    frame = pt.getregs(thread.tid).rsp + MCONTEXT
    real = {}
    for name, value in view.items():
        at = frame + 8 * GREG[name]
        real[name] = int.from_bytes(space.mem.read(at, 8), "little")
        space.mem.write(at, struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF))
    thread.frames.append((frame, view, real))
    return True


def frame_rip(space, rsp: int) -> int:
    """The rip the frame at rt_sigreturn (rsp at the ucontext) returns to; 0 when
    there is no frame to read (the kernel then kills the guest with SIGSEGV)."""
    try:
        return _slot(space, rsp - 8 + MCONTEXT, "rip")
    except OSError:
        return 0


def restore_on_sigreturn(thread, space, rsp: int) -> None:
    """At rt_sigreturn (rsp at the ucontext): give the kernel back the real values
    the view replaced, unless the handler rewrote them. A handler that sent the
    frame elsewhere (rewrote rip) gets none back: the view is the guest's own state
    at an instruction boundary, so from there on it is the state to go on with, and
    the real rsp and rcx belong to the stub the frame no longer returns to."""
    frame = rsp - 8 + MCONTEXT
    while thread.frames:
        at, view, real = thread.frames.pop()
        if at != frame:
            continue     # a frame left by longjmp: gone with its handler
        if "rip" in view and _slot(space, frame, "rip") != view["rip"] & 0xFFFFFFFFFFFFFFFF:
            return
        for name, value in view.items():
            if _slot(space, frame, name) == value & 0xFFFFFFFFFFFFFFFF:
                space.mem.write(frame + 8 * GREG[name], struct.pack("<Q", real[name]))
        return


def _slot(space, frame: int, name: str) -> int:
    return int.from_bytes(space.mem.read(frame + 8 * GREG[name], 8), "little")
