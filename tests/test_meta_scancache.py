"""The scan cache's format and files: what it reads back is what was stored, and
anything else it finds is ignored, never trusted."""
from __future__ import annotations

import os
import stat

import pytest

from sbe.meta import scancache
from sbe.meta.scancache import Entry, PageRecord, ScanCache, decode, encode, key_of

CODE = bytes(range(256)) * 16


def entry(key=None) -> Entry:
    e = Entry(key or key_of(CODE), "/lib/libdemo.so", len(CODE))
    e.pages[0] = PageRecord({0, 5, 7, 9, 4000}, {0}, {-16, 9, 70000},
                            {5: (2, "syscall", "syscall", "", (5, 9, (), ((7, 2, "mov", "eax, ebx"),)),
                                 ("e9000000cc", 3, 4, ((0, 7),), ((1, 9, "guest", 0), (9, 16, "cache", 1)),
                                  ((9, "/lib/libdemo.so", 9),))),
                             4000: (1, "branch", "ret", "", "basic block too short", None)},
                            {4100, -4096}, ["a1b2c3d4e5f6"])
    e.pages[4096] = PageRecord({4096}, {4096}, set(), {})
    return e


def test_round_trip():
    e = entry()
    back = decode(encode(e), e.key)
    assert back == e


def test_key_is_the_content():
    assert key_of(CODE) == key_of(bytes(CODE))
    assert key_of(CODE) != key_of(CODE[:-1] + b"\x00")


@pytest.mark.parametrize("damage", [
    lambda d: d[:len(d) // 2],                       # truncated
    lambda d: d[:-1] + bytes([d[-1] ^ 1]),           # a flipped bit
    lambda d: b"SBESCAN\x63" + d[8:],                # another format version
    lambda d: b"",
])
def test_damaged_entries_are_refused(damage):
    e = entry()
    with pytest.raises(scancache.CorruptEntry):
        decode(damage(encode(e)), e.key)


def test_an_entry_for_other_content_is_refused():
    e = entry()
    with pytest.raises(scancache.CorruptEntry):
        decode(encode(e), key_of(b"other"))


def test_store_merges_what_runs_learn(tmp_path):
    """Pages are added; a page both runs scanned takes the newer decoding (two
    decodings' starts may overlap), with the roots of both."""
    cache = ScanCache(str(tmp_path))
    first = entry()
    cache.store(first)
    second = Entry(first.key, first.path, first.size)
    second.pages[0] = PageRecord({12}, {12}, set(), {12: (2, "cpuid", "cpuid", "", None, None)})
    second.pages[8192] = PageRecord({8192}, {8192}, set(), {})
    cache.store(second)
    got = ScanCache(str(tmp_path)).load(first.key)
    assert set(got.pages[0].starts) == {12} and set(got.pages[0].sites) == {12}
    assert got.pages[0].roots == {0, 12}
    assert set(got.pages) == {0, 4096, 8192}


def test_a_merge_keeps_a_plan_the_newer_run_did_not_make():
    """An emulate-mode run keeps no plans; the patch runs' plans for the same
    instructions survive its merge, and a changed instruction takes none along."""
    e = entry()
    emulated = Entry(e.key, e.path, e.size)
    emulated.pages[0] = PageRecord({0, 5, 7, 9, 4000}, set(), set(),
                                   {5: (2, "syscall", "syscall", "", None, None),
                                    4000: (1, "branch", "call", "rax", None, None)})
    e.merge(emulated)
    assert e.pages[0].sites[5] == entry().pages[0].sites[5]
    assert e.pages[0].sites[4000] == (1, "branch", "call", "rax", None, None)


def test_a_page_remembers_the_programs_that_ran_it_most_recent_first():
    older, newer = PageRecord(users=[f"p{i}" for i in range(20)]), PageRecord(users=["p5", "new"])
    older = older.merged(newer)
    assert older.users[:3] == ["p5", "new", "p0"] and len(older.users) == scancache.USERS


def test_what_is_not_a_file_of_ours_is_a_miss(tmp_path):
    cache = ScanCache(str(tmp_path))
    e = entry()
    os.mkfifo(cache.path_of(e.key))
    assert cache.load(e.key) is None            # a fifo: not read (it would block)
    os.unlink(cache.path_of(e.key))
    os.mkdir(cache.path_of(e.key))
    assert cache.load(e.key) is None            # a directory
    cache.store(e)                              # cannot replace it: the run goes on
    os.rmdir(cache.path_of(e.key))
    os.symlink("/etc/passwd", cache.path_of(e.key))
    assert cache.load(e.key) is None            # a link is not followed
    os.unlink(cache.path_of(e.key))
    cache.store(e)
    assert cache.load(e.key) == e


def test_a_directory_others_can_write_is_not_used(tmp_path):
    os.chmod(tmp_path, 0o777)
    cache = ScanCache(str(tmp_path))
    assert not cache.usable
    cache.store(entry())
    assert os.listdir(tmp_path) == []
    assert cache.load(entry().key) is None


def test_an_unusable_directory_is_a_miss(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = ScanCache(str(blocker / "cache"))
    assert not cache.usable and cache.load(entry().key) is None
    cache.store(entry())


def test_where_the_cache_lives():
    assert scancache.default_directory({"SBE_CACHE_DIR": "/x"}) == "/x"
    assert scancache.default_directory({"XDG_CACHE_HOME": "/c"}) == "/c/sbe"
    assert scancache.default_directory({}).endswith(os.path.join(".cache", "sbe"))


def test_entries_are_private(tmp_path):
    cache = ScanCache(str(tmp_path / "new"))
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o700


def test_least_recently_used_entries_go_first(tmp_path):
    cache = ScanCache(str(tmp_path))
    keys = [key_of(bytes([i])) for i in range(3)]
    for i, key in enumerate(keys):
        cache.store(entry(key))
        os.utime(cache.path_of(key), (1000 + i, 1000 + i))
    cache.load(keys[0])                        # used now: the newest
    cache.limit = sum(os.path.getsize(cache.path_of(k)) for k in (keys[0], keys[2]))
    assert cache.evict() == 1
    assert [k for k, _ in cache.files()] == [keys[2], keys[0]]
