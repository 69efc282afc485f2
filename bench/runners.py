"""The runner table: how each way of running a program wraps its command line."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

def sbe(root: Path, empty_cache: bool = False) -> list[str]:
    """`python3 -m sbe` from the checkout at root (whose folder is the `sbe` package),
    independent of the current directory, of what is installed and of PYTHONPATH
    (which the guest would inherit). `empty_cache`: every run gets a scan cache
    directory of its own, empty, removed when sbe exits (a cold start that pays for
    saving what it scanned, as a user's first run does)."""
    cache = ("import atexit, shutil, tempfile; d = tempfile.mkdtemp(prefix='sbe-cold-'); "
             "atexit.register(shutil.rmtree, d, True); sys.argv[2:2] = ['--cache-dir', d]; "
             if empty_cache else "")
    return [sys.executable, "-c",
            "import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('sbe', {str(root / '__init__.py')!r}, "
            f"submodule_search_locations=[{str(root)!r}]); "
            "sys.modules['sbe'] = module = importlib.util.module_from_spec(spec); "
            "spec.loader.exec_module(module); sys.argv[0] = 'sbe'; " + cache +
            "from sbe.monitor.cli import _entry; _entry()"]


@dataclass
class Runner:
    name: str
    prefix: list[str]      # prepended to the workload's argv
    tool: str | None       # executable that must be on PATH, if any
    about: str
    warmup: int = 0        # runs of each cell before the counted ones

    @property
    def is_sbe(self) -> bool:
        """sbe's runners end in `run ... --`, where `--stats-json FILE` can go."""
        return self.prefix[-1:] == ["--"] and "run" in self.prefix

    def argv(self, workload: list[str], stats: str | None = None) -> list[str]:
        if stats is None or not self.is_sbe:
            return [*self.prefix, *workload]
        return [*self.prefix[:-1], "--stats-json", stats, "--", *workload]


def make_runners(sbe_root: Path = REPO) -> list[Runner]:
    return [
        Runner("native", [], None, "the program alone"),
        Runner("emulate", [*sbe(sbe_root), "run", "--mode", "emulate", "--"], None,
               "sbe run --mode emulate"),
        Runner("patch", [*sbe(sbe_root), "run", "--mode", "patch", "--"], None,
               "sbe run --mode patch, warm: two runs not counted come first, the first scanning "
               "what the program runs, the second saving what a warm run learns of it (branch "
               "targets validated at run time, pages planned afresh)", warmup=2),
        Runner("patch-cold", [*sbe(sbe_root, empty_cache=True), "run", "--mode", "patch", "--"], None,
               "sbe run --mode patch, each run on an empty scan cache directory (every page "
               "scanned, and saved)"),
        Runner("strace", ["strace", "-f", "-o", "/dev/null"], "strace", "strace -f -o /dev/null"),
        Runner("valgrind", ["valgrind", "--tool=none", "-q", "--trace-children=yes"], "valgrind",
               "valgrind --tool=none -q --trace-children=yes"),
        Runner("qemu", ["qemu-x86_64", "-L", "/"], "qemu-x86_64", "qemu-x86_64 -L / (qemu-user)"),
    ]


NAMES = [r.name for r in make_runners()]
PEERS = {"strace", "valgrind", "qemu-x86_64"}   # what bench/setup.sh installs


@dataclass
class Result:
    seconds: float
    status: int | None     # exit status as a shell reports it; None on timeout
    stdout: bytes
    stderr: bytes

    @property
    def timed_out(self) -> bool:
        return self.status is None


def run_once(argv: list[str], timeout: float, env: dict[str, str], cwd: str) -> Result:
    """Run argv once, timing it by the wall clock.  On timeout the whole process group
    (runner and guest) is killed with SIGKILL: a tracer may forward a plain SIGTERM to a
    stopped guest and never exit."""
    start = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, cwd=cwd, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = p.communicate()
        return Result(time.perf_counter() - start, None, out, err)
    seconds = time.perf_counter() - start
    status = p.returncode if p.returncode >= 0 else 128 - p.returncode
    return Result(seconds, status, out, err)


def last_line(data: bytes, limit: int = 160) -> str:
    lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def probe(runner: Runner, startup: str, timeout: float, env: dict[str, str],
          cwd: str) -> str | None:
    """None when the runner can run the trivial program; else why not (short)."""
    if runner.tool and not shutil.which(runner.tool):
        return f"{runner.tool} not installed"
    try:
        r = run_once([*runner.prefix, startup], timeout, env, cwd)
    except OSError as e:
        return f"cannot start: {e.strerror}"
    if r.timed_out:
        return f"start-up probe timed out after {timeout:.0f} s"
    if r.status != 0:
        why = last_line(r.stderr)
        return f"exit {r.status} at start-up" + (f": {why}" if why else "")
    return None
