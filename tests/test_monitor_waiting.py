"""A task that ends while the monitor waits for it alone (a remote syscall, a single
step) is reaped with the status that wait consumed, not lost."""
from __future__ import annotations

import os
import signal

import pytest

from sbe.monitor.session import Session
from sbe.monitor.waiting import next_status


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
