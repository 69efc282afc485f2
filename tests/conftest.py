"""Shared fixtures: the sample guests, and running a command natively or under sbe.

Every guest run goes through `run_cmd`, which has a timeout and kills the whole process
group on expiry, so a hang fails fast and no traced guest outlives its test.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "build" / "guests"


@dataclass
class Result:
    status: int
    stdout: bytes
    stderr: bytes


def run_cmd(argv, *, timeout=60, cwd=None, stdin=None, env=None) -> Result:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                            cwd=cwd, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    status = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    return Result(status, out, err)


def sbe_argv(*args) -> list[str]:
    """sbe from this checkout (installed editable), whatever the guest's directory."""
    return [sys.executable, "-m", "sbe", *args]


def run_sbe(argv, *, mode="emulate", extra=(), **kw) -> Result:
    return run_cmd(sbe_argv("run", "--mode", mode, *extra, "--", *argv), **kw)


def real_python() -> str:
    """The python3 interpreter itself: on PATH it may be a version manager's shell
    wrapper (pyenv's shim), which would make the test time bash and pyenv too."""
    for candidate in ("/usr/bin/python3", os.path.realpath(sys.executable)):
        if os.access(candidate, os.X_OK):
            return candidate
    return "python3"


def require(program: str) -> None:
    """Skip a test whose real program this machine lacks."""
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed")


@pytest.fixture(scope="session", autouse=True)
def scan_cache_dir(tmp_path_factory) -> Path:
    """Every sbe a test starts shares one scan cache of the session's own, so later
    runs are warm (as a user's are) and nothing is left in the home directory."""
    path = tmp_path_factory.mktemp("scan-cache")
    os.environ["SBE_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def guests() -> Path:
    subprocess.run(["make", "-s", "-C", str(ROOT / "guests"), f"OUT={GUESTS}"], check=True)
    return GUESTS


def text_of(path):
    """The first executable segment of the ELF file at `path`: its bytes, its address,
    and the entry points sbe scan would start from."""
    from sbe.scanner.elf import _entry_points
    from sbe.scanner.elfread import PF_X, PT_LOAD, ElfImage
    with open(path, "rb") as f:
        elf = ElfImage(f.read())
    segment = next(s for s in elf.segments if s.type == PT_LOAD and s.flags & PF_X)
    return elf.segment_data(segment), segment.vaddr, _entry_points(elf)
