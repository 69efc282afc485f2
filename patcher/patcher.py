"""The patcher: applies scan results to a live address space and undoes them.

Duties, and when they run (each act is handed the AddressSpace it works on, and,
where it may have to map memory in the guest, the remote-syscall capability of a
stopped thread of that space, as rr's Monkeypatcher is handed AutoRemoteSyscalls):
- scan a page at its first fetch (or extend a scanned page when execution reaches an
  offset no scan has seen), turn each site into a Site with its original bytes, and
  plant it: an `int3` (emulate mode, or a site with no safe window), or a `jmp rel32`
  over its window into a stub in a side cache (patch mode);
- lay out side caches and retire full ones; keep the branch table and the stubs'
  cpuid tables up to date;
- invalidate a range before the guest changes it (original bytes back, sites dropped,
  pages back to unscanned);
- re-plant every site in the other mode (a live mode switch);
- restore every patch, leaving code byte-identical to the unpatched image.

Atomicity: a `jmp5` window (and its island, if it jumps to one) is written only
while its page is non-executable (its first scan: no thread can be running it), or
with every thread of the space stopped and none inside the window or on the island.
Otherwise a site found later in a page that already runs gets an `int3`: a one-byte
store is atomic.
"""
from __future__ import annotations

import os
import time
from collections import Counter

from sbe.handlers import cpuid as cpuid_model
from sbe.meta.pagemap import (MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE, PAGE, PROT_EXEC, PROT_READ,
                              PROT_WRITE, page_of)
from sbe.meta.record import Record
from sbe.meta.scancache import Entry
from sbe.meta.site import Patch, Site
from sbe.meta.syscalls import SYS
from sbe.patcher import cachedplan, copies, gadget, jumptables, stubs
from sbe.patcher.emit import EmitError, compose, detached, placed
from sbe.patcher.sidecache import SideCache, find_gap
from sbe.patcher.space import PATCH_REACH, AddressSpace
from sbe.scanner.decode import Insn
from sbe.scanner.jumptable import table_jump
from sbe.scanner.window import JMP5, SLOT_CALL, Fallback, Window, plan_windows, slot_call
from sbe.scanner.x86 import MAX_INSN

INT3 = b"\xcc"
BRANCH_TABLE_SIZE = stubs.BRANCH_TABLE_SLOTS * 8
STUB_ROOM = 512          # the most one stub can take


class PatchPolicy:
    """Which sites patch mode leaves as traps: whole kinds, or single sites named
    module+offset (a module's basename or full path)."""

    def __init__(self, emulate_kinds=(), emulate_sites=(), cache_size: int = 1 << 20) -> None:
        self.emulate_kinds = frozenset(emulate_kinds)
        self.emulate_sites = frozenset(emulate_sites)
        self.cache_size = cache_size

    def forced(self, kind: str, module: str, offset: int) -> bool:
        return (kind in self.emulate_kinds or (module, offset) in self.emulate_sites
                or (os.path.basename(module), offset) in self.emulate_sites)


class PatchCosts(Record):
    """What patching cost and how it went, over every space of a run."""
    __slots__ = ("scan_seconds", "stub_seconds", "pages_scanned", "pages_cached", "swept", "fallbacks",
                 "flushes", "false_sites", "copies_undone")

    def __init__(self) -> None:
        self.scan_seconds = 0.0
        self.stub_seconds = 0.0
        self.pages_scanned = 0
        self.pages_cached = 0       # planted from the scan cache, without a scan
        self.swept = 0
        self.fallbacks: Counter = Counter()   # why a site stayed int3
        self.flushes = 0
        self.false_sites = 0
        self.copies_undone = 0      # anonymous pages found to be copies of patched ones (patcher.copies)


# Rounds of scanning a page from the targets of its tables: code reached through a
# table may end in another table jump (an interpreter's handlers each dispatch).
_TABLE_ROUNDS = 8


def shifted(plan, delta: int):
    """A plan moved by `delta` bytes (its page mapped elsewhere)."""
    def move(insn):
        return insn._replace(address=insn.address + delta)
    if isinstance(plan, Fallback):
        return Fallback(move(plan.site), plan.kind, plan.reason)
    return Window(move(plan.site), plan.kind, plan.start + delta, plan.end + delta,
                  tuple(map(move, plan.before)), tuple(map(move, plan.after)), plan.guard,
                  plan.island and plan.island + delta, plan.table)


def _slot(target: int) -> int:
    """Where `target` goes in the branch table: direct-mapped by its low bits."""
    return 8 * (target % stubs.BRANCH_TABLE_SLOTS)


