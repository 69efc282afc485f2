"""The event loop: one `waitpid(-1, WALL)` over every task of the guest, and the
dispatch of each stop to what it means.

Stops and their meaning:
- SIGSEGV fetching from a page kept non-executable: scan it, plant, grant execute.
- SIGTRAP after an `int3` at a site: emulate the site (handlers/), resume after it.
- SIGTRAP at the gadget's `int3`: a syscall run for a site is done; resume after it.
- seccomp stop: a syscall the monitor must see (hooks), or an escape.
- fork/vfork/clone/exec events: new tasks and new images.
- PTRACE_EVENT_STOP (tasks are seized): a new task's first stop, a group-stop (kept
  with PTRACE_LISTEN, so job control is native), or an interrupt of the monitor's
  own (a mode switch, a stopped world).
- anything else: a signal for the guest, delivered as natively, with any gadget
  address in the thread's state translated back to the site it stands for.

Every stop handler returns how the thread goes on (a Resume), or None to leave it
stopped; `loop` applies it in one place, so no handler can forget to resume.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import time
from collections import deque, namedtuple

from sbe.handlers import cpuid
from sbe.handlers.dispatch import emulate
from sbe.handlers.effect import RESUME, STEP, SYSCALL, SYSCALL32
from sbe.meta import syscalls
from sbe.meta.pagemap import PAGE, PROT_EXEC, PROT_WRITE, page_of
from sbe.meta.scancache import ScanCache
from sbe.meta.syscalls import SYS
from sbe.monitor import ptrace_api as pt
from sbe.monitor import codecache, owncpuid, remote, sigframe
from sbe.monitor.image import setup_image
from sbe.monitor.memory import GuestMemory
from sbe.monitor.stats import Stats
from sbe.monitor.pinning import Pinning
from sbe.monitor.syscall_hooks import HOOKS
from sbe.monitor.waiting import GuestGone, reap_killed, run_until, signal_pending
from sbe.patcher import gadget
from sbe.patcher.patcher import INT3, Patcher, PatchPolicy
from sbe.patcher.space import AddressSpace
from sbe.scanner.decode import decode_from
from sbe.scanner.x86 import MASK64

log = logging.getLogger(__name__)

SIGTRAP_SYSCALL = signal.SIGTRAP | 0x80
SEGV_ACCERR = 2
TRAP_FLAG = 0x100
CLONE_VM = 0x100
CLONE_THREAD = 0x10000
# What a syscall the kernel will restart returns meanwhile (ERESTARTSYS,
# ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK), and -ENOSYS: a thread at a
# syscall's entry stop, whose syscall has yet to run and may be interrupted.
# As the registers hold them: unsigned.
RESTARTING = frozenset(-code & MASK64 for code in (512, 513, 514, 516, errno.ENOSYS))
STOP_SIGNALS = frozenset((signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU))


def _may_restart(regs) -> bool:
    """True when the stopped thread's syscall may run again from rip - 2: it is in
    one (orig_rax) that has not finished. A thread at its exec stop, or at the end
    of its syscall, will not go back to the instruction."""
    return regs.orig_rax & MASK64 != MASK64 and regs.rax & MASK64 in RESTARTING


# How a stopped thread goes on: with `sig` delivered, by `request` (None: the
# session's usual one, which also delivers a signal kept for the thread).
Resume = namedtuple("Resume", "sig request", defaults=(0, None))

# A thread running a site's syscall in the gadget: where to put it back to run the
# syscall again (a signal's restart), and where it goes on after it.
GadgetReturn = namedtuple("GadgetReturn", "site restart resume")


class Thread:
    __slots__ = ("tid", "space", "gadget", "post", "pending_signals", "fresh", "frames",
                 "signal_handlers", "exiting", "vforking")

    def __init__(self, tid: int, space: AddressSpace | None, signal_handlers: dict | None = None) -> None:
        self.tid = tid
        self.space = space
        self.gadget: GadgetReturn | None = None
        self.post = None             # hook to run at the syscall-exit stop
        self.pending_signals: list[int] = []
        self.fresh = True            # its first stop (a new task's PTRACE_EVENT_STOP) is ours
        self.exiting = False         # past its exit stop: it runs no guest code again
        self.vforking = False        # waits for a vfork child: it cannot stop meanwhile
        self.frames: list = []       # signal frames shown a translated view (sigframe.py)
        # signal -> handler address (rt_sigaction), shared by the threads of a process
        self.signal_handlers = signal_handlers if signal_handlers is not None else {}


class Session:
    RESUME_REQUEST = pt.PTRACE_CONT

    def __init__(self, argv: list[str], path: str, *, mode: str = "patch",
                 policy: PatchPolicy | None = None, record_sites: bool = False,
                 cache: ScanCache | None = None, pin: bool = False, own_process: bool = False) -> None:
        self.argv = argv
        self.path = path
        self.mode = mode
        self.switch_requested = False
        self.switches: list[str] = []
        self.threads: dict[int, Thread] = {}
        # Stops a stopped world collected (tid, status), handled before the next wait;
        # their tasks stay stopped until then.
        self.queue: deque = deque()
        self.parked: set[int] = set()
        self.early: dict[int, int] = {}           # stops of new tasks, ahead of their parent's event
        self.stats = Stats()
        self.cpu = cpuid.HOST
        self.patcher = Patcher(policy, self.cpu, self.stats.patching)
        self.cpuid_faulting = True                # tried at each exec until it fails once
        self.first_pid = 0
        self.exit_status: int | None = None
        self.spaces: dict[AddressSpace, int] = {}   # live spaces, with their order of birth
        self.born = 0
        self.record_sites = record_sites
        self.cache = cache                        # the persistent scan cache, if used
        self.site_records: list[tuple[int, list[dict]]] = []   # of spaces gone, if recorded
        self.pinning = Pinning(pin)
        # The process is sbe's alone (the command line's, not a caller's): its own
        # thread may take CPUID faulting (monitor/owncpuid.py).
        self.own_process = own_process
        self.cpuid_armed = False

    # -- life cycle ------------------------------------------------------------
    def start(self) -> int:
        from sbe.monitor.launch import spawn
        self.pinning.pin()
        self.cpuid_armed = self.own_process and owncpuid.arm()
        try:
            pid = spawn(self.path, self.argv)
        except BaseException:
            self.leave_process()
            raise
        self.first_pid = pid
        thread = Thread(pid, None)
        thread.fresh = False
        self.threads[pid] = thread
        self.stats.processes = 1
        self.stats.threads = 1
        return pid

    def leave_process(self) -> None:
        """The guest is gone: sbe's process as it was before the session (its
        CPUs, its cpuid)."""
        self.pinning.release(())
        if self.cpuid_armed:
            owncpuid.disarm()
            self.cpuid_armed = False

    def run(self) -> int:
        """Run the guest to the end; returns its exit status as a shell reports it."""
        t0 = time.perf_counter()
        if not self.first_pid:
            self.start()
        try:
            self.loop()
        finally:
            if self.threads:
                reap_killed(list(self.threads))
                self.threads.clear()
            self.leave_process()
            for space in self.spaces:
                codecache.save(self, space)
            if self.cache is not None:
                self.cache.flush()
            self.stats.wall_seconds = time.perf_counter() - t0
            self.stats.switches = list(self.switches)
        return self.exit_status if self.exit_status is not None else 1

    def loop(self) -> None:
        while self.threads:
            if self.queue:
                tid, status = self.queue.popleft()
                self.parked.discard(tid)
            else:
                try:
                    tid, status = os.waitpid(-1, pt.WALL)
                except ChildProcessError:
                    break
                self.stats.stops += 1
            thread = self.threads.get(tid)
            if thread is None:
                if os.WIFSTOPPED(status):
                    self.early[tid] = status
                continue
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self.reap(thread, status)
                continue
            try:
                self.apply(thread, self.on_stop(thread, status))
            except GuestGone as e:
                # Its end was consumed by a wait for that task alone: reap it here.
                if e.tid in self.threads:
                    self.reap(self.threads[e.tid], e.status)
            except pt.PtraceError as e:
                if e.errno != errno.ESRCH:
                    raise
                # Killed under us (SIGKILL, its group's exit): its end is still to
                # come through waitpid like any other.
                log.debug("task %d vanished: %s", tid, e)

    def apply(self, thread: Thread, decision: Resume | None) -> None:
        if decision is None:
            return
        sig, request = decision
        if request is None:
            if sig == 0 and thread.pending_signals:
                sig = thread.pending_signals.pop(0)
            request = self.RESUME_REQUEST
        pt.resume(thread.tid, sig, request)
        if self.switch_requested:
            # Another trap may have taken the place of the interrupt a switch asked
            # for (any stop clears a pending one): ask again until one arrives.
            pt.interrupt(thread.tid)

    def reap(self, thread: Thread, status: int) -> None:
        del self.threads[thread.tid]
        self.leave(thread)
        if thread.tid == self.first_pid:
            if os.WIFEXITED(status):
                self.exit_status = os.WEXITSTATUS(status)
            else:
                self.exit_status = 128 + os.WTERMSIG(status)
                log.info("guest killed by %s", signal.Signals(os.WTERMSIG(status)).name)

    def adopt(self, space: AddressSpace) -> None:
        self.spaces[space] = self.born
        self.born += 1

    def leave(self, thread: Thread) -> None:
        """The thread no longer runs in its space: the space's last task gone, its
        sites are summarised (if asked for) and its memory file closed."""
        space = thread.space
        if space is None:
            return
        space.users.discard(thread.tid)
        if not space.users and space in self.spaces:
            born = self.spaces.pop(space)
            codecache.save(self, space)
            if self.record_sites:
                self.site_records.append((born, self.records_of(space)))
            space.close()

    @staticmethod
    def records_of(space: AddressSpace) -> list[dict]:
        return [dict(site.to_record(), pid=space.pid) for site in space.sites.ordered()]

    def site_rows(self) -> list[dict]:
        """Every process's sites (those gone and those still here), in the order the
        processes' images were born."""
        live = [(born, self.records_of(space)) for space, born in self.spaces.items()]
        return [row for _, rows in sorted(self.site_records + live, key=lambda r: r[0]) for row in rows]

    # -- dispatch --------------------------------------------------------------
    def on_stop(self, thread: Thread, status: int) -> Resume | None:
        sig = os.WSTOPSIG(status)
        event = status >> 16
        if event:
            return self.on_event(thread, event, sig)
        if sig == SIGTRAP_SYSCALL:
            post, thread.post = thread.post, None
            if post is not None:
                post(pt.getregs(thread.tid))
            return Resume()
        if sig == signal.SIGTRAP:
            return self.on_sigtrap(thread)
        if sig == signal.SIGSEGV and thread.space is not None:
            return self.on_sigsegv(thread)
        return self.deliver(thread, sig)

    def on_event(self, thread: Thread, event: int, sig: int) -> Resume | None:
        if event == pt.PTRACE_EVENT_SECCOMP:
            return self.on_seccomp(thread)
        if event == pt.PTRACE_EVENT_STOP:
            return self.on_event_stop(thread, sig)
        if event == pt.PTRACE_EVENT_EXEC:
            return self.on_exec(thread)
        if event in (pt.PTRACE_EVENT_FORK, pt.PTRACE_EVENT_VFORK, pt.PTRACE_EVENT_CLONE):
            return self.on_new_task(thread, event)
        if event == pt.PTRACE_EVENT_EXIT:
            thread.exiting = True
        elif event == pt.PTRACE_EVENT_VFORK_DONE:
            thread.vforking = False
        return Resume()

    def on_event_stop(self, thread: Thread, sig: int) -> Resume:
        """A new task's first stop, a group-stop, or an interrupt: the monitor's own
        (a mode switch asked for, a world stopped), or a group-stop's end that
        PTRACE_LISTEN waited for."""
        thread.fresh = False
        if sig in STOP_SIGNALS:
            # The task stays stopped until a SIGCONT, and its parent sees it stopped,
            # as natively.
            return Resume(request=pt.PTRACE_LISTEN)
        if self.switch_requested and thread.space is not None:
            # Not just after an int3 of sbe's: that SIGTRAP is still to come, and is
            # handled first (a stop after it asks for the switch again). The switch
            # runs syscalls in this thread, which would take that SIGTRAP unseen.
            if self._trap_pending(thread, pt.getregs(thread.tid)) is None:
                self.switch_modes(thread)
        return Resume()

    # -- images and tasks ------------------------------------------------------
    def on_exec(self, thread: Thread) -> Resume:
        """A fresh image: old tables go, the new one is set up at the exec's
        syscall-exit stop (the exec has returned there, so injected syscalls are not
        overwritten by its result)."""
        self.leave(thread)
        space = AddressSpace(GuestMemory(thread.tid), thread.tid, self.mode)
        space.users.add(thread.tid)
        self.adopt(space)
        thread.space = space
        thread.gadget = None
        thread.signal_handlers = {}

        def post(_regs):
            setup_image(self, thread)
        thread.post = post
        return Resume(request=pt.PTRACE_SYSCALL)

    def on_new_task(self, parent: Thread, event: int) -> Resume:
        child_tid = pt.geteventmsg(parent.tid)
        parent.vforking = event == pt.PTRACE_EVENT_VFORK
        regs = pt.getregs(parent.tid)
        flags = 0
        if event == pt.PTRACE_EVENT_CLONE:
            if regs.orig_rax == SYS.clone3:   # flags are the first field of clone_args
                flags = int.from_bytes(parent.space.mem.read(regs.rdi, 8), "little")
            else:
                flags = regs.rdi
        shared = event == pt.PTRACE_EVENT_VFORK or bool(flags & CLONE_VM)
        if shared:
            space = parent.space
        else:
            space = parent.space.fork(GuestMemory(child_tid), child_tid)
            self.adopt(space)
        space.users.add(child_tid)
        if flags & CLONE_THREAD:
            child = Thread(child_tid, space, parent.signal_handlers)
            self.stats.threads += 1
        else:
            child = Thread(child_tid, space, dict(parent.signal_handlers))
            self.stats.processes += 1
        child.gadget = parent.gadget
        self.threads[child_tid] = child
        self.pinning.release(self.threads)
        early = self.early.pop(child_tid, None)
        if early is not None:
            self.apply(child, self.on_stop(child, early))
        return Resume()

    # -- traps -----------------------------------------------------------------
    def on_sigtrap(self, thread: Thread) -> Resume | None:
        space = thread.space
        regs = pt.getregs(thread.tid)
        rip = regs.rip
        found = space.trap_at(rip - 1) if space is not None else None
        if found is not None:
            return self.on_site(thread, *found, regs)
        if rip in (gadget.SYSCALL_TRAP, gadget.INT80_TRAP) and thread.gadget is not None:
            self._gadget_returns(thread, regs)
            return Resume()
        if space is not None and space.in_cache(rip) and regs.eflags & TRAP_FLAG:
            # A single-step trap inside a stub, with the trap flag still set: a step
            # of the monitor's own (signal delivery through a stub) whose flag came
            # back with the signal frame. Stub instructions are not the guest's, so
            # the trap is not the guest's either; the flag goes, the stub goes on.
            regs.eflags &= ~TRAP_FLAG
            pt.setregs(thread.tid, regs)
            return Resume()
        log.info("task %d: a SIGTRAP at %#x that is none of sbe's traps goes to the guest (%s)",
                 thread.tid, rip, space.modules.locate(rip) if space is not None else "no space")
        return self.deliver(thread, signal.SIGTRAP)

    @staticmethod
    def _gadget_returns(thread: Thread, regs) -> None:
        """A syscall the monitor ran for a site in the gadget is done (the thread is
        just after the gadget's int3): on to where the site goes on."""
        done, thread.gadget = thread.gadget, None
        if regs.rip == gadget.SYSCALL_TRAP:
            regs.rcx = done.site.end    # what the site's own syscall would have left
        regs.rip = done.resume
        pt.setregs(thread.tid, regs)

    @staticmethod
    def _trap_pending(thread: Thread, regs):
        """What a thread just after one of sbe's int3s stands after, its SIGTRAP not
        handled yet: (site, patch) of a site's or stub's int3, "gadget" after the
        gadget's (its syscall for a site done), else None."""
        space = thread.space
        found = space.trap_at(regs.rip - 1)
        if found is None and regs.rip in (gadget.SYSCALL_TRAP, gadget.INT80_TRAP) and thread.gadget is not None:
            return "gadget"
        return found

    def on_site(self, thread: Thread, site, patch, regs) -> Resume | None:
        """A trap at a site's int3 (`patch` None), or at the int3 of a stub of it
        (`patch`, the stub's: the site's now, or one it had when the thread entered
        the stub): the guest's registers are as at the site; emulate it and go on
        after it (site.end, or the stub's continuation)."""
        t0 = time.perf_counter()
        space = thread.space
        in_stub = patch is not None
        site.hits += 1
        self.stats.traps[site.kind] += 1
        regs.rip = site.address
        effect = emulate(site, pt.Regs(regs), space.mem.read, self.cpu)
        decision = Resume()
        if effect.action == RESUME:
            for name, value in effect.regs.items():
                setattr(regs, name, value & MASK64)
            for address, data in effect.writes:
                space.mem.write(address, data)
            if effect.branch_target is not None:
                self.branch_target(thread, space, effect.branch_target)
            elif in_stub:
                regs.rip = patch.resume
                if effect.cpuid_answer is not None:
                    self.patcher.cpuid_learned(space, site, *effect.cpuid_answer)
            pt.setregs(thread.tid, regs)
        elif effect.action in (SYSCALL, SYSCALL32):
            thread.gadget = (GadgetReturn(site, patch.trap, patch.resume) if in_stub
                             else GadgetReturn(site, site.address, site.end))
            regs.rip = gadget.SYSCALL if effect.action == SYSCALL else gadget.INT80
            pt.setregs(thread.tid, regs)
        elif effect.action == STEP:
            pt.setregs(thread.tid, regs)
            decision = self.step_original(thread, site)
        self.stats.trap_seconds += time.perf_counter() - t0
        return decision

    def branch_target(self, thread: Thread, space: AddressSpace, target: int) -> None:
        """An emulated branch is about to land on `target`: make sure the scanner has
        seen it, and let the guest's branch stubs go there without a trap from now on."""
        if not space.knows(target):
            self.plant_count(self.patcher.scan(space, target, self.remote(thread), self.thread_rips(space),
                                               world=self.world(thread)))
        state = space.pages.get(target)
        if state is not None:
            if target not in state.roots:
                state.arrived(target)
                space.learned(target)
            self.patcher.insert_branch_target(space, target)

    def remote(self, thread: Thread):
        """The capability to run syscalls in `thread` (stopped), for the patcher."""
        def call(nr, *args):
            self.stats.remote_syscalls += 1
            return remote.inject(thread, nr, *args)
        return call

    def thread_rips(self, space: AddressSpace) -> frozenset:
        """Where the threads of `space` stand (or will restart a syscall, or will
        leave the stub they are in): no new window may hold these strictly inside.
        A thread on an island is moved back to its site first (sigframe.leave_island),
        one on a slot call back to its stub's check (sigframe.leave_slot_call).
        With every thread stopped, retired stubs none of them is in are forgotten."""
        rips, everyone = set(), True
        for t in self.threads.values():
            if t.space is space:
                if t.gadget is not None:
                    rips.update((t.gadget.restart, t.gadget.resume))
                try:
                    regs = pt.getregs(t.tid)
                except pt.PtraceError:
                    everyone = False
                    continue   # running: it is not inside a page being planted
                sigframe.leave_island(t.tid, space, regs)
                sigframe.leave_slot_call(t.tid, space, regs)
                rip = regs.rip
                rips.add(rip)
                if _may_restart(regs):
                    rips.add(rip - 2)
                if rip in (gadget.PATCH, gadget.PATCH_RET):
                    # In the gadget for a stub: it returns into that stub.
                    rip = int.from_bytes(space.mem.read_upto(regs.rsp, 8).ljust(8, b"\0"), "little")
                found = space.stub_at(rip)
                if found is not None:
                    rips.update((rip, found[0].address, found[0].end, found[1].window_end))
        if everyone:
            space.sites.prune(rips)    # retired stubs no thread is in, or will return to
        return frozenset(rips)

    def stop_world(self, thread: Thread) -> frozenset:
        """Stop every other task of `thread`'s address space, so that windows can be
        written into pages that already run (atomicity); returns where all of them
        stand (thread_rips). Each task's stop is kept, to be handled by the loop
        before its next wait: a task stays stopped until then. Tasks that cannot run
        guest code are left alone: a new task before its first stop, a vfork parent
        (it could not stop until its child execs or ends), a task on its way out."""
        space = thread.space
        others = [t for t in self.threads.values()
                  if t.space is space and t is not thread and t.tid not in self.parked
                  and not (t.fresh or t.exiting or t.vforking)]
        stopping = []
        for t in others:
            try:
                pt.interrupt(t.tid)
                stopping.append(t.tid)
            except pt.PtraceError:
                continue      # gone already: its end is still to come through waitpid
        for tid in stopping:
            try:
                _, status = os.waitpid(tid, pt.WALL)
                self.stats.stops += 1
                status = self._settle_trap(self.threads[tid], status)
            except ChildProcessError:
                continue
            self.queue.append((tid, status))
            self.parked.add(tid)
        if stopping:
            self.stats.world_stops += 1
        return self.thread_rips(space)

    def _settle_trap(self, thread: Thread, status: int) -> int:
        """A task the world stop caught just after one of sbe's int3 (a site's, a
        stub's trap, or the gadget's) has not had its SIGTRAP handled: its stop is
        that SIGTRAP, or an interrupt with the SIGTRAP still pending. What is about
        to be re-planted may be that very int3, and a trap handled after the
        re-planting would no longer name its site. So the SIGTRAP is taken now and
        dropped, and the task goes back to the site, where its registers are (an
        int3 changes only rip): it meets the site again in its new form. After the
        gadget's int3 it goes on where its site does, as the trap would have sent
        it (a pending SIGTRAP left there was taken unseen by the next remote
        syscall run in the task, and the task then ran on into the gadget's
        padding). Returns the status to queue for it (an interrupt, which resumes
        it with no signal)."""
        interrupt = (pt.PTRACE_EVENT_STOP << 16) | (signal.SIGTRAP << 8) | 0x7F
        space = thread.space
        if space is None or os.WSTOPSIG(status) != signal.SIGTRAP or status >> 16 not in (0, pt.PTRACE_EVENT_STOP):
            return status
        regs = pt.getregs(thread.tid)
        found = self._trap_pending(thread, regs)
        if found is None:
            return status
        if status >> 16:
            if not signal_pending(thread.tid, signal.SIGTRAP):
                # Resumed just after a trap, not stopped after one: waiting for a
                # SIGTRAP that never comes hung the world stop (the task ran on).
                return status
            pt.resume(thread.tid)             # the pending SIGTRAP is taken first
            _, status = os.waitpid(thread.tid, pt.WALL)
            self.stats.stops += 1
            if not os.WIFSTOPPED(status) or os.WSTOPSIG(status) != signal.SIGTRAP or status >> 16:
                return status
        if found == "gadget":
            self._gadget_returns(thread, regs)
            return interrupt
        regs.rip = found[0].address
        pt.setregs(thread.tid, regs)
        return interrupt

    def world(self, thread: Thread):
        """The patcher's way to stop `thread`'s world, called only when it is about
        to write into pages that already run."""
        return lambda: self.stop_world(thread)

    def request_switch(self) -> None:
        """Ask for a mode switch (from a signal handler): it happens at a guest
        task's next interrupt stop, asked for at once."""
        self.switch_requested = True
        for tid, t in list(self.threads.items()):
            if t.space is not None and not t.exiting:
                try:
                    pt.interrupt(tid)
                except pt.PtraceError:
                    continue
                break

    def switch_modes(self, thread: Thread) -> None:
        """Re-plant every site of this thread's address space in the other mode,
        with every thread of the space stopped."""
        space = thread.space
        self.switch_requested = False
        new = "emulate" if self.mode == "patch" else "patch"
        self.mode = new
        count = self.patcher.replant(space, new, self.stop_world(thread), self.remote(thread))
        self.switches.append(new)
        log.info("switched to %s mode: %d sites re-planted", new, count)

    def step_original(self, thread: Thread, site) -> Resume | None:
        """Run a site's original instruction natively once: for what the monitor
        does not emulate, the CPU's own behaviour (including its faults) is exact."""
        space = thread.space
        self.patcher.unplant(space, site)
        try:
            # Not an interrupt (a switch asked for one): the step may have run with
            # its trap still to come, and that trap, seen later, would go to the guest
            # as its own (threadphases died of SIGTRAP after an xrstor, switched
            # twice, about 1 run in 5). Resumed with a step again, the task reports
            # the step's trap, or runs the step if it had not.
            status = run_until(thread, pt.PTRACE_SINGLESTEP,
                               lambda s: s >> 16 not in (pt.PTRACE_EVENT_SECCOMP, pt.PTRACE_EVENT_STOP))
        finally:
            if site.address in space.sites:
                space.mem.write(site.address, INT3)
        sig = os.WSTOPSIG(status)
        return Resume() if sig == signal.SIGTRAP else self.deliver(thread, sig)

    def on_sigsegv(self, thread: Thread) -> Resume | None:
        space = thread.space
        info = pt.getsiginfo(thread.tid)
        addr = info.u.fault.addr
        regs = pt.getregs(thread.tid)
        state = space.pages.get(addr)
        fetch = regs.rip <= addr < regs.rip + 16
        if state is not None and fetch and not state.scanned:
            t0 = time.perf_counter()
            space.executed.add(page_of(addr))
            if page_of(addr) in space.deferred:
                self.plant_count(self.patcher.apply_deferred(space, page_of(addr), self.remote(thread),
                                                             self.thread_rips(space), self.world(thread)))
            entry = regs.rip
            if page_of(regs.rip) != page_of(addr):
                # An instruction straddling into this page: its end is the entry here.
                insn = next(decode_from(space.original(regs.rip, 16), regs.rip, regs.rip), None)
                entry = regs.rip + insn.size if insn else page_of(addr)
            self.plant_count(self.patcher.scan(space, entry, self.remote(thread), self.thread_rips(space),
                                               world=self.world(thread), fresh=True))
            # Planting elsewhere may have flushed a full side cache, and with it this
            # page: then it stays non-executable, and faults (and is scanned) again.
            if space.pages.get(addr) is not None and space.pages.get(addr).scanned:
                self.grant(thread, page_of(addr), state.prot)
            self.stats.faults += 1
            self.stats.fault_seconds += time.perf_counter() - t0
            return Resume()
        if state is not None and fetch and info.si_code == SEGV_ACCERR:
            # A fetch from a scanned page: another thread's first fetch of it faulted
            # too and was handled first, so the fault is sbe's, not the guest's. The
            # grant is idempotent, and makes sure the fetch goes through this time.
            self.grant(thread, page_of(addr), state.prot)
            return Resume()
        if (state is not None and state.scanned and state.prot & PROT_WRITE
                and info.si_code == SEGV_ACCERR and not fetch):
            # A write to code the guest mapped writable: its patches go, it is
            # rescanned at its next fetch.
            self.patcher.invalidate(space, addr, addr + 1, untrack=False, world=self.world(thread))
            self.protect(thread, page_of(addr), state.prot & ~PROT_EXEC)
            return Resume()
        return self.deliver(thread, signal.SIGSEGV)

    def grant(self, thread: Thread, page: int, prot: int) -> None:
        """Make a scanned page executable; never writable at the same time, so a
        write to it faults and invalidates it first."""
        self.protect(thread, page, (prot & ~PROT_WRITE) | PROT_EXEC)

    def protect(self, thread: Thread, page: int, prot: int, length: int = PAGE) -> None:
        result = self.remote(thread)(SYS.mprotect, page, length, prot)
        if result < 0:
            log.warning("mprotect(%#x) in guest %d failed: %s", page, thread.tid, os.strerror(-result))

    def plant_count(self, sites) -> None:
        for site in sites:
            self.stats.planted[site.kind] += 1
            self.stats.strategies[site.strategy] += 1

    def learn_entry(self, thread: Thread, address: int) -> None:
        """An address execution will reach by a way the scan could not follow
        (a signal handler, an escape): scan it before it runs."""
        space = thread.space
        state = space.pages.get(address)
        if state is None:
            return
        if not state.scanned:
            space.pages.add_entry(address)
        elif not space.knows(address):
            self.plant_count(self.patcher.scan(space, address, self.remote(thread), self.thread_rips(space),
                                               world=self.world(thread)))

    # -- syscalls --------------------------------------------------------------
    def on_seccomp(self, thread: Thread) -> Resume:
        if thread.space is None:      # before the first exec: sbe's own child code
            return Resume()
        self.stats.syscall_stops += 1
        regs = pt.getregs(thread.tid)
        nr, ip = regs.orig_rax, regs.rip
        native64 = ip in (gadget.SYSCALL_RET, gadget.PATCH_RET)
        if not gadget.contains(ip):
            native64 = self.on_escape(thread, nr, ip)
        hook = HOOKS.get(nr) if native64 else None
        post = hook(self, thread, regs) if hook is not None else None
        if post is None:
            return Resume()
        thread.post = post
        return Resume(request=pt.PTRACE_SYSCALL)

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
            self.learn_entry(thread, insn_at)
        return native64

    def deliver(self, thread: Thread, sig: int) -> Resume:
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
        if thread.space is not None and thread.space.caches and sigframe.deliver_translated(
                thread, thread.space, sig):
            return Resume()
        return Resume(sig)
