"""scan_region and scan_page as sbe runs them: scanner/region.c when it is built
(tools/build_native.py, run by `make setup`), scanner/region.py otherwise.

The C scan decodes a page in capstone and walks it with per-byte arrays, where the
reference pays a Python object and a few dict and set operations per instruction:
about 3 us an instruction, which made a 4 KiB page cost 4 ms before any planning.
Both give the same RegionScan; only the sites' kinds are decided here, by
sensitive.classify on the instructions whose capstone id may be a site.
"""
from __future__ import annotations

from array import array
from collections.abc import Iterable
from collections.abc import Set as AbstractSet

from . import region, sensitive
from .decode import Insn
from .region import RegionScan

try:
    from ._region_native import ffi, lib
except ImportError:   # not built: the reference scans, a few times slower
    ffi = lib = None

# Per capstone id (by its name), what the C scan must know of an instruction;
# region.c's SBE_*.
_TERMINATOR, _DIRECT, _CANDIDATE, _CALL, _LEA, _INT, _SYSREG = 1, 2, 4, 8, 16, 32, 64


def _info() -> bytes:
    bits: dict[str, int] = {}
    for names, bit in ((sensitive.TERMINATORS, _TERMINATOR), (sensitive.DIRECT_BRANCHES, _DIRECT),
                       (sensitive.SENSITIVE, _CANDIDATE), ({"call", "lcall"}, _CALL),
                       ({"lea"}, _LEA), ({"int"}, _INT), ({"mov"}, _SYSREG)):
        for name in names:
            bits[name] = bits.get(name, 0) | bit
    size = lib.sbe_insn_names(ffi.NULL, 0)
    buffer = ffi.new("char[]", size)
    lib.sbe_insn_names(buffer, size)
    return bytes(bits.get(name.decode(), 0) for name in ffi.buffer(buffer, size)[:-1].split(b"\0"))


_INFO = _info() if lib is not None else b""


def native_scan_region(code: bytes, base: int, end: int, entries: Iterable[int],
                       known: AbstractSet[int] = frozenset(), sweep: bool = True) -> RegionScan:
    """region.scan_region, in C."""
    wanted = array("Q", (e for e in entries if base <= e < end))
    earlier = known if isinstance(known, array) else array("Q", known)   # any order: region.c sorts
    out = ffi.new("struct sbe_scan *")
    if lib.sbe_scan(code, len(code), base, end, ffi.from_buffer("uint64_t[]", wanted), len(wanted),
                    ffi.from_buffer("uint64_t[]", earlier), len(earlier), sweep, _INFO, len(_INFO), out):
        raise MemoryError("the native scan failed")
    try:
        offsets = array("I")
        offsets.frombytes(ffi.buffer(out.starts, 4 * out.nstarts))
        starts = list(map(base.__add__, offsets))
        sizes = dict(zip(starts, bytes(ffi.buffer(out.sizes, out.nstarts))))
        targets = array("Q")
        targets.frombytes(ffi.buffer(out.targets, 8 * out.ntargets))
        outside = array("Q")
        outside.frombytes(ffi.buffer(out.outside, 8 * out.noutside))
        sites = []
        for site in ffi.unpack(out.sites, out.nsites):
            mnemonic, op_str = ffi.string(site.mnemonic).decode(), ffi.string(site.op_str).decode()
            kind = sensitive.classify(mnemonic, op_str)
            if kind is not None:
                sites.append((Insn(base + site.offset, site.size, mnemonic, op_str), kind))
        return RegionScan(set(starts), sizes, sites, set(outside), out.swept, set(targets))
    finally:
        lib.sbe_scan_free(out)


scan_region = native_scan_region if lib is not None else region.scan_region


def scan_page(code: bytes, page: int, entries: Iterable[int], known: AbstractSet[int] = frozenset(),
              sweep: bool = True, page_size: int = 4096) -> RegionScan:
    """scan_region over the page at `page`: the unit the monitor scans before it runs."""
    return scan_region(code, page, page + page_size, entries, known, sweep)
