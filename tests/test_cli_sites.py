"""`sbe sites FILE`: the saved table in each format, its filters, and its errors.

The command runs as a user runs it (`python3 -m monitor`), so errors are checked as the
user sees them: one `sbe:` line on stderr, exit status 2, never a traceback.
"""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sbe.meta.site import Patch, Site
from sbe.meta.sitesfile import FIELDS, save
from sbe.monitor.table import format_table

ROOT = Path(__file__).resolve().parent.parent

SITES = [
    (100, Site(0x401000, 2, "syscall", "syscall", "", bytes.fromhex("0f05"),
               module="/usr/bin/prog", offset=0x1000, hits=12)),
    (100, Site(0x401008, 2, "syscall", "syscall", "", bytes.fromhex("0f05"),
               module="/usr/bin/prog", offset=0x1008, hits=40)),
    (100, Site(0x7F00_0002_9000, 2, "cpuid", "cpuid", "", bytes.fromhex("0fa2"),
               module="/usr/lib/x86_64-linux-gnu/libc.so.6", offset=0x29000, hits=3,
               patch=Patch(0x7F00_0002_8FFD, 0x7F00_0002_9002, b"", 0x7F00_1000_0040, 0))),
    (100, Site(0x7F00_0002_9100, 2, "rdtsc", "rdtsc", "", bytes.fromhex("0f31"),
               reason="window would cross a branch target",
               module="/usr/lib/x86_64-linux-gnu/libc.so.6", offset=0x29100, hits=500)),
    (101, Site(0x401010, 3, "branch", "jmp", "qword ptr [rax]", bytes.fromhex("ff2000"),
               module="/usr/bin/prog", offset=0x1010, hits=0)),
]
ROWS = [dict(site.to_record(), pid=pid) for pid, site in SITES]


