"""Site plans and stubs kept in the scan cache, so a warm run plants without
planning or composing.

Planning a page's windows decodes the neighbours of every site again (thousands of
capstone calls for a process's libc), yet a plan is a function of the page's bytes
and of what its scans knew, which is exactly what a cache entry is keyed by and
holds. So each site's record keeps the plan it was planted from: its window (start,
end, the displaced instructions before and after it, whether the site is guarded,
its island, whether it is a proved table jump) or the reason it stays a trap.

Only plans that are such a function are kept: a trap because of the mode, the
policy, a thread standing nearby or a side cache that could not be had is not, and a
site whose window a later discovery broke (a demotion) keeps none; a page with a
site that has no plan is planned afresh. With a window goes its stub's template
(patcher.emit.detached: bytes and the addresses its fields name, relative to the
mapping), placed where this run's side cache has room. A kept plan is trusted only after it is
checked against the record it comes with: every instruction it names is one of the
page's instruction starts, its window is those instructions end to end, no root or
target lies strictly inside it, and no two windows or sites overlap. An entry merged
from several runs' scans can thus never plant a window the page's decoding forbids.
"""
from __future__ import annotations

from sbe.patcher.emit import Stub
from sbe.scanner.decode import Insn
from sbe.scanner.jumptable import table_jump
from sbe.meta.pagemap import page_of
from sbe.scanner.window import JMP2, JMP5, REASONS, SLOT_CALL, Fallback, Window, guardable, slot_call


def keepable(plan, avoid) -> object:
    """What of `plan` a site may keep for the cache: the plan itself, or None when it
    depends on more than the page's bytes and scan (`avoid`: addresses planning kept
    windows off for this run only)."""
    if isinstance(plan, Window):
        return plan
    return plan if plan.reason in REASONS and not avoid else None


def to_record(plan, base: int):
    """`plan` (a Window, a Fallback or None) as the cache keeps it, relative to `base`."""
    if plan is None:
        return None
    if isinstance(plan, Fallback):
        return plan.reason
    def rel(insns):
        return tuple((i.address - base, i.size, i.mnemonic, i.op_str) for i in insns)
    return (plan.start - base, plan.end - base, rel(plan.before), rel(plan.after), plan.guard,
            plan.island and plan.island - base, bool(plan.table))


def table_shape(kept, base: int, site: Insn):
    """The proved shape (scanner.jumptable.TableJump) a kept table plan's site is,
    or None for a plan of another tactic or instructions that are no proved shape.
    The table's address is in the instructions' bytes, which the cache key covers,
    so it is not kept; whether the table may be trusted is judged again by each run
    that plants the plan (patcher.jumptables)."""
    if not kept[6]:
        return None
    return table_jump([Insn(base + o, *rest) for o, *rest in kept[2]], site)


def table_shapes(record, base: int) -> list:
    """table_shape for each site of a cached page that keeps a table plan."""
    return [table_shape(kept, base, Insn(base + offset, size, mnemonic, op_str))
            for offset, (size, _, mnemonic, op_str, kept, _) in record.sites.items()
            if isinstance(kept, tuple) and kept[6]]


def table_span(kept, base: int, site: Insn) -> tuple:
    """The [start, end) of the table a kept plan's site reads, () for none."""
    shape = table_shape(kept, base, site)
    return (shape.table, shape.end) if shape is not None else ()


def checked(record) -> bool:
    """True when every site of a cached page keeps a plan that passes its check."""
    spans = []
    for offset, (size, kind, mnemonic, op_str, kept, _) in record.sites.items():
        if isinstance(kept, str):
            spans.append((offset, offset + size))
            continue
        if kept is None:
            return False
        start, end, before, after, guard, island, table = kept
        if table and (guard or after or island or table_shape(kept, 0, Insn(offset, size, mnemonic, op_str)) is None):
            return False
        # A guard's jump and padding must fit before the site, whose bytes it keeps;
        # a slot call's jump and `call [rsp - 8]` before the site's end.
        if guard:
            insn = Insn(offset, size, mnemonic, op_str)
            room = (offset - start if guardable(insn, kind)
                    else end - start - SLOT_CALL if slot_call(insn, kind) else -1)
            if after or room < JMP5:
                return False
        if island:
            # The window is the site alone, its island in the same page within
            # `jmp rel8` reach, with no landing point known there but its first byte,
            # and that one only as a terminator's end (see scanner.window._island).
            if (guard or before or after or page_of(island) != page_of(offset)
                    or page_of(island + JMP5 - 1) != page_of(offset)
                    or not -128 <= island - (offset + JMP2) < 128 or island in record.roots
                    or any(a in record.roots or a in record.targets for a in range(island + 1, island + JMP5))):
                return False
            spans.append((island, island + JMP5))
        at = start
        for o, n, _, _ in (*before, (offset, size, mnemonic, op_str), *after):
            if o != at or not record.has_start(o):
                return False
            at += n
        if at != end or any(a in record.roots or a in record.targets for a in range(start + 1, end)):
            return False
        spans.append((start, end))
    spans.sort()
    return not any(a[1] > b[0] for a, b in zip(spans, spans[1:]))


def from_record(record, base: int) -> list | None:
    """The plans for every site of a cached page whose mapping starts at `base`, or
    None when one of them has no plan or fails its check."""
    if not checked(record):
        return None
    plans = []
    for offset, (size, kind, mnemonic, op_str, kept, _) in sorted(record.sites.items()):
        site = Insn(base + offset, size, mnemonic, op_str)
        if isinstance(kept, str):
            plans.append(Fallback(site, kind, kept))
            continue
        start, end, before, after, guard, island, _ = kept
        plans.append(Window(site, kind, base + start, base + end,
                            tuple(Insn(base + o, *rest) for o, *rest in before),
                            tuple(Insn(base + o, *rest) for o, *rest in after), guard,
                            island and base + island, table_span(kept, base, site)))
    return plans


def template_to_record(template):
    """A stub template (a detached Stub) as the cache keeps it."""
    if template is None:
        return None
    return (template.code, template.trap, template.resume, template.displaced, template.fields)


def template_key(offset: int, kept) -> tuple:
    """What names a stub's template among a mapping's: the site, its window, and the
    stub's shape (guarded, table); offsets relative to the mapping."""
    return offset, kept[0], kept[1], kept[4], kept[6]


def templates_of(record) -> list:
    """(template_key, template) for each site of the record that keeps a window and
    its stub's template."""
    found = []
    for offset, (_, _, _, _, kept, doc) in record.sites.items():
        if isinstance(kept, tuple) and doc is not None:
            code, trap, resume, displaced, fields = doc
            found.append((template_key(offset, kept), Stub(code, trap, resume, displaced, fields)))
    return found
