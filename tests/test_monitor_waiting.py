"""A task that ends while the monitor waits for it alone (a remote syscall, a single
step) is reaped with the status that wait consumed, not lost."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from sbe.monitor.session import Session
from sbe.monitor.waiting import next_status, signal_pending


class KilledMidWork(Session):
    """At the guest's first fetch fault, the guest is killed while the monitor is
    waiting for that one task, as when SIGKILL arrives during a remote syscall."""

    def on_sigsegv(self, thread):
        os.kill(thread.tid, signal.SIGKILL)
        next_status(thread.tid)
        raise AssertionError("a killed task has no next stop")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["emulate", "patch"])
def test_a_task_killed_during_a_nested_wait_is_reaped(guests, mode):
    path = str(guests / "rawsys")
    session = KilledMidWork([path], path, mode=mode)
    assert session.run() == 128 + signal.SIGKILL
    assert session.threads == {}


@pytest.mark.timeout(30)
def test_a_blocked_signal_sent_to_a_task_is_pending_for_it():
    """signal_pending reads the task's own pending set: a signal the task blocked
    and raised is there, one it never got is not."""
    # pthread_kill: to the thread itself (its own set), as an int3's SIGTRAP is.
    script = ("import signal, sys, threading; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1}); "
              "signal.pthread_kill(threading.get_ident(), signal.SIGUSR1); print('ready', flush=True); "
              "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            bufsize=0)
    try:
        assert proc.stdout.readline() == b"ready\n"
        assert signal_pending(proc.pid, signal.SIGUSR1)
        assert not signal_pending(proc.pid, signal.SIGUSR2)
    finally:
        proc.kill()
        proc.wait()
    assert not signal_pending(proc.pid, signal.SIGUSR1)     # gone: nothing is pending