def sbe(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sbe", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def sites_file(tmp_path) -> str:
    path = str(tmp_path / "sites.json")
    save(path, ["/usr/bin/prog", "--flag", "two words"], "patch", ROWS)
    return path


def by_address(rows):
    return sorted(rows, key=lambda r: (r["address"], r["pid"]))


def test_json_gives_back_the_rows(sites_file):
    result = sbe("sites", sites_file, "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == by_address(ROWS)


def test_csv_gives_back_the_rows(sites_file):
    result = sbe("sites", sites_file, "--format", "csv")
    assert result.returncode == 0, result.stderr
    reader = csv.DictReader(io.StringIO(result.stdout))
    assert reader.fieldnames == list(FIELDS)
    parsed = [{k: int(v) if FIELDS[k] is int else v for k, v in row.items()} for row in reader]
    assert parsed == by_address(ROWS)


def test_table(sites_file):
    result = sbe("sites", sites_file)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == "program: /usr/bin/prog --flag 'two words' (mode patch)"
    assert lines[1].split() == ["pid", "address", "module+offset", "kind", "instruction", "bytes",
                                "strategy", "hits", "window", "stub", "reason"]
    body = lines[2:-1]
    assert len(body) == len(ROWS)
    expected_order = by_address(ROWS)
    for line, row in zip(body, expected_order):
        assert f"{row['address']:#x}" in line
    assert "prog+0x1000" in body[0] and "0f 05" in body[0]
    assert "libc.so.6+0x29100" in body[4]
    assert body[4].endswith("window would cross a branch target")
    assert "jmp qword ptr [rax]" in body[2] and "ff 20 00" in body[2]
    jmp5 = next(line for line in body if "cpuid" in line)
    assert "0x7f0000028ffd-0x7f0000029002" in jmp5 and "0x7f0010000040" in jmp5
    # Numbers are right-aligned: the hits column ends at the same place in every line.
    hits_end = lines[1].index("hits") + len("hits")
    assert [line[:hits_end].split()[-1] for line in body] == [str(r["hits"]) for r in expected_order]
    assert lines[-1] == "5 sites: 2 syscall, 1 cpuid, 1 rdtsc, 1 branch; strategies: int3 4, jmp5 1"


def test_table_leaves_out_columns_that_say_nothing(sites_file):
    result = sbe("sites", sites_file, "--kind", "syscall")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["address", "module+offset", "kind", "instruction", "bytes",
                                "strategy", "hits"]
    assert lines[-1] == "2 of 5 sites: 2 syscall; strategies: int3 2"


def test_kind_filter(sites_file):
    result = sbe("sites", sites_file, "--format", "json", "--kind", "cpuid", "--kind", "branch")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == by_address(r for r in ROWS if r["kind"] in ("cpuid", "branch"))


def test_module_filter(sites_file):
    result = sbe("sites", sites_file, "--format", "csv", "--module", "libc")
    assert result.returncode == 0, result.stderr
    addresses = [int(row["address"]) for row in csv.DictReader(io.StringIO(result.stdout))]
    assert addresses == [0x7F00_0002_9000, 0x7F00_0002_9100]


def test_filters_combine_and_may_leave_nothing(sites_file):
    result = sbe("sites", sites_file, "--module", "libc", "--kind", "syscall")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == ["0 of 5 sites"]
    result = sbe("sites", sites_file, "--module", "libc", "--kind", "syscall", "--format", "json")
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize("key, expected", [
    ("hits", [500, 40, 12, 3, 0]),
    ("kind", ["syscall", "syscall", "cpuid", "rdtsc", "branch"]),
])
def test_sort(sites_file, key, expected):
    result = sbe("sites", sites_file, "--format", "json", "--sort", key)
    assert result.returncode == 0, result.stderr
    field = "hits" if key == "hits" else "kind"
    assert [row[field] for row in json.loads(result.stdout)] == expected


def assert_one_error_line(result, *phrases):
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sbe: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0]


def corrupt(tmp_path, name, change) -> str:
    doc = json.loads(json.dumps({"format": "sbe-sites", "version": 1, "program": ["prog"],
                                 "mode": "emulate", "sites": ROWS}))
    change(doc)
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.mark.parametrize("name, change, phrase", [
    ("wrong-tag.json", lambda d: d.update(format="something-else"), "format is 'something-else'"),
    ("missing-field.json", lambda d: d["sites"][3].pop("strategy"), "row 4 of 5: missing field 'strategy'"),
    ("bad-hex.json", lambda d: d["sites"][0].update(bytes="0xf05"), "field 'bytes' is not hex"),
    ("unknown-kind.json", lambda d: d["sites"][1].update(kind="vmcall"), "unknown kind 'vmcall'"),
    ("bad-type.json", lambda d: d["sites"][1].update(hits="many"), "field 'hits' is a string"),
])
def test_corrupt_file(tmp_path, name, change, phrase):
    path = corrupt(tmp_path, name, change)
    assert_one_error_line(sbe("sites", path), path, phrase)


def test_not_json(tmp_path):
    path = tmp_path / "truncated.json"
    path.write_text('{"format": "sbe-sites", "version": 1, "sites": [{"address": 4')
    assert_one_error_line(sbe("sites", str(path)), str(path), "not JSON")


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.json")
    assert_one_error_line(sbe("sites", path), path, "No such file")


def test_bad_kind(sites_file):
    assert_one_error_line(sbe("sites", sites_file, "--kind", "syscall", "--kind", "nope"), "'nope'")


def test_closed_pipe_is_not_an_error(tmp_path):
    path = str(tmp_path / "many.json")
    rows = [dict(Site(0x400000 + 2 * i, 2, "syscall", "syscall", "", b"\x0f\x05",
                      module="/bin/prog", offset=2 * i).to_record(), pid=1) for i in range(5000)]
    save(path, ["prog"], "emulate", rows)
    # The reader is gone before the command writes anything, as with `| head -1` on a
    # table longer than the pipe holds.
    proc = subprocess.Popen([sys.executable, "-m", "sbe", "sites", path], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.wait(timeout=60)
    proc.stderr.close()
    assert stderr == ""
    assert proc.returncode == 141


def test_format_table_aligns():
    text = format_table(["name", "count", "note"], [["a", 5, None], ["bbb", 1234, "x"]])
    assert text.splitlines() == [
        "name  count  note",
        "a         5",
        "bbb    1234  x",
    ]
    assert format_table(None, [["k", "v"]]) == "k  v"
    assert format_table(["a", "b"], [["1", "2"]], align="><") == "a  b\n1  2"
    with pytest.raises(ValueError):
        format_table(["a", "b"], [["only one"]])
    with pytest.raises(ValueError):
        format_table(["a"], [["x"]], align="^")
