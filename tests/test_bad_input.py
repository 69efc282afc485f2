"""Bad input gets one clear line on stderr and the exit status a shell would give,
never a traceback; nothing the user gave is modified."""
from __future__ import annotations

import os
import struct

import pytest

from conftest import run_cmd, sbe_argv


def elf_header(ei_class: int, machine: int) -> bytes:
    ident = b"\x7fELF" + bytes([ei_class, 1, 1]) + bytes(9)
    return ident + struct.pack("<HHI", 2, machine, 1) + bytes(40)


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "dir").mkdir()
    noexec = tmp_path / "noexec"
    noexec.write_bytes(elf_header(2, 62))
    for name, data in {"text": b"just some text\n", "elf32": elf_header(1, 3),
                       "arm64": elf_header(2, 183)}.items():
        (tmp_path / name).write_bytes(data)
        (tmp_path / name).chmod(0o755)
    return tmp_path


CASES = [
    ("missing", "./does-not-exist", 127, "No such file or directory"),
    ("not-in-path", "sbe-no-such-command-xyz", 127, "command not found"),
    ("directory", "./dir", 126, "Is a directory"),
    ("not-executable", "./noexec", 126, "Permission denied"),
    ("not-elf", "./text", 126, "Exec format error"),
    ("elf32", "./elf32", 126, "32-bit"),
    ("other-machine", "./arm64", 126, "not x86-64"),
]


def check_one_line(result, status, words):
    err = result.stderr.decode()
    assert result.status == status, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("sbe: ") and words in err, err


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case,prog,status,words", CASES, ids=[c[0] for c in CASES])
def test_run_refuses(bad_files, case, prog, status, words):
    if case == "not-executable" and os.geteuid() == 0:
        # root may read anything, but execute needs an x bit: still refused.
        pass
    before = {p.name: p.read_bytes() for p in bad_files.iterdir() if p.is_file()}
    check_one_line(run_cmd(sbe_argv("run", "--", prog), cwd=bad_files), status, words)
    assert {p.name: p.read_bytes() for p in bad_files.iterdir() if p.is_file()} == before


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case,prog,status,words", CASES, ids=[c[0] for c in CASES])
def test_scan_refuses(bad_files, case, prog, status, words):
    check_one_line(run_cmd(sbe_argv("scan", prog), cwd=bad_files), status, words)


@pytest.mark.timeout(30)
def test_run_without_program_is_a_usage_error():
    result = run_cmd(sbe_argv("run"))
    assert result.status == 2 and b"usage:" in result.stderr and b"Traceback" not in result.stderr


@pytest.mark.timeout(30)
def test_unwritable_sites_out_keeps_the_guest_status(guests, tmp_path):
    result = run_cmd(sbe_argv("run", "--sites-out", str(tmp_path / "no" / "such" / "f.json"),
                              "--", str(guests / "exit3")))
    assert result.status == 3
    assert result.stdout == b"exiting with 3\n"
    assert b"cannot write" in result.stderr and b"Traceback" not in result.stderr


@pytest.mark.timeout(30)
def test_an_internal_failure_is_one_line_and_kills_the_guest(guests, monkeypatch, capsys):
    """If sbe itself fails (here: the image set-up), the user gets one line and
    status 125, not a traceback, and no traced guest is left behind."""
    from sbe.monitor import cli, image, session

    def broken(_session, thread):
        broken.tid = thread.tid
        raise image.SetupError("cannot map the syscall gadget (injected by the test)")
    monkeypatch.setattr(session, "setup_image", broken)
    assert cli.main(["run", "--", str(guests / "exit3")]) == 125
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sbe: internal error: SetupError")
    with pytest.raises(ChildProcessError):
        os.waitpid(broken.tid, 0)       # reaped: nothing left running
