"""The C scanner gives what the reference gives, field for field: on real code
(ld.so whole, libc page by page, extension scans from known starts) and on random
bytes."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import text_of
from sbe.scanner import region, scan

pytestmark = pytest.mark.skipif(scan.lib is None, reason="scanner/_region_native is not built")

LD_SO = "/lib64/ld-linux-x86-64.so.2"
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"
FIELDS = ("starts", "sizes", "sites", "outside", "swept", "targets")


def same(code, base, end, entries, known=frozenset(), sweep=True):
    want = region.scan_region(code, base, end, entries, known, sweep)
    got = scan.native_scan_region(code, base, end, entries, known, sweep)
    for name in FIELDS:
        assert getattr(got, name) == getattr(want, name), name
    return want


@pytest.mark.timeout(120)
def test_a_whole_library():
    code, base, entries = text_of(LD_SO)
    assert len(same(code, base, base + len(code), entries).starts) > 10000


@pytest.mark.timeout(120)
def test_pages_and_their_extension_scans():
    code, base, entries = text_of(LIBC)
    rng = random.Random(7)
    for page in range(base - base % 4096 + 4096, base + len(code) - 8192, 4096 * 7):
        chunk = code[page - base:page - base + 4096 + 15]
        mine = {e for e in entries if page <= e < page + 4096} or {page}
        first = same(chunk, page, page + 4096, mine)
        # an extension scan: from an offset the first did not decode, knowing its starts
        later = {page + rng.randrange(4096) for _ in range(3)} - first.starts
        same(chunk, page, page + 4096, later, known=first.starts, sweep=False)


@settings(max_examples=300, deadline=None)
@given(code=st.binary(min_size=1, max_size=600), data=st.data(), sweep=st.booleans())
def test_random_bytes(code, data, sweep):
    base = 0x400000
    end = base + data.draw(st.integers(1, len(code) + 40))
    entries = data.draw(st.sets(st.integers(base - 4, end + 4), max_size=6))
    known = data.draw(st.sets(st.integers(base, end), max_size=6))
    same(code, base, end, entries, known, sweep)


@pytest.mark.timeout(120)
def test_random_slices_of_real_code():
    """Real instructions entered anywhere, out of step included, with known starts
    that may be wrong: what an extension scan after a bad guess meets."""
    code, base, _ = text_of(LIBC)
    rng = random.Random(11)
    for _ in range(200):
        start = base + rng.randrange(len(code) - 5000)
        size = rng.randrange(16, 4096)
        chunk = code[start - base:start - base + size + 15]
        entries = {start + rng.randrange(size) for _ in range(rng.randrange(1, 5))}
        known = {start + rng.randrange(size) for _ in range(rng.randrange(0, 30))}
        same(chunk, start, start + size, entries, known, rng.random() < 0.7)
