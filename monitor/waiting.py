"""Waiting for one task while the monitor works on it, the one way (rr's WaitManager
is the model).

The event loop waits on every task with `waitpid(-1)`. Some work needs one task's
next stop: a remote syscall's trap, a single step, the handler entry of a signal
delivered with a translated frame. Those waits go through here, so that what may
happen meanwhile is handled alike everywhere: a seccomp stop lets the syscall go
ahead (the filter allowed it), a signal for the task is kept in its
`pending_signals` and delivered once the work is done, and the task's end raises
GuestGone with the status the wait consumed, which the loop then reaps (the status
cannot be waited for twice).
"""
from __future__ import annotations

import os
import signal

from sbe.monitor import ptrace_api as pt


class GuestGone(Exception):
    """The task ended (e.g. SIGKILL) while the monitor was using it."""

    def __init__(self, tid: int, status: int) -> None:
        super().__init__(f"task {tid} ended")
        self.tid = tid
        self.status = status


def next_status(tid: int) -> int:
    """The task's next stop; GuestGone if it ended instead (its exit stop, which
    SIGKILL or its group's exit brings while the monitor works on it, is passed)."""
    while True:
        _, status = os.waitpid(tid, pt.WALL)
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            raise GuestGone(tid, status)
        if status >> 16 != pt.PTRACE_EVENT_EXIT:
            return status
        pt.resume(tid)


def is_trap(status: int) -> bool:
    """A plain SIGTRAP stop: an int3, or the end of a single step."""
    return os.WSTOPSIG(status) == signal.SIGTRAP and status >> 16 == 0


def run_until(thread, request: int, done, sig: int = 0) -> int:
    """Resume `thread` (PTRACE_CONT or PTRACE_SINGLESTEP, delivering `sig`) and wait
    until `done(status)` accepts a stop, which is returned. Stops it does not accept
    resume the thread the same way; signals among them are kept for later."""
    pt.resume(thread.tid, sig, request)
    while True:
        status = next_status(thread.tid)
        if done(status):
            return status
        if status >> 16 == 0 and os.WSTOPSIG(status) != signal.SIGTRAP:
            thread.pending_signals.append(os.WSTOPSIG(status))
        pt.resume(thread.tid, 0, request)


def reap_killed(tids) -> None:
    """Kill these tasks and wait until each has ended, so nothing traced is left
    running or as a zombie."""
    pt.kill_tree(tids)
    for tid in tids:
        try:
            while True:
                try:
                    pt.resume(tid)    # stopped (its exit stop taken already): on it goes
                except pt.PtraceError:
                    pass              # running, or gone
                next_status(tid)
        except (GuestGone, ChildProcessError):
            pass


def signal_pending(tid: int, sig: int) -> bool:
    """Whether `sig` waits in the task's own pending set (its SigPnd in
    /proc/TID/status): at an interrupt stop it tells a task that has just run an
    int3, its SIGTRAP not taken yet, from one the monitor resumed just after one
    (a cpuid stub goes on right after its trap), whose rips are the same."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"SigPnd:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False
