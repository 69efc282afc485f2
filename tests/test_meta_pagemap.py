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
    assert copy is not site and twin.by_stub(0x700004) == (copy, copy.patch)
    assert twin.by_trap(0x700010) == (copy, copy.patch)
    copy.hits += 1
    copy.decoded["x"] = 1
    assert site.hits == 0 and site.decoded == {}
    twin.set_patch(copy, None)
    twin.prune(())
    assert table.by_stub(0x700004) == (site, site.patch) and twin.by_stub(0x700004) is None


def test_a_stub_outlives_its_patch_while_a_thread_may_be_in_it():
    """A site re-planted (or dropped) while a thread is inside its old stub: the stub's
    trap still names the site and that stub's patch, until no thread stands in it."""
    table = SiteTable()
    old = Patch(BASE, BASE + 5, b"\x0f\x05\x90\x90\x90", 0x700000, 40, trap=0x700010, resume=0x700012)
    site = Site(BASE, 2, "syscall", "syscall", "", b"\x0f\x05", patch=old)
    table.add(site)
    new = old._replace(stub=0x700100, trap=0x700110, resume=0x700112)
    table.set_patch(site, new)
    assert table.by_trap(0x700010) == (site, old) and table.by_trap(0x700110) == (site, new)
    assert table.by_stub(0x700020) == (site, old)
    assert table.prune({0x700008, 0x700104}) == 0          # a thread in each stub
    assert table.copy().by_trap(0x700010)[1] == old
    table.remove(BASE)
    assert table.by_trap(0x700110) == (site, new)
    assert table.prune({0x700104}) == 1 and table.by_trap(0x700010) is None
    assert table.prune(()) == 1 and table.by_stub(0x700104) is None
