"""Plans kept in the scan cache: what comes back is what was planned, and a kept
plan the record's own decoding does not bear out is never used."""
from __future__ import annotations

from sbe.meta.scancache import PageRecord
from sbe.patcher import cachedplan
from sbe.scanner.scan import scan_page
from sbe.scanner.window import Fallback, Window, plan_windows

PAGE = 0x7f0000001000
# mov eax, 39; syscall; mov rdi, rax; cpuid; ret; then padding
CODE = (b"\xb8\x27\x00\x00\x00" b"\x0f\x05" b"\x48\x89\xc7" b"\x0f\xa2" b"\xc3").ljust(4096 + 15, b"\xcc")


def planned(base: int, code: bytes = CODE):
    """The page's plans, and its record (offsets from `base`), as a run leaves them."""
    scan = scan_page(code, PAGE, {PAGE})
    targets = scan.targets | {PAGE}
    plans = plan_windows(code, PAGE, PAGE + 4096, scan.starts, scan.sites, targets, arrivals={PAGE})
    record = PageRecord({s - base for s in scan.starts}, {PAGE - base}, {t - base for t in targets},
                        {p.site.address - base: (p.site.size, p.kind, p.site.mnemonic, p.site.op_str,
                                                 cachedplan.to_record(p, base), None) for p in plans})
    return plans, record


def test_kept_plans_come_back_where_the_page_is_mapped_next():
    plans, record = planned(PAGE - 0x3000)
    assert any(isinstance(p, Window) and (p.before or p.after) for p in plans)
    back = cachedplan.from_record(record, 0x5550000000)
    delta = 0x5550000000 - (PAGE - 0x3000)
    assert [(p.site.address, p.kind) for p in back] == [(p.site.address + delta, p.kind) for p in plans]
    for got, want in zip(back, plans):
        assert type(got) is type(want)
        if isinstance(want, Window):
            assert (got.start, got.end) == (want.start + delta, want.end + delta)
            assert [i.address - delta for i in got.insns] == [i.address for i in want.insns]
            assert [i[1:] for i in got.insns] == [i[1:] for i in want.insns]


def _with(record, offset, plan):
    sites = dict(record.sites)
    sites[offset] = (*sites[offset][:4], plan, None)
    return PageRecord(record.starts, record.roots, record.targets, sites, record.exits)


def test_a_kept_plan_the_record_does_not_bear_out_is_refused():
    plans, record = planned(PAGE)
    window = next(p for p in plans if isinstance(p, Window) and len(p.insns) > 1)
    offset = window.site.address - PAGE
    start, end, before, after, guard, island, table = cachedplan.to_record(window, PAGE)
    inside = window.insns[1].address - PAGE
    assert cachedplan.from_record(record, PAGE) is not None
    # a root inside the window (control arrives there)
    assert cachedplan.from_record(PageRecord(record.starts, record.roots | {inside}, record.targets,
                                             record.sites, record.exits), PAGE) is None
    # an instruction the page's decoding does not have
    assert cachedplan.from_record(PageRecord(set(record.starts) - {inside}, record.roots, record.targets,
                                             record.sites, record.exits), PAGE) is None
    # a window that is not its instructions end to end
    assert cachedplan.from_record(_with(record, offset, (start, end + 1, before, after, guard, island, table)), PAGE) is None
    # a site with no plan: the page is planned afresh
    assert cachedplan.from_record(_with(record, offset, None), PAGE) is None


def test_windows_that_overlap_another_site_are_refused():
    plans, record = planned(PAGE)
    sites = [p for p in plans]
    assert len(sites) >= 2
    first, second = sites[0], sites[1]
    # stretch the first window over the second site
    start, end, before, after = (first.site.address - PAGE, second.site.address + second.site.size - PAGE,
                                 (), ())
    between = (*first.after, second.site)        # mov rdi, rax; cpuid: end to end
    assert between[0].address == first.site.end and between[-1].end == PAGE + end
    kept = (start, end, before, tuple((i.address - PAGE, i.size, i.mnemonic, i.op_str) for i in between),
            False, 0, False)
    assert cachedplan.from_record(_with(record, first.site.address - PAGE, kept), PAGE) is None


