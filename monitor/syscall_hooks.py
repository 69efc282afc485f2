"""What the monitor does around the syscalls it must see.

A hook runs at the seccomp stop (syscall entry) with the thread's registers; it may
rewrite arguments (e.g. strip PROT_EXEC, so new code stays non-executable until
scanned) and may return a `post` callable, run at the syscall-exit stop, which sees
the result and puts back any argument register it changed (the guest must find its
registers as the kernel would leave them).
"""
from __future__ import annotations

from sbe.meta import syscalls
from sbe.meta.pagemap import PAGE, PROT_EXEC, PROT_WRITE
from sbe.monitor import ptrace_api as pt
from sbe.monitor import codecache, sigframe
from sbe.patcher import gadget

SA_RESTORER = 0x04000000
SIG_IGN = 1


def _failed(value: int) -> bool:
    return value >= (1 << 64) - 4095


def _span(length: int) -> int:
    return (length + PAGE - 1) & ~(PAGE - 1)


def mmap(session, thread, regs):
    prot, length = regs.rdx, _span(regs.rsi)
    if prot & PROT_EXEC:
        regs.rdx = prot & ~PROT_EXEC
        pt.setregs(thread.tid, regs)

    def post(out):
        space = thread.space
        space.maps_changed()
        if _failed(out.rax):
            return
        session.patcher.invalidate(space, out.rax, out.rax + length, untrack=True)
        if prot & PROT_EXEC:
            space.pages.track(out.rax, out.rax + length, prot)
            out.rdx = prot
            pt.setregs(thread.tid, out)
            mapping = space.modules.mapping_at(out.rax)
            if mapping is not None:
                cached = codecache.bind(session, thread, out.rax, out.rax + length, mapping.path)
                codecache.grant(session, thread, cached, prot)
    return post


def mprotect(session, thread, regs):
    start, length, prot = regs.rdi, _span(regs.rsi), regs.rdx
    space = thread.space
    # The guest may be about to write: the original bytes go back first.
    session.patcher.invalidate(space, start, start + length, untrack=False, world=session.world(thread))
    if prot & PROT_WRITE:
        space.maps_changed()     # writable memory proves no jump table (patcher/jumptables.py)
    if not prot & PROT_EXEC and not space.pages.tracked_in(start, start + length):
        return None
    if prot & PROT_EXEC:
        regs.rdx = prot & ~PROT_EXEC
        pt.setregs(thread.tid, regs)

    def post(out):
        if _failed(out.rax):
            return
        space.pages.untrack(start, start + length)
        if prot & PROT_EXEC:
            space.pages.track(start, start + length, prot)
            out.rdx = prot
            pt.setregs(thread.tid, out)
    return post


def munmap(session, thread, regs):
    start, length = regs.rdi, _span(regs.rsi)

    def post(out):
        thread.space.maps_changed()
        if not _failed(out.rax):
            session.patcher.invalidate(thread.space, start, start + length, untrack=True)
    return post


def mremap(session, thread, regs):
    old, old_len, new_len = regs.rdi, _span(regs.rsi), _span(regs.rdx)
    space = thread.space
    moved = space.pages.tracked_in(old, old + old_len)
    prot = space.pages.get(moved[0]).prot if moved else 0
    session.patcher.invalidate(space, old, old + old_len, untrack=False, world=session.world(thread))

    def post(out):
        space.maps_changed()
        if _failed(out.rax):
            return
        space.pages.untrack(old, old + old_len)
        if moved:
            space.pages.track(out.rax, out.rax + new_len, prot)
    return post


def rt_sigaction(session, thread, regs):
    """A handler's code must be scanned before it runs: its address is an entry."""
    act = regs.rsi
    if act:
        raw = thread.space.mem.read_upto(act, 24)
        if len(raw) == 24:
            handler = int.from_bytes(raw[0:8], "little")
            flags = int.from_bytes(raw[8:16], "little")
            restorer = int.from_bytes(raw[16:24], "little")
            thread.signal_handlers[regs.rdi] = handler
            if handler > SIG_IGN:
                session.learn_entry(thread, handler)
            if flags & SA_RESTORER and restorer:
                session.learn_entry(thread, restorer)
    return None


def rt_sigreturn(session, thread, regs):
    # The frame restores every register: a gadget return pending for this thread is moot.
    thread.gadget = None
    if regs.rip == gadget.PATCH_RET:
        # From a patch stub, which lowered rsp by its red-zone skip and the address it
        # pushed: the kernel reads the frame at rsp, so rsp goes back to the site's.
        regs.rsp += sigframe.CALL_SKIP
        pt.setregs(thread.tid, regs)
    if thread.frames:
        sigframe.restore_on_sigreturn(thread, thread.space, regs.rsp)
    sigframe.frame_off_slot_call(thread.space, regs.rsp)
    # A guarded site branches natively on what its stub checked; a handler may have
    # changed that register in the frame, so the site becomes a trap before the
    # frame returns to it.
    site = thread.space.sites.get(sigframe.frame_rip(thread.space, regs.rsp))
    if site is not None and site.patch is not None and site.patch.guarded:
        session.stop_world(thread)
        session.patcher.demote(thread.space, site, "a signal returned to it")
    return None


# Which hook runs for which syscall is the syscall table's to say.
def sched_getaffinity(session, thread, regs):
    """While sbe keeps the guest on its CPU (monitor/pinning.py), the guest reads
    the affinity it would have natively."""
    if not session.pinning.pinned or (regs.rdi and regs.rdi not in session.threads):
        return None      # another process's mask is its own
    buffer = regs.rdx

    def post(out):
        if session.pinning.pinned and not _failed(out.rax) and out.rax > 0:
            thread.space.mem.write(buffer, session.pinning.mask_bytes(out.rax))
    return post


def sched_setaffinity(session, thread, regs):
    """The guest places its tasks itself: sbe's pin ends first, so the guest's
    choice is what the kernel keeps."""
    session.pinning.release(session.threads)


HOOKS = {nr: globals()[hook] for nr, hook in syscalls.HOOKS.items()}