def _window_bytes(start: int, end: int, site: int, guard: bool, stub: int, island: int = 0,
                  slot: bool = False) -> bytes:
    """What a window [start, end) gets: the jump to its stub (or to its island),
    then int3 padding up to the window's end, or to the site when the site is
    guarded (it keeps its own bytes), or up to the `call [rsp - 8]` that ends a slot
    call's window."""
    jump = stubs.jmp2(start, island) if island else stubs.jmp5(start, stub)
    if slot:
        return jump + INT3 * (end - SLOT_CALL - start - len(jump)) + stubs.SLOT_CALL_CODE
    return jump + INT3 * ((site if guard else end) - start - len(jump))


def _patch_of(plan, code: bytes, base: int, stub_at: int, stub) -> Patch:
    """The Patch of a window planted from `plan` (start, end, guard, island, table)
    over `code` (the original bytes from `base` on), with `stub` placed at `stub_at`."""
    start, end, guard, island, table = plan
    return Patch(start, end, code[start - base:end - base], stub_at, len(stub.code),
                 trap=stub_at + stub.trap if stub.trap is not None else 0,
                 resume=stub_at + stub.resume if stub.resume is not None else 0,
                 displaced=tuple((stub_at + o, original) for o, original in stub.displaced),
                 guarded=guard, island=island,
                 island_bytes=code[island - base:island - base + JMP5] if island else b"", table=table)


def _near(avoid: frozenset, page: int, state) -> frozenset:
    """The addresses of `avoid` that could change a window in `page`: inside it
    (windows never cross a page's bounds) and not already known targets there, which
    planning keeps windows off anyway. So a thread standing at a known root (a warm
    run's first thread at the program's entry) leaves the page's plans keepable."""
    return frozenset(a for a in avoid if page <= a < page + PAGE
                     and a not in state.targets and a not in state.roots)


def _image_of(binding, sites: list[Site]):
    """A cached page as it was planted: each site relative to the mapping, with its
    stub's template at its offset in one blob, or the reason it is a trap. None
    when a site is not as its kept plan says (a policy, a cache that was full)."""
    base, entries, size = binding.start, [], 0
    for site in sites:
        common = (site.address - base, site.size, site.kind, site.mnemonic, site.op_str, site.plan)
        if isinstance(site.plan, str) and site.patch is None:
            entries.append((common, site.reason, None, 0))
        elif isinstance(site.plan, tuple) and site.patch is not None and site.template is not None:
            entries.append((common, None, site.template, size))
            size += len(site.template.code)
        else:
            return None
    return entries, size


def _record_image(record):
    """A cached page's image from its record alone, as _image_of would give it: when
    every site keeps a plan that passes its check (cachedplan.checked) and each
    window its stub's template. None otherwise: the page is planned afresh. A warm
    run's page thus costs one placement per stub and two writes, not a planting
    per site."""
    if not cachedplan.checked(record):
        return None
    templates = dict(cachedplan.templates_of(record))
    entries, size = [], 0
    for rel, (length, kind, mnemonic, op_str, kept, _) in sorted(record.sites.items()):
        common = (rel, length, kind, mnemonic, op_str, kept)
        if isinstance(kept, str):
            entries.append((common, kept, None, 0))
            continue
        template = templates.get(cachedplan.template_key(rel, kept))
        if template is None:
            return None
        entries.append((common, None, template, size))
        size += len(template.code)
    return entries, size