def test_only_plans_of_the_bytes_and_the_scan_are_kept():
    plans, _ = planned(PAGE)
    window = next(p for p in plans if isinstance(p, Window))
    assert cachedplan.keepable(window, frozenset({1})) is window
    assert cachedplan.keepable(Fallback(window.site, window.kind, "basic block too short"), frozenset()) is not None
    assert cachedplan.keepable(Fallback(window.site, window.kind, "basic block too short"), frozenset({1})) is None
    assert cachedplan.keepable(Fallback(window.site, window.kind, "emulate mode"), frozenset()) is None
    assert cachedplan.keepable(Fallback(window.site, window.kind, "found after its page ran"), frozenset()) is None


def test_a_kept_guard_must_leave_the_site_its_bytes():
    """A guard keeps the site's own bytes: a record whose guard has less than the
    jump's five bytes before the site, or guards a jmp through memory, is refused;
    so is a slot call with less than the jump's and its `call [rsp - 8]`'s 9 bytes."""
    # mov rdi, rbx; mov rax, [rdi + 8]; call rax; ret
    code = bytes.fromhex("4889df" "488b4708" "ffd0" "c3").ljust(4096 + 15, b"\xcc")
    scan = scan_page(code, PAGE, {PAGE})
    targets = scan.targets | {PAGE}
    plans = plan_windows(code, PAGE, PAGE + 4096, scan.starts, scan.sites, targets)
    guard = next(p for p in plans if isinstance(p, Window) and p.guard)
    offset = guard.site.address - PAGE
    sites = {p.site.address - PAGE: (p.site.size, p.kind, p.site.mnemonic, p.site.op_str,
                                     cachedplan.to_record(p, PAGE), None) for p in plans}
    record = PageRecord({s - PAGE for s in scan.starts}, {0}, {t - PAGE for t in targets}, sites, {})
    assert cachedplan.from_record(record, PAGE) is not None
    start, end, before, after, _, _, _ = sites[offset][4]
    short = (start + 3, end, before[1:], after, True, 0, False)     # only `mov rax, [rdi + 8]` before
    assert cachedplan.from_record(_with(record, offset, short), PAGE) is None
    def with_site(mnemonic, op_str, plan):
        changed = dict(sites)
        changed[offset] = (sites[offset][0], "branch", mnemonic, op_str, plan, None)
        return PageRecord(record.starts, record.roots, record.targets, changed, record.exits)
    assert cachedplan.from_record(with_site("jmp", "qword ptr [rax]", sites[offset][4]), PAGE) is None
    assert cachedplan.from_record(with_site("call", "qword ptr [rax]", sites[offset][4]), PAGE) is not None
    assert cachedplan.from_record(with_site("call", "qword ptr [rax]", short), PAGE) is None


# ret; nop x 15; then at +16 a loop head no window fits: rdtsc (a target), then a
# target: dec rcx; jne +16; jmp +18; ret
LOOP_HEAD = (b"\xc3" + b"\x90" * 15 + b"\x0f\x31" b"\x48\xff\xc9" b"\x75\xf9" b"\xeb\xf9" b"\xc3").ljust(4096 + 15, b"\xcc")


def test_a_kept_island_comes_back_and_is_checked():
    plans, record = planned(PAGE - 0x3000, LOOP_HEAD)
    (window,) = plans
    assert window.island == PAGE + 1
    (back,) = cachedplan.from_record(record, 0x5550000000)
    assert back.island == 0x5550000000 + 0x3000 + 1
    offset = window.site.address - (PAGE - 0x3000)
    start, end, before, after, guard, island, table = record.sites[offset][4]
    def refused(**change):
        roots = record.roots | change.get("roots", set())
        targets = record.targets | change.get("targets", set())
        sites = _with(record, offset, change.get("plan", (start, end, before, after, guard, island, table))).sites
        return cachedplan.from_record(PageRecord(record.starts, roots, targets, sites, record.exits),
                                      0x5550000000) is None
    assert not refused()
    assert refused(roots={island})                       # control arrived at the island
    assert refused(targets={island + 2})                 # a landing point inside it
    assert refused(plan=(start, end, before, after, guard, island + 4096, table))   # another page
    assert refused(plan=(start, end, before, after, guard, start + 200, table))     # out of rel8 reach
    assert refused(plan=(start, end, before, after, True, island, table))           # a guard has no island
