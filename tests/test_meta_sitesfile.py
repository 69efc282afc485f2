"""The sites file: what save() writes, load() reads back, and what load() refuses."""
from __future__ import annotations

import json
import os

import pytest

from sbe.meta.site import Patch, Site
from sbe.meta.sitesfile import FIELDS, FORMAT, VERSION, SitesFileError, load, save


def rows() -> list[dict]:
    sites = [
        Site(0x401000, 2, "syscall", "syscall", "", bytes.fromhex("0f05"),
             module="/usr/bin/prog", offset=0x1000, hits=7),
        Site(0x7F12_3456_7000, 2, "cpuid", "cpuid", "", bytes.fromhex("0fa2"), patch=Patch(0, 0, b"", 0, 0),
             module="/usr/lib/libc.so.6", offset=0x27000, hits=1),
        Site(0x401020, 3, "branch", "jmp", "qword ptr [rax]", bytes.fromhex("ff2000"),
             reason="no safe window", module="/usr/bin/prog", offset=0x1020),
    ]
    return [dict(site.to_record(), pid=4242) for site in sites]


def write_doc(path, doc) -> str:
    path.write_text(json.dumps(doc))
    return str(path)


def good_doc() -> dict:
    return {"format": FORMAT, "version": VERSION, "program": ["/usr/bin/prog", "-x"],
            "mode": "patch", "sites": rows()}


def test_round_trip(tmp_path):
    path = str(tmp_path / "sites.json")
    save(path, ["/usr/bin/prog", "-x"], "patch", rows())
    assert load(path) == good_doc()


def test_a_version_1_file_reads_with_no_islands(tmp_path):
    doc = good_doc()
    doc["version"] = 1
    for row in doc["sites"]:
        del row["island"]
    got = load(write_doc(tmp_path / "old.json", doc))
    assert [row["island"] for row in got["sites"]] == [0] * len(doc["sites"])
    doc["version"] = 2
    with pytest.raises(SitesFileError, match="missing field 'island'"):
        load(write_doc(tmp_path / "new.json", doc))


def test_a_version_2_file_reads_with_no_tactics(tmp_path):
    doc = good_doc()
    doc["version"] = 2
    for row in doc["sites"]:
        del row["tactic"]
    got = load(write_doc(tmp_path / "old.json", doc))
    assert [row["tactic"] for row in got["sites"]] == [""] * len(doc["sites"])
    doc["version"] = 3
    with pytest.raises(SitesFileError, match="missing field 'tactic'"):
        load(write_doc(tmp_path / "new.json", doc))


def test_the_file_is_json_with_one_site_per_line(tmp_path):
    path = tmp_path / "sites.json"
    save(str(path), ["prog"], "emulate", rows())
    lines = path.read_text().splitlines()
    assert json.loads(path.read_text())["sites"] == rows()
    assert [json.loads(line.rstrip(",")) for line in lines[1:-1]] == rows()


def test_empty_table(tmp_path):
    path = str(tmp_path / "sites.json")
    save(path, [], "emulate", [])
    assert load(path)["sites"] == []


def test_save_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sites.json"
    path.write_text("old")
    save(str(path), ["prog"], "patch", rows())
    assert load(str(path))["sites"] == rows()
    assert os.listdir(tmp_path) == ["sites.json"]


def test_save_refuses_what_load_would_refuse(tmp_path):
    path = tmp_path / "sites.json"
    path.write_text("old")
    bad = rows()
    del bad[1]["pid"]
    with pytest.raises(SitesFileError, match="row 2 of 3: missing field 'pid'"):
        save(str(path), ["prog"], "patch", bad)
    with pytest.raises(SitesFileError, match="mode"):
        save(str(path), ["prog"], "fast", rows())
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["sites.json"]


def broken(change) -> dict:
    doc = good_doc()
    change(doc)
    return doc


CORRUPT = {
    "top level a list": ([], "not a sites file (the top level is a list"),
    "no format": (broken(lambda d: d.pop("format")), "no 'format' field"),
    "wrong format": (broken(lambda d: d.update(format="rr-trace")), "format is 'rr-trace'"),
    "newer version": (broken(lambda d: d.update(version=VERSION + 1)), f"unsupported version {VERSION + 1}"),
    "version true": (broken(lambda d: d.update(version=True)), "unsupported version True"),
    "program a string": (broken(lambda d: d.update(program="prog")), "'program' must be a list"),
    "bad mode": (broken(lambda d: d.update(mode="fast")), "mode is 'fast'"),
    "sites missing": (broken(lambda d: d.pop("sites")), "'sites' must be a list, not null"),
    "row not an object": (broken(lambda d: d["sites"].append(7)), "row 4 of 4: is a number"),
    "missing field": (broken(lambda d: d["sites"][0].pop("kind")), "row 1 of 3: missing field 'kind'"),
    "address a string": (broken(lambda d: d["sites"][1].update(address="0x401000")),
                         "row 2 of 3: field 'address' is a string, expected an integer"),
    "hits a float": (broken(lambda d: d["sites"][1].update(hits=1.0)), "field 'hits' is a number"),
    "size a boolean": (broken(lambda d: d["sites"][1].update(size=True)), "field 'size' is a boolean"),
    "negative offset": (broken(lambda d: d["sites"][2].update(offset=-4)), "field 'offset' is negative"),
    "reason null": (broken(lambda d: d["sites"][2].update(reason=None)), "field 'reason' is null"),
    "bytes not hex": (broken(lambda d: d["sites"][0].update(bytes="0g05")), "field 'bytes' is not hex"),
    "bytes odd length": (broken(lambda d: d["sites"][0].update(bytes="0f0")), "field 'bytes' is not hex"),
    "bytes spaced": (broken(lambda d: d["sites"][0].update(bytes="0f 05")), "field 'bytes' is not hex"),
    "bytes empty": (broken(lambda d: d["sites"][0].update(bytes="")), "field 'bytes' is not hex"),
    "unknown kind": (broken(lambda d: d["sites"][2].update(kind="sysenter")),
                     "row 3 of 3: unknown kind 'sysenter'"),
    "unknown strategy": (broken(lambda d: d["sites"][2].update(strategy="call5")),
                         "unknown strategy 'call5'"),
}


@pytest.mark.parametrize("name", CORRUPT)
def test_load_refuses(tmp_path, name):
    doc, expected = CORRUPT[name]
    path = write_doc(tmp_path / "sites.json", doc)
    with pytest.raises(SitesFileError) as caught:
        load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize("content, expected", [
    (b"", r"not JSON \(line 1 column 1"),
    (b'{"format": "sbe-sites", ', "not JSON"),
    (b"\xff\xfe\x00", "not UTF-8"),
])
def test_load_refuses_what_is_not_json(tmp_path, content, expected):
    path = tmp_path / "sites.json"
    path.write_bytes(content)
    with pytest.raises(SitesFileError, match=expected):
        load(str(path))


def test_load_names_an_unreadable_file(tmp_path):
    with pytest.raises(SitesFileError, match="missing.json: cannot read: No such file"):
        load(str(tmp_path / "missing.json"))
    with pytest.raises(SitesFileError, match="cannot read: Is a directory"):
        load(str(tmp_path))


def test_every_record_field_is_a_row_field():
    assert set(FIELDS) == set(rows()[0])
