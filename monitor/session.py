"""The event loop: one `waitpid(-1, WALL)` over every task of the guest, and the
dispatch of each stop to what it means.

Stops and their meaning:
- SIGSEGV fetching from a page kept non-executable: scan it, plant, grant execute.
- SIGTRAP after an `int3` at a site: emulate the site (handlers/), resume after it.
- SIGTRAP at the gadget's `int3`: a syscall run for a site is done; resume after it.
- seccomp stop: a syscall the monitor must see (hooks), or an escape.
- fork/vfork/clone/exec events: new tasks and new images.
- anything else: a signal for the guest, delivered as natively, with any gadget
  address in the thread's state translated back to the site it stands for.
"""
from __future__ import annotations

import logging
import os
import signal
import time

from sbe.handlers.dispatch import emulate
from sbe.handlers import cpuid
from sbe.handlers.effect import RESUME, STEP, SYSCALL, SYSCALL32
from sbe.meta import syscalls
from sbe.meta.pagemap import PAGE, PROT_EXEC, PROT_WRITE, page_of
from sbe.meta.syscalls import SYS
from sbe.monitor import ptrace_api as pt
from sbe.monitor import remote, sigframe
from sbe.monitor.image import setup_image
from sbe.monitor.memory import GuestMemory
from sbe.monitor.stats import Stats
from sbe.monitor.syscall_hooks import HOOKS
from sbe.patcher import gadget
from sbe.patcher.space import AddressSpace, PatchPolicy
from sbe.scanner.decode import decode_from
from sbe.scanner.sensitive import classify

log = logging.getLogger("sbe")

SIGTRAP_SYSCALL = signal.SIGTRAP | 0x80
SI_KERNEL = 0x80
SEGV_ACCERR = 2
CLONE_VM = 0x100
CLONE_THREAD = 0x10000


class Thread:
    __slots__ = ("tid", "space", "gadget", "post", "pending_signals", "fresh", "last_rip",
                 "frames")

    def __init__(self, tid: int, space: AddressSpace | None) -> None:
        self.tid = tid
        self.space = space
        # While this thread runs a site's syscall in the gadget: (site, restart, resume):
        # where to put it back to run the syscall again, and where to go on after it.
        self.gadget = None
        self.post = None             # hook to run at the syscall-exit stop
        self.pending_signals: list[int] = []
        self.fresh = True            # its first stop (SIGSTOP of a new task) is ours
        self.last_rip = None         # verify mode: the instruction about to run
        self.frames: list = []       # signal frames shown a translated view (sigframe.py)