class Patcher:
    def __init__(self, policy: PatchPolicy | None = None, cpu=None, costs: PatchCosts | None = None) -> None:
        self.policy = policy or PatchPolicy()
        self.cpu = cpu or cpuid_model.HOST
        self._cpuid_rows: tuple | None = None
        self.costs = costs if costs is not None else PatchCosts()
        # Plans of cached pages, made relative to their page: a process tree maps the
        # same code again and again (every exec of a shell loop), at other addresses.
        self._cached_plans: dict[tuple, list] = {}
        self._templates: dict[tuple, tuple] = {}     # see _stub
        # Kept plans of cached pages, checked once per record, relative to their page.
        self._kept_plans: dict[tuple, tuple] = {}
        self._images: dict[tuple, tuple] = {}     # see _cached_page

    # -- scanning and planting -------------------------------------------------
    def scan(self, space: AddressSpace, address: int, remote=None, avoid: frozenset = frozenset(),
             world=None, fresh: bool = False) -> list[Site]:
        """Scan (or extend the scan of) the page holding `address`, from `address`
        and the entries learned for that page; plant what it finds. Entries found
        for other pages are recorded there, or extend those pages if already scanned.
        `remote`: syscalls in a stopped thread of the space, to map side caches with
        (without it, sites that would need a new cache stay `int3`).
        `avoid`: addresses no new window may hold strictly inside (threads' rips).
        `world`: stops every other thread of the space and returns where all of them
        stand (a superset of `avoid`), called before anything is written into pages
        that already run; without it, sites found there stay `int3`. `fresh`: the page of `address` may be scanned
        for the first time, because the caller makes it executable (a fetch fault;
        the vDSO, which always is). Any other page not scanned yet only learns the
        entry: it is not executable, so it faults, and is scanned, before it runs
        (a page a retired side cache's flush sent back to unscanned included).
        Returns the sites planted."""
        new_sites: list[Site] = []
        work = [address]
        while work:
            target = work.pop()
            state = space.pages.get(target)
            if state is None:
                continue
            if not state.scanned and not (fresh and page_of(target) == page_of(address)):
                state.add_entry(target)
                continue
            inside = space.window_around(target)
            if inside is not None:
                if world is not None:
                    avoid = avoid | world()
                self.demote(space, inside, "branch target inside window")
                if world is not None and state.scanned and state.has_start(target):
                    new_sites += self._replan(space, inside, avoid | {target}, remote)
            if state.scanned and state.has_start(target):
                continue
            planted, outside = self._scan_one(space, target, state, remote, avoid, world)
            new_sites += planted
            work += self._outside(space, outside)
        return new_sites

    def _replan(self, space, site: Site, avoid: frozenset, remote) -> list[Site]:
        """A site just demoted, because control lands inside its window, planned
        again with what its page knows now (the landing among its arrivals): often
        a window that starts where control landed, which is the plan a later run's
        fresh look at the page makes too. Kept a trap when the new window would
        touch another patch (planning sees only the site's own page's knowledge, not
        the windows already there). Every thread is stopped, and `avoid` holds where
        they stand. Returns the site planted, if it was."""
        page = page_of(site.address)
        state = space.pages.get(page)
        if space.mode != "patch" or state is None:
            return []
        code = space.original(page, PAGE + MAX_INSN)
        arrivals = state.roots | avoid
        (plan,) = plan_windows(code, page, page + PAGE, state.starts,
                               [(Insn(site.address, site.size, site.mnemonic, site.op_str), site.kind)],
                               state.targets | arrivals, arrivals=arrivals)
        if isinstance(plan, Fallback):
            return []
        spans = [(plan.start, plan.end)] + ([(plan.island, plan.island + JMP5)] if plan.island else [])
        for other in space.sites.in_range(plan.start - PATCH_REACH, plan.end + PATCH_REACH):
            if other is not site and other.patch is not None and any(
                    start < s_end and s_start < start + len(raw)
                    for s_start, s_end in spans for start, raw in other.patched_spans):
                return []
        space.sites.remove(site.address)
        self.costs.fallbacks -= Counter({site.reason: 1})     # a trap no longer
        planted = self.plant(space, plan, code, page, remote, _near(avoid, page, state), space.binding_of(page))
        planted.hits = site.hits
        return [planted]

    def _scan_one(self, space, target, state, remote, avoid, world) -> tuple[list[Site], list[int]]:
        """One page's scan from `target`: the sites planted, and the entries it found
        in other pages."""
        page = page_of(target)
        fresh = not state.scanned
        entries = (state.entries | {target}) if fresh else {target}
        t0 = time.perf_counter()
        if fresh and space.binding_of(page) is None and space.modules.locate(page)[0] == "[anon]":
            self.costs.copies_undone += copies.undo_copied_patches(space, page)
        code = space.original(page, PAGE + MAX_INSN)
        # Here, not at import: the C scan loads libcapstone (a few ms), and a warm run
        # may scan nothing.
        from sbe.scanner.scan import scan_page
        result = scan_page(code, page, entries, known=state.known_array(), sweep=fresh)
        # The tables of the jumps the scan can prove name more code: this page's
        # part is scanned from there too (its targets become roots, as a direct
        # branch's do); the rest is other pages' entries.
        elsewhere: set[int] = set()
        for _ in range(_TABLE_ROUNDS):
            named = self._table_targets(space, code, page, state, result)
            here = {t for t in named if page_of(t) == page}
            elsewhere |= named - here
            if here <= entries:
                break
            entries = entries | here
            if not here <= result.starts:
                result = scan_page(code, page, entries, known=state.known_array(), sweep=fresh)
        self.costs.scan_seconds += time.perf_counter() - t0
        if fresh:
            self.costs.pages_scanned += 1
        else:
            self._drop_false_sites(space, state, result.sizes, world)
        state.learn(entries, result.starts, result.targets, result.outside)
        self.costs.swept += result.swept
        space.learned(page)
        # Targets in pages that already run are scanned now, so that this page's
        # tables can be proved when it is planned.
        extended = [s for x in self._outside(space, elsewhere) for s in self.scan(space, x, remote, avoid, world)]
        found = [(i, k) for i, k in result.sites if i.address not in space.sites]
        if found and not fresh and space.mode == "patch" and world is not None:
            avoid = avoid | world()       # the page runs: every thread stopped first
        plans = self._plans(space, code, page, state, found, avoid, fresh or world is not None)
        near, binding = _near(avoid, page, state), space.binding_of(page)
        return extended + [self.plant(space, plan, code, page, remote, near, binding) for plan in plans], \
            result.outside

    @staticmethod
    def _table_targets(space, code: bytes, page: int, state, result) -> set[int]:
        """Every target of the tables that the jumps among `result`'s sites read,
        where the table is one the guest cannot change (jumptables.targets)."""
        def known(address: int) -> bool:
            return address in result.starts or state.has_start(address)
        named: set[int] = set()
        for _, shape in jumptables.shapes(code, page, known, result.sites):
            named |= jumptables.targets(space, shape) or set()
        return named

    @staticmethod
    def _plans(space, code, page, state, found, avoid, may_write_windows: bool):
        """How to patch the sites `found` in a page whose state is `state`: windows
        where the mode asks for them and they may be written, traps otherwise."""
        if space.mode == "patch" and may_write_windows:
            arrivals = state.roots | avoid
            tables, named = {}, set()
            for insn, shape in jumptables.shapes(code, page, state.has_start, found):
                targets = jumptables.prove(space, page, state.has_start, shape)
                if targets:
                    tables[insn.address] = shape
                    named |= targets
            return plan_windows(code, page, page + PAGE, state.starts, found, state.targets | arrivals | named,
                                arrivals=arrivals, tables=tables)
        reason = "emulate mode" if space.mode == "emulate" else "found after its page ran"
        return [Fallback(i, k, reason) for i, k in found]

    def apply_cached(self, space: AddressSpace, binding, entry, remote=None,
                     avoid: frozenset = frozenset(), defer: bool = True,
                     world=None) -> tuple[list[Site], list[int]]:
        """Plant what a scan cache entry knows of the mapping `binding` names, whose
        bytes (as mapped, no patch yet) are the ones the entry was made from, and
        whose pages no thread can be running: each cached page is then as its scans
        left it, without decoding it again. Its roots (where earlier runs' control
        arrived, indirect branch targets among them: instruction starts no window
        covers) go into the branch table, so branch stubs go there without a trap
        from the first execution. Returns the sites planted and the pages.
        `defer`: a page other programs' runs executed, and none of this one's, is
        left for its first fetch (apply_deferred), to be planted only if it runs."""
        planted, pages = [], []
        base = binding.start
        for offset, record in sorted(entry.pages.items()):
            page = base + offset
            state = space.pages.get(page)
            if state is None or state.scanned or page >= binding.end:
                continue
            if defer and record.users and space.program not in record.users:
                space.deferred[page] = (binding, record)
                continue
            state.learn_cached(base, record)
            code = space.original(page, PAGE + MAX_INSN)
            near = _near(avoid, page, state)
            planted += self._cached_page(space, binding, offset, record, code, page, state, near, remote)
            pages.append(page)
        entered = {root for page in pages for root in space.pages.get(page).roots
                   if space.pages.get(page).has_start(root)}
        self.insert_branch_targets(space, entered)
        # What the cached pages' code enters other pages at, as a scan of them would
        # have recorded: entries of unscanned pages, or extensions of scanned ones.
        # Most land on the roots just planted, which need nothing more (_outside).
        exits = {x for page in pages for x in space.pages.get(page).exits} - entered
        for x in self._outside(space, exits):
            planted += self.scan(space, x, remote, avoid, world)
        self.costs.pages_cached += len(pages)
        # A page a side cache's flush sent back to unscanned meanwhile is not one to
        # make executable: it is scanned again at its first fetch.
        return planted, [page for page in pages if space.pages.get(page).scanned]

    def apply_deferred(self, space: AddressSpace, page: int, remote=None,
                       avoid: frozenset = frozenset(), world=None) -> list[Site]:
        """A deferred cached page at its first fetch: planted as apply_cached would
        have (it is still non-executable), and scanned further from the entries
        other pages' code gave it meanwhile. Returns the sites planted."""
        binding, record = space.deferred.pop(page)
        state = space.pages.get(page)
        if binding is None or state is None or state.scanned:
            return []
        pending = set(state.entries)
        offset = page - binding.start
        one = Entry(binding.key, binding.path, binding.end - binding.start, {offset: record})
        planted, _ = self.apply_cached(space, binding, one, remote, avoid, defer=False, world=world)
        space.learned(page)          # this program runs it: saved with its tag
        for entry in sorted(pending):
            planted += self.scan(space, entry, remote, avoid, world)
        return planted

    @staticmethod
    def _outside(space, outside) -> list[int]:
        """Entries a scan found in other pages: recorded there, or to be scanned now
        when their page already runs."""
        more = []
        for out in outside:
            other = space.pages.get(out)
            if other is None:
                continue
            if other.scanned:
                if out not in other.roots:
                    # Control arrives there: a root, so no later plan of the page
                    # (a warm run's, planned before this page's exits are known)
                    # puts a window over it.
                    other.arrived(out)
                    space.learned(out)
                elif other.has_start(out):
                    continue    # a root no window covers: planning keeps windows off roots
                if not other.has_start(out) or space.window_around(out) is not None:
                    more.append(out)
            else:
                other.add_entry(out)
        return more

    def _drop_false_sites(self, space, state, sizes: dict, world) -> None:
        """An extension scan starts where execution really goes, so its decoding is
        ground truth: an earlier start (and site) strictly inside one of its
        instructions came from decoding out of step (a call's fall-through into
        padding, say) and is dropped, its patch undone."""
        interior = set()
        for start, size in sizes.items():
            interior.update(range(start + 1, start + size))
        false = interior & state.starts
        if not false:
            return
        state.drop_starts(false)
        if world is not None and any(space.sites.get(a) is not None for a in false):
            world()
        for address in false:
            site = space.sites.get(address)
            if site is not None:
                self.unplant(space, site)
                space.sites.remove(address)
                self.costs.false_sites += 1

    def _cached_page(self, space, binding, offset, record, code, page, state, near, remote) -> list[Site]:
        """Plant a cached page: at once from its image (made from its record, or from
        this process's earlier planting of the same record: every exec of a shell
        loop maps the same libc), else site by site, keeping the image for the next
        time. Only when no thread stands near the page and none of its sites is
        planted already."""
        key = (binding.key, offset)
        fits = space.mode == "patch" and not near and not space.sites.in_range(page, page + PAGE)
        if fits and not all(self._holds(space, page, state, shape)
                            for shape in cachedplan.table_shapes(record, binding.start)):
            fits = False     # a table this run cannot trust: the image is no use
        if fits:
            image = self._images.get(key)
            if image is None or image[0] is not record:    # records are never changed
                image = self._images[key] = (record, _record_image(record))
            if image[1] is not None:
                sites = self._place_image(space, binding, page, code, image[1], remote)
                if sites is not None:
                    return sites
        plans = self._cached_page_plans(space, binding, offset, record, code, page, state, near)
        if any(isinstance(plan, Window) and plan.table
               and not self._holds(space, page, state, table_jump(list(plan.before), plan.site)) for plan in plans):
            plans = self._plans(space, code, page, state, [(plan.site, plan.kind) for plan in plans], near, True)
        sites = [self.plant(space, plan, code, page, remote, near, binding) for plan in plans]
        if fits:
            self._images[key] = (record, _image_of(binding, sites))
        return sites

    @staticmethod
    def _holds(space, page: int, state, shape) -> bool:
        """Whether a kept table plan of `page` may be planted in this run."""
        return shape is not None and jumptables.prove(space, page, state.has_start, shape) is not None

    def _place_image(self, space, binding, page: int, code: bytes, image, remote) -> list[Site] | None:
        """The page's image planted: its stubs in one write, its windows and traps in
        another. None, with nothing written, when it does not fit this time (no
        room, a stub out of reach, a site the policy leaves as a trap)."""
        entries, size = image
        base = binding.start
        t0 = time.perf_counter()
        module, module_offset = space.modules.locate(page)
        if any(self.policy.forced(kind, module, module_offset + base + rel - page)
               for (rel, _, kind, *_), _, template, _ in entries if template is not None):
            return None
        try:
            cache = self.cache_for(space, page, page + PAGE, remote)
        except EmitError:
            return None
        if not cache.room(size):
            return None
        at = cache.next
        patched, blob, sites = bytearray(code[:PAGE]), [], []
        for (rel, length, kind, mnemonic, op_str, plan), reason, template, offset in entries:
            address = base + rel
            site = Site(address, length, kind, mnemonic, op_str, code[address - page:address - page + length],
                        reason or "", module, module_offset + address - page, plan=plan, template=template)
            if template is None:
                patched[address - page] = INT3[0]
                self.costs.fallbacks[reason] += 1
            else:
                stub_at = at + offset
                stub = placed(template, stub_at, base, cache.start)
                if stub is None:
                    return None
                blob.append(stub.code)
                start, end, island = base + plan[0], base + plan[1], plan[5] and base + plan[5]
                written = _window_bytes(start, end, address, plan[4], stub_at, island,
                                        plan[4] and slot_call(site, kind))
                patched[start - page:start - page + len(written)] = written
                if island:
                    patched[island - page:island - page + JMP5] = stubs.jmp5(island, stub_at)
                table = cachedplan.table_span(plan, base, Insn(address, length, mnemonic, op_str))
                site.patch = _patch_of((start, end, plan[4], island, table), code, page, stub_at, stub)
                if table:
                    jumptables.register(space, site)
            sites.append(site)
        if size:
            space.mem.write(cache.take(size), b"".join(blob))
        space.mem.write(page, bytes(patched))
        for site in sites:
            space.sites.add(site)
        self.costs.stub_seconds += time.perf_counter() - t0
        return sites

    def _cached_page_plans(self, space, binding, offset, record, code, page, state, near) -> list:
        """The plans for a cached page: the ones its record keeps, when they pass
        their check; else made once per process for each content of its record and
        mode, then moved to where the page is mapped this time. Either only when no
        thread stands near the page (`near`) and none of its sites is planted already."""
        reusable = not near and not space.sites.in_range(page, page + PAGE)
        if reusable and space.mode == "patch":
            checked = self._kept_plans.get((binding.key, offset))
            if checked is None or checked[0] is not record:     # records are never changed
                checked = (record, cachedplan.from_record(record, page - offset))
                if checked[1] is not None:
                    checked = (record, [shifted(plan, -page) for plan in checked[1]])
                    self.known_templates(binding, cachedplan.templates_of(record))
                self._kept_plans[binding.key, offset] = checked
            if checked[1] is not None:
                return [shifted(plan, page) for plan in checked[1]]
            space.learned(page)    # plans to keep, for the next run
        found = [(Insn(page + o - offset, site[0], site[2], site[3]), site[1])
                 for o, site in sorted(record.sites.items())]
        memo = (binding.key, offset, space.mode, record.starts.tobytes(), frozenset(record.roots),
                frozenset(record.targets), frozenset(record.sites.items()))
        # Not the mapping's last page: the bytes after it (which planning may read)
        # belong to whatever is mapped next, which differs from run to run.
        reusable = reusable and page + PAGE + MAX_INSN <= binding.end
        if reusable and memo in self._cached_plans:
            return [shifted(plan, page) for plan in self._cached_plans[memo]]
        plans = self._plans(space, code, page, state, found, near, True)
        if reusable:
            self._cached_plans[memo] = [shifted(plan, -page) for plan in plans]
        return plans

    def plant(self, space: AddressSpace, plan, code: bytes, base: int, remote=None,
              avoid: frozenset = frozenset(), binding=None) -> Site:
        """Plant the site `plan` names, as it says or as an int3 when its stub cannot
        be made. `avoid`: the addresses its planning kept windows off; `binding`:
        the cached mapping the site lies in, if any."""
        insn, kind = plan.site, plan.kind
        module, offset = space.modules.locate(insn.address)
        raw = code[insn.address - base:insn.address - base + insn.size]
        kept = binding and cachedplan.to_record(cachedplan.keepable(plan, avoid), binding.start)
        site = Site(insn.address, insn.size, kind, insn.mnemonic, insn.op_str, raw,
                    module=module, offset=offset, plan=kept)
        if isinstance(plan, Fallback):
            site.reason = plan.reason
        elif self.policy.forced(kind, module, offset):
            site.reason = "forced to emulate"
        else:
            try:
                self._plant_jmp5(space, site, plan, code, base, remote, binding)
                return site
            except EmitError as e:
                site.reason = str(e)
        self.costs.fallbacks[site.reason] += 1
        space.mem.write(site.address, INT3)
        space.sites.add(site)
        return site

    def _plant_jmp5(self, space, site: Site, window, code: bytes, base: int, remote, binding) -> None:
        t0 = time.perf_counter()
        window_bytes = code[window.start - base:window.end - base]
        island = window.island or window.start
        cache = self.cache_for(space, min(window.start, island), max(window.end, island + JMP5), remote)
        stub, template = self._stub(space, site, window, window_bytes, cache, binding)
        if not cache.room(len(stub.code)):
            raise EmitError("side cache full")
        site.template = template
        at = cache.take(len(stub.code))
        space.mem.write(at, stub.code)
        site.patch = _patch_of((window.start, window.end, window.guard, window.island, window.table),
                               code, base, at, stub)
        if window.table:
            jumptables.register(space, site)
        if window.island:
            # The island first: until the site's jump is written, nothing goes there.
            space.mem.write(window.island, stubs.jmp5(window.island, at))
        space.mem.write(window.start, _window_bytes(window.start, window.end, window.site.address,
                                                    window.guard, at, window.island,
                                                    window.guard and slot_call(site, site.kind)))
        space.sites.add(site)
        self.costs.stub_seconds += time.perf_counter() - t0

    def _stub(self, space, site: Site, window, window_bytes: bytes, cache: SideCache, binding):
        """The site's stub at the cache's next free byte, and its template (the stub
        detached from where it lies, for the scan cache) when its code is a bound
        mapping. A process tree maps the same code again and again (every exec of a
        shell loop) at other addresses, and a warm run maps what an earlier run did:
        a template known for the window is placed rather than composed again. Its
        guest addresses all move with the mapping: each is a rel32 target computed
        from the mapping's own bytes (the key holds their digest), so it lies at the
        same offset from the mapping's start wherever the mapping goes; the one form
        whose target does not (the `eip`-relative one, which wraps at 32 bits) is
        composed afresh (emit.placed)."""
        if binding is None:
            return compose(site.kind, Insn(site.address, site.size, site.mnemonic, site.op_str),
                           window, window_bytes, cache.next, cache), None
        base = binding.start
        key = (binding.key, site.address - base, window.start - base, window.end - base, window.guard,
               bool(window.table))
        template = self._templates.get(key)
        if template is not None:
            stub = placed(template, cache.next, base, cache.start)
            if stub is not None:
                return stub, template
        stub = compose(site.kind, Insn(site.address, site.size, site.mnemonic, site.op_str),
                       window, window_bytes, cache.next, cache)
        template = self._templates[key] = detached(stub, base, cache.start)
        return stub, template

    def known_templates(self, binding, templates) -> None:
        """Templates a scan cache entry kept for `binding`'s windows: (site offset,
        window start, window end, guarded, table) -> template, offsets relative to the
        mapping (cachedplan.template_key)."""
        for key, template in templates:
            self._templates.setdefault((binding.key, *key), template)

    def unplant(self, space: AddressSpace, site: Site) -> None:
        """Put the original bytes back under the site's patch (the site stays in the
        table; its caller decides what it becomes). A slot call's stub, which a thread
        may still be in, then leaves by its trap instead of for the window's `call
        [rsp - 8]`: at its last jump, as at its trap, the guest's state is the site's,
        and the monitor emulates the call."""
        for start, raw in site.patched_spans:
            space.mem.write(start, raw)
        patch = site.patch
        if patch is not None and patch.guarded and slot_call(site, site.kind):
            back = patch.stub + patch.stub_size - JMP5
            space.mem.write(back, stubs.jmp5(back, patch.trap))

    def demote(self, space: AddressSpace, site: Site, reason: str) -> None:
        """Turn a jmp5 site back into a trap: something will run inside its window."""
        self.unplant(space, site)
        space.sites.set_patch(site, None)
        site.reason = reason
        site.plan = site.template = None
        self.costs.fallbacks[reason] += 1
        space.mem.write(site.address, INT3)

    # -- side caches -----------------------------------------------------------
    def cache_for(self, space: AddressSpace, start: int, end: int, remote) -> SideCache:
        for cache in space.caches:
            if cache.room(STUB_ROOM) and cache.reaches(start, end):
                return cache
        full = [c for c in space.caches if not c.retired and c.reaches(start, end)]
        for cache in full:
            self.retire(space, cache, page_of(start), remote)
        return self.new_cache(space, start, end, remote)

    def new_cache(self, space: AddressSpace, start: int, end: int, remote) -> SideCache:
        if remote is None:
            raise EmitError("no thread to map a side cache with")
        if not space.branch_table:
            table = remote(SYS.mmap, 0, BRANCH_TABLE_SIZE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            if table < 0:
                raise EmitError("cannot map the branch table")
            space.branch_table = table
            space.maps_changed()
        size = self.policy.cache_size
        place = find_gap(space.modules.maps, start, end, size)
        if place is None:
            raise EmitError("no free memory within reach for a side cache")
        got = remote(SYS.mmap, place, size, PROT_READ | PROT_EXEC,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        space.maps_changed()
        if got != place:
            raise EmitError(f"cannot map a side cache at {place:#x}")
        cache = SideCache(place, size)
        space.mem.write(place, cache.header(gadget.PATCH, space.branch_table, self.cpuid_rows()))
        space.caches.append(cache)
        return cache

    def cpuid_rows(self) -> tuple:
        """The virtual CPU's table as side caches hold it. Made once: a model's
        answers never change, and walking every leaf and subleaf costs about 5 ms,
        paid by each side cache of each process a shell loop execs."""
        if self._cpuid_rows is None:
            self._cpuid_rows = tuple(
                (leaf, subleaf, leaf not in cpuid_model.SUBLEAF_LEAVES, regs)
                for (leaf, subleaf), regs in sorted(self.cpu.table().items())
                if not (subleaf and leaf not in cpuid_model.SUBLEAF_LEAVES))
        return self._cpuid_rows

    def retire(self, space: AddressSpace, cache: SideCache, keep: int, remote) -> None:
        """A full cache: no new stubs go there, and the pages it serves are
        invalidated so they re-plant into a new cache at their next fetch. Its memory
        stays as it is: a thread may be inside one of its stubs."""
        cache.retired = True
        self.costs.flushes += 1
        pages = {page_of(s.address) for s in space.sites
                 if s.patch is not None and cache.start <= s.patch.stub < cache.start + cache.size}
        # Not the vDSO's: it cannot be made non-executable, so sent back to unscanned
        # it would run unscanned for good. Its stubs stay where they are (a retired
        # cache is never unmapped), as the kept page's do.
        vdso = {page for page in pages if (space.modules.mapping_at(page) or None) is not None
                and space.modules.mapping_at(page).path == "[vdso]"}
        for page in sorted(pages - {keep} - vdso):
            state = space.pages.get(page)
            self.invalidate(space, page, page + PAGE, untrack=False, bytes_change=False)
            if state is not None and remote is not None:
                remote(SYS.mprotect, page, PAGE, state.prot & ~PROT_EXEC & ~PROT_WRITE)

    def insert_branch_target(self, space: AddressSpace, target: int) -> None:
        """Let branch stubs go to `target` without a trap from now on."""
        if space.branch_table:
            space.mem.write(space.branch_table + _slot(target), target.to_bytes(8, "little"))

    def insert_branch_targets(self, space: AddressSpace, targets) -> None:
        """insert_branch_target for many: a cached library brings a thousand roots,
        and one read and one write of the whole table cost less than a write each."""
        if not space.branch_table or len(targets) < 64:
            for target in targets:
                self.insert_branch_target(space, target)
            return
        table = bytearray(space.mem.read(space.branch_table, BRANCH_TABLE_SIZE))
        for target in targets:
            slot = _slot(target)
            table[slot:slot + 8] = target.to_bytes(8, "little")
        space.mem.write(space.branch_table, bytes(table))

    def cpuid_learned(self, space: AddressSpace, site: Site, leaf: int, subleaf: int, regs) -> None:
        """A cpuid stub missed: the monitor's answer goes into that stub's table."""
        cache = space.cache_holding(site.patch.stub) if site.patch is not None else None
        if cache is None:
            return
        any_subleaf = leaf not in cpuid_model.SUBLEAF_LEAVES
        for address, data in cache.cpuid_append(leaf, 0 if any_subleaf else subleaf,
                                                any_subleaf, regs) or ():
            space.mem.write(address, data)

    # -- undoing ---------------------------------------------------------------
    def invalidate(self, space: AddressSpace, start: int, end: int, untrack: bool,
                   bytes_change: bool = True, world=None) -> int:
        """Undo the patches of every tracked page in [start, end) before the guest
        changes or drops it; the pages go back to unscanned (or are forgotten).
        `bytes_change`: False when only the patches move (a side cache retired), so
        what was learned there stays the mapping's. `world`: as for scan, when
        other threads may be running the pages."""
        if bytes_change:
            space.unbind(start, end)
        pages = space.pages.tracked_in(page_of(start), end)
        if not pages:
            if space.tables:
                jumptables.invalidated(self, space, start, end, pages, untrack, bytes_change, world)
            return 0
        lo, hi = pages[0], pages[-1] + PAGE
        dropped = False
        for site in space.sites.in_range(lo - PATCH_REACH, hi + PATCH_REACH):
            if page_of(site.address) in pages:
                if world is not None and site.patch is not None:   # windows: more than a byte
                    world()
                    world = None
                try:
                    self.unplant(space, site)
                except OSError:
                    pass  # already unmapped: nothing left to restore
                space.sites.remove(site.address)
                dropped = True
        for p in pages:
            if untrack:
                space.pages.untrack(p, p + PAGE)
            else:
                space.pages.get(p).reset()
        if space.tables:
            jumptables.invalidated(self, space, start, end, pages, untrack, bytes_change, world)
        if dropped and space.branch_table:
            # Validated targets in these pages are no longer known starts.
            space.mem.write(space.branch_table, bytes(BRANCH_TABLE_SIZE))
        return len(pages)

    def restore_all(self, space: AddressSpace) -> int:
        """Put every original byte back (reversibility). Returns the sites undone."""
        count = 0
        for site in space.sites:
            self.unplant(space, site)
            count += 1
        return count

    def replant(self, space: AddressSpace, mode: str, avoid: frozenset, remote=None) -> int:
        """Every site again, in `mode` (all threads of the space stopped; `avoid`
        holds their instruction pointers, which no window may cover)."""
        space.mode = mode
        by_page: dict[int, list[Site]] = {}
        for site in space.sites.ordered():
            self.unplant(space, site)
            space.sites.remove(site.address)
            by_page.setdefault(page_of(site.address), []).append(site)
        for page, old in sorted(by_page.items()):
            state = space.pages.get(page)
            code = space.original(page, PAGE + MAX_INSN)
            found = [(Insn(s.address, s.size, s.mnemonic, s.op_str), s.kind) for s in old]
            if mode == "patch" and state is not None:
                arrivals = state.roots | avoid
                plans = plan_windows(code, page, page + PAGE, state.starts, found, state.targets | arrivals,
                                     arrivals=arrivals)
            else:
                plans = [Fallback(i, k, "emulate mode") for i, k in found]
            hits = {s.address: s.hits for s in old}
            near, binding = _near(avoid, page, state), space.binding_of(page)
            for plan in plans:
                self.plant(space, plan, code, page, remote, near, binding).hits = hits.get(plan.site.address, 0)
        if space.branch_table:
            space.mem.write(space.branch_table, bytes(BRANCH_TABLE_SIZE))
        return sum(len(v) for v in by_page.values())
