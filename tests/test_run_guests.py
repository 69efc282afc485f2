"""Differential tests: every sample guest and a set of real programs give the same
stdout and exit status under sbe as natively."""
from __future__ import annotations


import pytest

from conftest import real_python, require, run_cmd, run_sbe

MODES = ["emulate", "patch"]

SAMPLE_GUESTS = [
    ("rawsys", []), ("cpuid", []), ("rdtsc", []), ("branches", []), ("compute", ["3"]),
    ("libc_static", []), ("libc_dynamic", []), ("exit3", []), ("segv", []),
    ("escape", []), ("sigsegv_handler", []), ("threads", ["2000"]), ("pagerace", []), ("forkwait", []),
    ("vforkexec", []), ("alarm", []), ("altstack", []), ("restart", []), ("rtsig", []),
    ("cancel", []), ("sigcontext", []), ("jobstop", []), ("latecode", ["2000"]),
    ("padding", []), ("slotcall", []), ("codecopy", []),
]


def assert_same(native, virt):
    assert virt.stdout == native.stdout
    assert virt.status == native.status, virt.stderr.decode(errors="replace")[-2000:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,args", SAMPLE_GUESTS, ids=[g[0] for g in SAMPLE_GUESTS])
def test_sample_guest(guests, name, args, mode):
    argv = [str(guests / name), *args]
    assert_same(run_cmd(argv), run_sbe(argv, mode=mode))


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(5):
        (tmp_path / "d" / f"file{i}.txt").write_text(f"content {i}\n" * (i + 1))
    (tmp_path / "data.bin").write_bytes(bytes(range(256)) * 4096)
    return tmp_path


REAL = {
    "true": ["/bin/true"],
    "echo": ["echo", "hi"],
    "ls": ["ls", "-l", "--time-style=+", "d"],
    "sha256sum": ["sha256sum", "data.bin"],
    "bash-pipe": ["bash", "-c", "echo a | tr a b"],
    "python3": [real_python(), "-c", "print(sum(range(10**5)))"],
}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(REAL))
def test_real_program(workdir, name, mode):
    argv = REAL[name]
    require(argv[0])
    native = run_cmd(argv, cwd=workdir)
    assert native.status == 0
    assert_same(native, run_sbe(argv, mode=mode, cwd=workdir, timeout=880))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
def test_threads_fetching_a_new_page_at_once(guests, mode):
    """Eight threads fetch sixteen new pages together: every fetch fault but the
    first of a page is handled after the page was scanned, and is sbe's own, never
    delivered to the guest (it was, as a SIGSEGV, in most runs). No cache, so every
    page is new."""
    argv = [str(guests / "pagerace")]
    native = run_cmd(argv)
    for _ in range(4):
        assert_same(native, run_sbe(argv, mode=mode, extra=["--no-cache"]))
