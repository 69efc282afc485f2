"""Reversibility: a guest stopped midway and restored has code byte-identical to its
image (the ELF files it maps, and the kernel's vDSO)."""
from __future__ import annotations

import os
import signal

import pytest

from sbe.meta.module import parse_maps
from sbe.meta.pagemap import PAGE
from verifying import TrapHookSession


def own_vdso() -> bytes:
    with open("/proc/self/maps") as f:
        vdso = next(m for m in parse_maps(f.read()) if m.path == "[vdso]")
    with open("/proc/self/mem", "rb") as f:
        f.seek(vdso.start)
        return f.read(vdso.end - vdso.start)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["emulate", "patch"])
def test_restore_all_gives_back_the_image(guests, mode):
    path = str(guests / "libc_dynamic")
    checked = {}

    def hook(session, thread):
        space = thread.space
        if not any(s.module.endswith("libc.so.6") for s in space.sites):
            return True     # stop once libc is mapped and planted
        assert len(space.sites) > 100
        patched = sum(1 for s in space.sites if space.mem.read(s.patched_spans[0][0], 1) in (b"\xcc", b"\xe9", b"\xeb"))
        assert patched == len(space.sites)
        assert (mode == "patch") == any(s.strategy == "jmp5" for s in space.sites)
        session.patcher.restore_all(space)
        with open(f"/proc/{thread.tid}/maps") as f:
            maps = parse_maps(f.read())
        for m in maps:
            tracked = [p for p in range(m.start, m.end, PAGE) if p in space.pages]
            if not tracked:
                continue
            if m.path == "[vdso]":
                assert space.mem.read(m.start, m.end - m.start) == own_vdso()
                checked["[vdso]"] = m.end - m.start
                continue
            with open(m.path, "rb") as f:
                f.seek(m.offset)
                image = f.read(m.end - m.start)
            live = space.mem.read(m.start, len(image))
            assert live == image, f"{m.path} at {m.start:#x} differs after restore"
            checked[m.path] = len(image)
        os.kill(thread.tid, signal.SIGKILL)
        return False

    session = TrapHookSession([path], path, hook=hook, mode=mode)
    session.run()
    assert any(p.endswith("libc.so.6") for p in checked)
    assert any(p.endswith("libc_dynamic") for p in checked)
    assert "[vdso]" in checked
