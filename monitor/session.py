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

from handlers.dispatch import emulate
from handlers import cpuid
from handlers.effect import RESUME, STEP, SYSCALL, SYSCALL32
from meta.pagemap import PAGE, PROT_EXEC, PROT_WRITE, page_of
from monitor import ptrace_api as pt
from monitor import remote
from monitor.image import setup_image
from monitor.memory import GuestMemory
from monitor.stats import Stats
from monitor.syscall_hooks import HOOKS
from patcher import gadget
from patcher.space import AddressSpace
from scanner.decode import decode_from
from scanner.sensitive import classify

log = logging.getLogger("sbe")

SIGTRAP_SYSCALL = signal.SIGTRAP | 0x80
SI_KERNEL = 0x80
SEGV_ACCERR = 2
SYS_mprotect = 10
CLONE_VM = 0x100
CLONE_THREAD = 0x10000
SYSCALL_NAMES = None


def syscall_name(nr: int) -> str:
    global SYSCALL_NAMES
    if SYSCALL_NAMES is None:
        from ptrace.syscall.linux.x86_64 import SYSCALL_NAMES as names
        SYSCALL_NAMES = names
    return SYSCALL_NAMES.get(nr, f"syscall_{nr}")


class Thread:
    __slots__ = ("tid", "space", "gadget_site", "post", "pending_signals", "fresh",
                 "last_rip", "stepping")

    def __init__(self, tid: int, space: AddressSpace | None) -> None:
        self.tid = tid
        self.space = space
        self.gadget_site = None      # the site whose syscall this thread runs in the gadget
        self.post = None             # hook to run at the syscall-exit stop
        self.pending_signals: list[int] = []
        self.fresh = True            # its first stop (SIGSTOP of a new task) is ours
        self.last_rip = None         # verify mode: the instruction about to run
        self.stepping = None


class Session:
    def __init__(self, argv: list[str], path: str, *, mode: str = "emulate",
                 verify: bool = False, trap_hook=None) -> None:
        self.argv = argv
        self.path = path
        self.mode = mode
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
        from monitor.launch import spawn
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
                pt.kill_tree(list(self.threads))
            self.stats.wall_seconds = time.perf_counter() - t0
            for space in self.spaces:
                self.stats.pages_scanned += space.pages_scanned
                self.stats.scan_seconds += space.scan_seconds
                self.stats.swept += space.swept
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
        space = AddressSpace(GuestMemory(thread.tid), thread.tid)
        space.users.add(thread.tid)
        self.spaces.append(space)
        thread.space = space
        thread.gadget_site = None
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
            if regs.orig_rax == 435:   # clone3: flags are the first field of clone_args
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
        child.gadget_site = parent.gadget_site
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
        site = space.sites.get(rip - 1) if space is not None else None
        if site is not None:
            self.on_site(thread, site, regs)
        elif rip in (gadget.SYSCALL_TRAP, gadget.INT80_TRAP) and thread.gadget_site is not None:
            site, thread.gadget_site = thread.gadget_site, None
            regs.rip = site.end
            if rip == gadget.SYSCALL_TRAP:
                regs.rcx = site.end    # what the site's own syscall would have left
            pt.setregs(thread.tid, regs)
            thread.last_rip = None
            self.cont(thread)
        else:
            self.deliver(thread, signal.SIGTRAP)

    def on_site(self, thread: Thread, site, regs) -> None:
        t0 = time.perf_counter()
        space = thread.space
        site.hits += 1
        self.stats.traps[site.kind] += 1
        regs.rip = site.address
        effect = emulate(site, pt.Regs(regs), space.mem.read, self.cpu)
        thread.last_rip = None
        if effect.action == RESUME:
            for name, value in effect.regs.items():
                setattr(regs, name, value & 0xFFFFFFFFFFFFFFFF)
            for address, data in effect.writes:
                space.mem.write(address, data)
            pt.setregs(thread.tid, regs)
            if site.kind == "branch" and not space.knows(regs.rip):
                self.plant_count(space.scan(regs.rip))
        elif effect.action in (SYSCALL, SYSCALL32):
            thread.gadget_site = site
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
            if page_of(regs.rip) != page_of(addr):
                # An instruction straddling into this page: its end is the entry here.
                insn = next(decode_from(space.original(regs.rip, 16), regs.rip, regs.rip), None)
                entry = regs.rip + insn.size if insn else page_of(addr)
            self.plant_count(space.scan(entry))
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
        result = remote.inject(thread, SYS_mprotect, page, PAGE, prot)
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
            if address not in state.starts:
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
        native64 = ip == gadget.SYSCALL_RET
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
        name = syscall_name(nr) if native64 else f"int80:{nr}"
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
        site = thread.gadget_site
        if site is not None:
            regs = pt.getregs(thread.tid)
            if regs.rip in (gadget.SYSCALL, gadget.INT80):
                regs.rip = site.address
            elif regs.rip in (gadget.SYSCALL_RET, gadget.INT80 + 2):
                if regs.rip == gadget.SYSCALL_RET:
                    regs.rcx = site.end
                regs.rip = site.end
            pt.setregs(thread.tid, regs)
            thread.gadget_site = None
        thread.last_rip = None
        self.cont(thread, sig)

    # -- verification (tests) --------------------------------------------------
    def verify_step(self, thread: Thread, rip: int) -> None:
        """Single-step containment check: the instruction that just ran natively lay
        in a scanned page and was not a sensitive one."""
        self.stepped += 1
        ran, thread.last_rip = thread.last_rip, rip
        if ran is None or gadget.contains(ran):
            return
        space = thread.space
        state = space.pages.get(ran)
        if state is None or not state.scanned:
            self.violations.append(f"{ran:#x}: ran from an unscanned page")
            return
        if ran not in state.starts:
            self.violations.append(f"{ran:#x}: ran at an offset no scan decoded")
            return
        insn = next(decode_from(space.original(ran, 16), ran, ran), None)
        if insn is not None and classify(insn.mnemonic, insn.op_str):
            self.violations.append(f"{ran:#x}: sensitive `{insn.mnemonic} {insn.op_str}` ran natively")
