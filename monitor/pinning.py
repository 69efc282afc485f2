"""Keeping a single-task guest on the monitor's CPU, as rr keeps its tracees on one.

Every ptrace stop hands the CPU from the guest to the monitor and back. When the two
run on different CPUs, each hand-over wakes an idle CPU, and on a virtual machine that
is a trip through the hypervisor: on the machine this was measured on, `strace -f` of
200,000 getppid calls took 18.0 s across two CPUs and 3.3 s on one, and sbe, which
stops several times per signal, could not keep up with a guest's 200 us interval
timer at all (`guests/padding` ran past 60 s; on one CPU, 0.09 s). So while the guest
is one task, sbe and the guest share one CPU. A second task (a thread, or a child
process) could run in parallel, and it gets the CPUs back, as do all the others:
serializing them cost `guests/latecode`'s 4 threads 0.28 -> 0.41 s. The guest keeps
seeing the affinity it would have natively (sched_getaffinity is hooked), and a
guest that sets its own affinity ends the pin first. Residual: /proc/self/status
shows the pin in `Cpus_allowed` while it lasts.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def _current_cpu() -> int:
    """The CPU this process runs on now (/proc/self/stat, field 39)."""
    with open("/proc/self/stat") as f:
        return int(f.read().rpartition(")")[2].split()[36])


class Pinning:
    def __init__(self, enabled: bool = True) -> None:
        self.mask = frozenset(os.sched_getaffinity(0))   # what the guest natively gets
        self.enabled = enabled and len(self.mask) > 1
        self.cpu: int | None = None

    @property
    def pinned(self) -> bool:
        return self.cpu is not None

    def pin(self) -> None:
        """Put sbe on one CPU of its mask; a guest it forks next starts there too."""
        if not self.enabled:
            return
        cpu = _current_cpu()
        self.cpu = cpu if cpu in self.mask else min(self.mask)
        os.sched_setaffinity(0, {self.cpu})
        log.debug("sbe and its guest pinned to CPU %d", self.cpu)

    def release(self, tids) -> None:
        """Give sbe and the tasks `tids` their CPUs back, for good."""
        if self.cpu is None:
            return
        for tid in tids:
            try:
                os.sched_setaffinity(tid, self.mask)
            except OSError:
                pass   # gone meanwhile
        os.sched_setaffinity(0, self.mask)
        log.debug("the guest has %d tasks: pin to CPU %d released", len(tids), self.cpu)
        self.cpu = None

    def mask_bytes(self, size: int) -> bytes:
        """The guest's own mask as sched_getaffinity writes it: a bit per CPU, in
        `size` bytes."""
        bits = sum(1 << cpu for cpu in self.mask if cpu < 8 * size)
        return bits.to_bytes(size, "little")
