"""Setting up a freshly exec'd image before its first instruction runs.

At the exec's syscall-exit stop: map the gadget at its fixed address (the seccomp
filter, which survives exec, allows syscalls from there), make every executable
mapping non-executable so its first fetch faults into the scanner (or plant what the
scan cache knows of it), scan the vDSO eagerly (the kernel refuses to mprotect it),
and arm CPUID faulting where the CPU has
it (exec resets it).
"""
from __future__ import annotations

import hashlib
import logging
import os

from sbe.meta.module import parse_maps
from sbe.meta.pagemap import (MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE, PAGE, PROT_EXEC, PROT_READ,
                              PROT_WRITE)
from sbe.meta.syscalls import SYS
from sbe.scanner.elfread import function_addresses
from sbe.monitor import codecache, remote
from sbe.patcher import gadget

log = logging.getLogger(__name__)

ARCH_SET_CPUID = 0x1012


class SetupError(Exception):
    pass


def prot_of(perms: str) -> int:
    return ((PROT_READ if perms[0] == "r" else 0) | (PROT_WRITE if perms[1] == "w" else 0)
            | (PROT_EXEC if perms[2] == "x" else 0))


def setup_image(session, thread) -> None:
    space = thread.space
    mem = space.mem
    result = remote.bootstrap(thread, mem, SYS.mmap, gadget.GADGET_BASE, gadget.GADGET_SIZE,
                              PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                              -1, 0)
    if result != gadget.GADGET_BASE:
        raise SetupError(f"cannot map the syscall gadget at {gadget.GADGET_BASE:#x} (result {result})")
    mem.write(gadget.GADGET_BASE, gadget.CODE)
    session.stats.remote_syscalls += 1
    space.maps_changed()
    syscall = session.remote(thread)     # the gadget exists from here on
    space.program = program_tag(thread.tid)
    with open(f"/proc/{thread.tid}/maps") as f:
        maps = parse_maps(f.read())
    for m in maps:
        if "x" not in m.perms or m.start == gadget.GADGET_BASE or m.path == "[vsyscall]":
            continue
        prot = prot_of(m.perms)
        space.pages.track(m.start, m.end, prot)
        if m.path == "[vdso]":
            continue
        # Pages the scan cache planted stay executable; the rest fault at first fetch.
        cached = set(codecache.bind(session, thread, m.start, m.end, m.path))
        unscanned = [p for p in range(m.start, m.end, PAGE) if p not in cached]
        for start, end in codecache.runs_of(unscanned):
            r = syscall(SYS.mprotect, start, end - start, prot & ~PROT_EXEC)
            if r < 0:
                raise SetupError(f"cannot make {m.path or 'code'} at {start:#x} non-executable ({r})")
    for m in maps:
        if m.path == "[vdso]":
            pages = range(m.start, m.end, PAGE)
            scanned = set(codecache.bind(session, thread, m.start, m.end, m.path)) != set(pages)
            if scanned:
                scan_vdso(session, space, m.start, m.end, syscall)
            for page in pages:
                space.pages.mark_scanned(page)
                if scanned:
                    space.learned(page)      # the cache keeps every page: then it knows all of it
    if session.cpuid_faulting and syscall(SYS.arch_prctl, ARCH_SET_CPUID, 0) < 0:
        log.info("CPUID faulting unavailable: a cpuid the scanner misses runs natively")
        session.cpuid_faulting = False


def program_tag(tid: int) -> str:
    """What the scan cache calls the program a task runs: a digest of its executable's
    path. Only which cached pages are planted at once depends on it (those this
    program's runs executed), never what is planted."""
    try:
        path = os.readlink(f"/proc/{tid}/exe")
    except OSError:
        return ""
    return hashlib.sha256(path.encode(errors="surrogateescape")).hexdigest()[:12]


def scan_vdso(session, space, start: int, end: int, remote) -> None:
    """The vDSO stays executable (mprotect on it fails), so it is scanned whole now,
    unless the scan cache knows it (it is the kernel's: the same in every process):
    from its exported functions, then from every entry that code gives its other
    pages, since no fetch fault will come to scan those either. Its pages with no
    code left are then marked scanned: they hold the ELF headers and data, and
    nothing else is reachable."""
    # No thread runs the vDSO yet (the exec'd one stands at the image's entry), so
    # windows may go into its pages even after they were first scanned.
    avoid = session.thread_rips(space)
    work = sorted(function_addresses(space.mem.read(start, end - start), start), reverse=True)
    while work:
        entry = work.pop()
        if start <= entry < end:
            session.plant_count(session.patcher.scan(space, entry, remote, avoid, world=lambda: avoid, fresh=True))
        if not work:
            work = sorted((e for page in range(start, end, PAGE) for e in space.pages.get(page).entries),
                          reverse=True)
