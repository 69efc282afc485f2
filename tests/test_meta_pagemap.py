"""A forked child's page map shares the parent's page states until one side asks
for one: what either learns afterwards is its own."""
from __future__ import annotations

from sbe.meta.pagemap import PAGE, PROT_EXEC, PROT_READ, PageMap
from sbe.meta.site import Patch, Site, SiteTable

BASE = 0x400000


def test_a_copied_map_learns_apart_from_its_original():
    parent = PageMap()
    parent.track(BASE, BASE + 3 * PAGE, PROT_READ | PROT_EXEC)
    parent.get(BASE).learn({BASE}, {BASE, BASE + 5}, {BASE + 9})
    child = parent.copy()
    child.get(BASE).learn({BASE + 5}, {BASE + 7}, set())
    child.add_entry(BASE + PAGE + 1)
    parent.get(BASE + 2 * PAGE).learn({BASE + 2 * PAGE}, {BASE + 2 * PAGE}, set())
    assert parent.get(BASE).starts == {BASE, BASE + 5} and child.get(BASE).starts == {BASE, BASE + 5, BASE + 7}
    assert parent.get(BASE + PAGE).entries == set() and child.get(BASE + PAGE).entries == {BASE + PAGE + 1}
    assert parent.get(BASE + 2 * PAGE).scanned and not child.get(BASE + 2 * PAGE).scanned
    child.mark_scanned(BASE + PAGE)
    assert not parent.get(BASE + PAGE).scanned
    grandchild = child.copy()
    grandchild.untrack(BASE, BASE + PAGE)
    assert BASE in child and BASE not in grandchild


def test_a_copied_site_table_indexes_its_own_sites():
    table = SiteTable()
    site = Site(BASE, 2, "syscall", "syscall", "", b"\x0f\x05",
                patch=Patch(BASE, BASE + 5, b"\x0f\x05\x90\x90\x90", 0x700000, 40, trap=0x700010))
    table.add(site)
    twin = table.copy()
    copy = twin.get(BASE)
    assert copy is not site and twin.by_stub(0x700004) is copy and twin.by_trap(0x700010) is copy
    copy.hits += 1
    copy.decoded["x"] = 1
    assert site.hits == 0 and site.decoded == {}
    twin.set_patch(copy, None)
    assert table.by_stub(0x700004) is site and twin.by_stub(0x700004) is None