class Session:
    def __init__(self, argv: list[str], path: str, *, mode: str = "patch",
                 verify: bool = False, trap_hook=None, policy: PatchPolicy | None = None) -> None:
        self.argv = argv
        self.path = path
        self.mode = mode
        self.policy = policy or PatchPolicy()
        self.switch_requested = False
        self.switches: list[str] = []
        self.kicks = 0                            # SIGSTOPs sent to get a guest task to stop
        self.verify = verify
        self.trap_hook = trap_hook
        self.threads: dict[int, Thread] = {}
        self.early: dict[int, int] = {}
        self.stats = Stats()
        self.cpu = cpuid.HOST
        self.cpuid_faulting = True                # tried at each exec until it fails once
        self.first_pid = 0
        self.exit_status: int | None = None
        self.spaces: list[AddressSpace] = []      # every image ever run, for the site report
        self.violations: list[str] = []           # verify mode: containment failures
        self.stepped = 0                          # verify mode: instructions single-stepped
        self.cont_request = pt.PTRACE_SINGLESTEP if verify else pt.PTRACE_CONT

    # -- life cycle ------------------------------------------------------------
    def start(self) -> int:
        from sbe.monitor.launch import spawn
        pid = spawn(self.path, self.argv)
        self.first_pid = pid
        thread = Thread(pid, None)
        thread.fresh = False
        self.threads[pid] = thread
        self.stats.processes = 1
        self.stats.threads = 1
        pt.resume(pid)
        return pid

    def run(self) -> int:
        """Run the guest to the end; returns its exit status as a shell reports it."""
        t0 = time.perf_counter()
        if not self.first_pid:
            self.start()
        try:
            self.loop()
        finally:
            if self.threads:
                self.kill_all()
            self.stats.wall_seconds = time.perf_counter() - t0
            for space in self.spaces:
                self.stats.pages_scanned += space.pages_scanned
                self.stats.scan_seconds += space.scan_seconds
                self.stats.stub_seconds += space.stub_seconds
                self.stats.swept += space.swept
                self.stats.fallbacks.update(space.fallbacks)
                self.stats.flushes += space.flushes
                self.stats.false_sites += space.false_sites
            self.stats.switches = list(self.switches)
        return self.exit_status if self.exit_status is not None else 1

    def loop(self) -> None:
        while self.threads:
            try:
                tid, status = os.waitpid(-1, pt.WALL)
            except ChildProcessError:
                break
            self.stats.stops += 1
            thread = self.threads.get(tid)
            if thread is None:
                if os.WIFSTOPPED(status):
                    self.early[tid] = status   # a new task, ahead of its parent's event
                continue
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self.reap(thread, status)
                continue
            try:
                self.on_stop(thread, status)
            except (remote.GuestGone, pt.PtraceError) as e:
                # The task died under us (SIGKILL, exit of its group): its exit
                # status arrives through waitpid like any other.
                log.debug("task %d vanished: %s", tid, e)

    def kill_all(self) -> None:
        """sbe is giving up (an error of its own): kill every task and reap it, so
        nothing traced is left running or as a zombie."""
        tids = list(self.threads)
        pt.kill_tree(tids)
        for tid in tids:
            try:
                while True:
                    _, status = os.waitpid(tid, pt.WALL)
                    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                        break
            except ChildProcessError:
                pass
        self.threads.clear()

    def reap(self, thread: Thread, status: int) -> None:
        del self.threads[thread.tid]
        if thread.space is not None:
            thread.space.users.discard(thread.tid)
        if thread.tid == self.first_pid:
            if os.WIFEXITED(status):
                self.exit_status = os.WEXITSTATUS(status)
            else:
                self.exit_status = 128 + os.WTERMSIG(status)
                log.info("guest killed by %s", signal.Signals(os.WTERMSIG(status)).name)

    def cont(self, thread: Thread, sig: int = 0, request: int | None = None) -> None:
        if sig == 0 and thread.pending_signals:
            sig = thread.pending_signals.pop(0)
        pt.resume(thread.tid, sig, request if request is not None else self.cont_request)

    # -- dispatch --------------------------------------------------------------
    def on_stop(self, thread: Thread, status: int) -> None:
        sig = os.WSTOPSIG(status)
        event = status >> 16
        if event:
            self.on_event(thread, event)
        elif sig == SIGTRAP_SYSCALL:
            post, thread.post = thread.post, None
            if post is not None:
                post(pt.getregs(thread.tid))
            self.cont(thread)
        elif sig == signal.SIGTRAP:
            self.on_sigtrap(thread)
        elif sig == signal.SIGSTOP and thread.fresh:
            thread.fresh = False
            self.cont(thread)
        elif sig == signal.SIGSTOP and self.kicks:
            # The stop a mode switch asked for: at an instruction boundary, not at
            # a trap the old plant caused.
            self.kicks -= 1
            if self.switch_requested:
                self.switch_modes(thread)
            self.cont(thread)
        elif sig == signal.SIGSEGV and thread.space is not None:
            self.on_sigsegv(thread)
        else:
            self.deliver(thread, sig)

    def on_event(self, thread: Thread, event: int) -> None:
        if event == pt.PTRACE_EVENT_SECCOMP:
            self.on_seccomp(thread)
        elif event == pt.PTRACE_EVENT_EXEC:
            self.on_exec(thread)
        elif event in (pt.PTRACE_EVENT_FORK, pt.PTRACE_EVENT_VFORK, pt.PTRACE_EVENT_CLONE):
            self.on_new_task(thread, event)
        else:
            self.cont(thread)

    # -- images and tasks ------------------------------------------------------
    def on_exec(self, thread: Thread) -> None:
        """A fresh image: old tables go, the new one is set up at the exec's
        syscall-exit stop (the exec has returned there, so injected syscalls are not
        overwritten by its result)."""
        if thread.space is not None:
            thread.space.users.discard(thread.tid)
        space = AddressSpace(GuestMemory(thread.tid), thread.tid, self.mode, self.policy, self.cpu)
        space.users.add(thread.tid)
        self.spaces.append(space)
        thread.space = space
        thread.gadget = None
        thread.last_rip = None

        def post(_regs):
            setup_image(self, thread)
        thread.post = post
        pt.resume(thread.tid, 0, pt.PTRACE_SYSCALL)

    def on_new_task(self, parent: Thread, event: int) -> None:
        child_tid = pt.geteventmsg(parent.tid)
        regs = pt.getregs(parent.tid)
        flags = 0
        if event == pt.PTRACE_EVENT_CLONE:
            if regs.orig_rax == SYS.clone3:   # clone3: flags are the first field of clone_args
                flags = int.from_bytes(parent.space.mem.read(regs.rdi, 8), "little")
            else:
                flags = regs.rdi
        shared = event == pt.PTRACE_EVENT_VFORK or bool(flags & CLONE_VM)
        if shared:
            space = parent.space
        else:
            space = parent.space.fork(GuestMemory(child_tid), child_tid)
            self.spaces.append(space)
        space.users.add(child_tid)
        child = Thread(child_tid, space)
        child.gadget = parent.gadget
        self.threads[child_tid] = child
        if flags & CLONE_THREAD:
            self.stats.threads += 1
        else:
            self.stats.processes += 1
        early = self.early.pop(child_tid, None)
        if early is not None:
            self.on_stop(child, early)
        self.cont(parent)

    # -- traps -----------------------------------------------------------------
    def on_sigtrap(self, thread: Thread) -> None:
        space = thread.space
        regs = pt.getregs(thread.tid)
        rip = regs.rip
        if self.verify and space is not None:
            info = pt.getsiginfo(thread.tid)
            if info.si_code != SI_KERNEL:
                self.verify_step(thread, rip)
                self.cont(thread)
                return
        site = None
        if space is not None:
            site = space.sites.get(rip - 1)
            if site is not None and site.strategy != "int3":
                site = None
            site = site or space.stub_traps.get(rip - 1)
        if site is not None:
            self.on_site(thread, site, regs)
        elif rip in (gadget.SYSCALL_TRAP, gadget.INT80_TRAP) and thread.gadget is not None:
            (site, _, resume), thread.gadget = thread.gadget, None
            regs.rip = resume
            if rip == gadget.SYSCALL_TRAP:
                regs.rcx = site.end    # what the site's own syscall would have left
            pt.setregs(thread.tid, regs)
            thread.last_rip = None
            self.cont(thread)
        else:
            self.deliver(thread, signal.SIGTRAP)

    def on_site(self, thread: Thread, site, regs) -> None:
        """A trap at a site's int3, or at its stub's int3 (site.trap): the guest's
        registers are as at the site; emulate it and go on after it (site.end, or
        the stub's continuation)."""
        t0 = time.perf_counter()
        space = thread.space
        in_stub = regs.rip - 1 == site.trap
        site.hits += 1
        self.stats.traps[site.kind] += 1
        regs.rip = site.address
        effect = emulate(site, pt.Regs(regs), space.mem.read, self.cpu)
        thread.last_rip = None
        if effect.action == RESUME:
            leaf, subleaf = regs.rax & 0xFFFFFFFF, regs.rcx & 0xFFFFFFFF
            for name, value in effect.regs.items():
                setattr(regs, name, value & 0xFFFFFFFFFFFFFFFF)
            for address, data in effect.writes:
                space.mem.write(address, data)
            if site.kind == "branch":
                self.branch_target(thread, space, regs.rip)
            elif in_stub:
                regs.rip = site.resume
                if site.kind == "cpuid":
                    space.cpuid_learned(site, leaf, subleaf,
                                        tuple(effect.regs[r] for r in ("rax", "rbx", "rcx", "rdx")))
            pt.setregs(thread.tid, regs)
        elif effect.action in (SYSCALL, SYSCALL32):
            if in_stub:
                thread.gadget = (site, site.trap, site.resume)
            else:
                thread.gadget = (site, site.address, site.end)
            regs.rip = gadget.SYSCALL if effect.action == SYSCALL else gadget.INT80
            pt.setregs(thread.tid, regs)
        elif effect.action == STEP:
            pt.setregs(thread.tid, regs)
            self.step_original(thread, site)
            self.stats.trap_seconds += time.perf_counter() - t0
            return
        self.stats.trap_seconds += time.perf_counter() - t0
        if self.trap_hook is not None and self.trap_hook(self, thread) is False:
            return
        self.cont(thread)

    def branch_target(self, thread: Thread, space: AddressSpace, target: int) -> None:
        """An emulated branch is about to land on `target`: make sure the scanner has
        seen it, and let the guest's branch stubs go there without a trap from now on."""
        space.syscall = self.remote_syscall(thread)
        if not space.knows(target):
            self.plant_count(space.scan(target, avoid=self.thread_rips(space),
                                        exclusive=len(space.users) == 1))
        if space.pages.get(target) is not None:
            space.insert_branch_target(target)

    def remote_syscall(self, thread: Thread):
        def call(nr, *args):
            self.stats.remote_syscalls += 1
            return remote.inject(thread, nr, *args)
        return call

    def thread_rips(self, space: AddressSpace) -> frozenset:
        """Where the threads of `space` stand (or will restart a syscall): no new
        window may hold these strictly inside."""
        rips = set()
        for t in self.threads.values():
            if t.space is space:
                if t.gadget is not None:
                    rips.update(t.gadget[1:])   # where it restarts, where it goes on
                try:
                    rip = pt.getregs(t.tid).rip
                except pt.PtraceError:
                    continue   # running: it is not inside a page being planted
                rips.update((rip, rip - 2))
        return frozenset(rips)

    def request_switch(self) -> None:
        """Ask for a mode switch (from a signal handler): it happens at the guest's
        next stop, which a SIGSTOP (swallowed by the monitor) brings about at once."""
        self.switch_requested = True
        for tid in list(self.threads):
            if self.threads[tid].space is not None:
                try:
                    os.kill(tid, signal.SIGSTOP)
                    self.kicks += 1
                except OSError:
                    continue
                break

    def switch_modes(self, thread: Thread) -> None:
        """Re-plant every site of this thread's address space in the other mode.
        Needs every thread of the space stopped: with one thread it is, at its stop."""
        space = thread.space
        if space is None or len(space.users) != 1:
            log.warning("mode switch skipped: it needs every thread stopped, and this "
                        "address space has %d", len(space.users) if space else 0)
            self.switch_requested = False
            return
        self.switch_requested = False
        new = "emulate" if self.mode == "patch" else "patch"
        self.mode = new
        space.syscall = self.remote_syscall(thread)
        count = space.replant(new, self.thread_rips(space))
        self.switches.append(new)
        log.info("switched to %s mode: %d sites re-planted", new, count)

    def step_original(self, thread: Thread, site) -> None:
        """Run a site's original instruction natively once: for what the monitor
        does not emulate, the CPU's own behaviour (including its faults) is exact."""
        space = thread.space
        space.unplant(site)
        try:
            pt.resume(thread.tid, 0, pt.PTRACE_SINGLESTEP)
            while True:
                _, status = os.waitpid(thread.tid, pt.WALL)
                if not os.WIFSTOPPED(status):
                    raise remote.GuestGone(thread.tid, status)
                sig, event = os.WSTOPSIG(status), status >> 16
                if event == pt.PTRACE_EVENT_SECCOMP:
                    pt.resume(thread.tid, 0, pt.PTRACE_SINGLESTEP)
                    continue
                break
        finally:
            if site.address in space.sites:
                space.mem.write(site.address, b"\xcc")
        if sig == signal.SIGTRAP:
            self.cont(thread)
        else:
            self.deliver(thread, sig)

    def on_sigsegv(self, thread: Thread) -> None:
        space = thread.space
        info = pt.getsiginfo(thread.tid)
        addr = info.u.fault.addr
        regs = pt.getregs(thread.tid)
        state = space.pages.get(addr)
        fetch = regs.rip <= addr < regs.rip + 16
        thread.last_rip = None
        if state is not None and fetch and not state.scanned:
            t0 = time.perf_counter()
            entry = regs.rip
            space.syscall = self.remote_syscall(thread)
            if page_of(regs.rip) != page_of(addr):
                # An instruction straddling into this page: its end is the entry here.
                insn = next(decode_from(space.original(regs.rip, 16), regs.rip, regs.rip), None)
                entry = regs.rip + insn.size if insn else page_of(addr)
            self.plant_count(space.scan(entry, avoid=self.thread_rips(space),
                                        exclusive=len(space.users) == 1))
            self.grant(thread, page_of(addr), state.prot)
            self.stats.faults += 1
            self.stats.fault_seconds += time.perf_counter() - t0
            self.cont(thread)
        elif (state is not None and state.scanned and state.prot & PROT_WRITE
              and info.si_code == SEGV_ACCERR and not fetch):
            # A write to code the guest mapped writable: its patches go, it is
            # rescanned at its next fetch.
            space.invalidate(addr, addr + 1, untrack=False)
            self.protect(thread, page_of(addr), state.prot & ~PROT_EXEC)
            self.cont(thread)
        else:
            self.deliver(thread, signal.SIGSEGV)

    def grant(self, thread: Thread, page: int, prot: int) -> None:
        """Make a scanned page executable; never writable at the same time, so a
        write to it faults and invalidates it first."""
        self.protect(thread, page, (prot & ~PROT_WRITE) | PROT_EXEC)

    def protect(self, thread: Thread, page: int, prot: int) -> None:
        self.stats.remote_syscalls += 1
        result = remote.inject(thread, SYS.mprotect, page, PAGE, prot)
        if result < 0:
            log.warning("mprotect(%#x) in guest %d failed: %s", page, thread.tid, os.strerror(-result))

    def plant_count(self, sites) -> None:
        for site in sites:
            self.stats.planted[site.kind] += 1
            self.stats.strategies[site.strategy] += 1

    def learn_entry(self, space: AddressSpace, address: int) -> None:
        """An address execution will reach by a way the scan could not follow
        (a signal handler, an escape): scan it before it runs."""
        state = space.pages.get(address)
        if state is None:
            return
        if state.scanned:
            if not space.knows(address):
                self.plant_count(space.scan(address))
        else:
            state.entries.add(address)

    # -- syscalls --------------------------------------------------------------
    def on_seccomp(self, thread: Thread) -> None:
        if thread.space is None:      # before the first exec: sbe's own child code
            self.cont(thread)
            return
        self.stats.syscall_stops += 1
        regs = pt.getregs(thread.tid)
        nr, ip = regs.orig_rax, regs.rip
        native64 = ip in (gadget.SYSCALL_RET, gadget.PATCH_RET)
        if not gadget.contains(ip):
            native64 = self.on_escape(thread, nr, ip)
        hook = HOOKS.get(nr) if native64 else None
        post = hook(self, thread, regs) if hook is not None else None
        if post is not None:
            thread.post = post
            pt.resume(thread.tid, 0, pt.PTRACE_SYSCALL)
        else:
            self.cont(thread)

    def on_escape(self, thread: Thread, nr: int, ip: int) -> bool:
        """A syscall from an instruction no site covers: caught by the net, counted,
        and learned so the next run of it traps at a site. Returns whether it used
        the 64-bit syscall table."""
        space = thread.space
        insn_at = ip - 2
        raw = space.original(insn_at, 2)
        native64 = raw != b"\xcd\x80"
        module, offset = space.modules.locate(insn_at)
        name = syscalls.name(nr) if native64 else f"int80:{nr}"
        self.stats.escapes[name] += 1
        self.stats.escape_sites.append((module, offset, name))
        log.warning("escape: %s at %s+%#x", name, os.path.basename(module), offset)
        if not space.overlaps(insn_at):
            self.learn_entry(space, insn_at)
        return native64

    def deliver(self, thread: Thread, sig: int) -> None:
        """Deliver a signal as natively: if the thread stands in the gadget, its
        state is first put back at the site it runs for (a handler must never see a
        gadget address, and a restarted syscall must restart at the site)."""
        if thread.gadget is not None:
            site, restart, resume = thread.gadget
            regs = pt.getregs(thread.tid)
            if regs.rip in (gadget.SYSCALL, gadget.INT80):
                regs.rip = restart
            elif regs.rip in (gadget.SYSCALL_RET, gadget.INT80 + 2):
                if regs.rip == gadget.SYSCALL_RET:
                    regs.rcx = site.end
                regs.rip = resume
            pt.setregs(thread.tid, regs)
            thread.gadget = None
        thread.last_rip = None
        if thread.space is not None and thread.space.caches and sigframe.deliver_translated(
                thread, thread.space, sig):
            self.cont(thread)
            return
        self.cont(thread, sig)

    # -- verification (tests) --------------------------------------------------
    def verify_step(self, thread: Thread, rip: int) -> None:
        """Single-step containment check: the instruction that just ran natively lay
        in a scanned page and was not a sensitive one."""
        self.stepped += 1
        ran, thread.last_rip = thread.last_rip, rip
        space = thread.space
        if ran is None or gadget.contains(ran) or space.in_cache(ran):
            return
        state = space.pages.get(ran)
        if state is None or not state.scanned:
            self.violations.append(f"{ran:#x}: ran from an unscanned page")
            return
        if ran not in state.starts:
            self.violations.append(f"{ran:#x}: ran at an offset no scan decoded")
            return
        if space.window_starting_at(ran) is not None:
            return   # what ran there is the jump to the site's stub
        insn = next(decode_from(space.original(ran, 16), ran, ran), None)
        if insn is not None and classify(insn.mnemonic, insn.op_str):
            self.violations.append(f"{ran:#x}: sensitive `{insn.mnemonic} {insn.op_str}` ran natively")
