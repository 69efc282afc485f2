"""Sessions for tests: one that single-steps the guest and checks containment, one
that calls a hook after each site trap. Test instrumentation lives here, not in the
production Session."""
from __future__ import annotations

from sbe.monitor import ptrace_api as pt
from sbe.monitor.session import Resume, Session
from sbe.patcher import gadget
from sbe.scanner.decode import decode_from
from sbe.scanner.sensitive import classify

SI_KERNEL = 0x80     # an int3's SIGTRAP; a single step's has another code


class VerifyingSession(Session):
    """Single-step containment check: each instruction that ran natively lay in a
    scanned page, at an offset a scan decoded, and was not a sensitive one."""

    RESUME_REQUEST = pt.PTRACE_SINGLESTEP

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.violations: list[str] = []
        self.stepped = 0
        self.last_rip: dict[int, int | None] = {}   # tid -> the instruction about to run
        self.came_from: dict[int, int | None] = {}  # tid -> the instruction that ran before it

    # Where the monitor, not the CPU, moves a thread on, the next step's
    # instruction is not the one before it.
    def on_exec(self, thread):
        self.last_rip[thread.tid] = None
        return super().on_exec(thread)

    def on_sigsegv(self, thread):
        self.last_rip[thread.tid] = None
        return super().on_sigsegv(thread)

    def deliver(self, thread, sig):
        self.last_rip[thread.tid] = None
        return super().deliver(thread, sig)

    def on_sigtrap(self, thread):
        if thread.space is not None and pt.getsiginfo(thread.tid).si_code != SI_KERNEL:
            self.verify_step(thread, pt.getregs(thread.tid).rip)
            return Resume()
        self.last_rip[thread.tid] = None
        return super().on_sigtrap(thread)

    def verify_step(self, thread, rip: int) -> None:
        self.stepped += 1
        ran, self.last_rip[thread.tid] = self.last_rip.get(thread.tid), rip
        before, self.came_from[thread.tid] = self.came_from.get(thread.tid), ran
        space = thread.space
        if ran is None or gadget.contains(ran) or space.in_cache(ran):
            return
        state = space.pages.get(ran)
        if state is None or not state.scanned:
            self.violations.append(f"{ran:#x}: ran from an unscanned page")
            return
        slot = space.slot_call_at(ran)
        if slot is not None:
            # A slot call's `call [rsp - 8]` runs once its stub has checked the target.
            stub = slot[1]
            if before is None or not stub.stub <= before < stub.stub + stub.stub_size:
                self.violations.append(f"{ran:#x}: slot call of `{slot[0].insn}` entered other than from its stub")
            return
        if ran not in state.starts:
            self.violations.append(f"{ran:#x}: ran at an offset no scan decoded")
            return
        if space.window_starting_at(ran) is not None:
            return   # what ran there is the jump to the site's stub
        site = space.sites.get(ran)
        if site is not None and site.patch is not None and site.patch.guarded:
            # A guarded site runs natively once its stub has checked it, and only then.
            if before is None or not site.patch.stub <= before < site.patch.stub + site.patch.stub_size:
                self.violations.append(f"{ran:#x}: guarded `{site.insn}` entered other than from its stub")
            return
        insn = next(decode_from(space.original(ran, 16), ran, ran), None)
        if insn is not None and classify(insn.mnemonic, insn.op_str):
            self.violations.append(f"{ran:#x}: sensitive `{insn.mnemonic} {insn.op_str}` ran natively")


class TrapHookSession(Session):
    """Calls `hook(session, thread)` after each site trap is handled; a hook that
    returns False leaves the thread stopped."""

    def __init__(self, *args, hook, **kw) -> None:
        super().__init__(*args, **kw)
        self.hook = hook

    def on_site(self, thread, site, patch, regs):
        decision = super().on_site(thread, site, patch, regs)
        return None if self.hook(self, thread) is False else decision
