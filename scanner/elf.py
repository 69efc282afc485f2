"""The sites of an x86-64 ELF file, found without running it (`sbe scan PROG`).

The file is scanned the way the runtime scans pages, with scan_region, so the two
agree; the file just offers more entry points up front: its entry, its function
symbols and the start of every function that has unwind information, which
stripped binaries keep.
"""
from __future__ import annotations

import struct
from collections import namedtuple
from os import PathLike

from .elfread import PF_X, PT_GNU_EH_FRAME, PT_LOAD, ElfImage
from .scan import scan_region

_PAGE = 4096
_CODE_SYMBOLS = (2, 10)             # STT_FUNC, STT_GNU_IFUNC (an ifunc's resolver is code)
_SHN_UNDEF = 0

# offset: from the module's lowest mapping, as the runtime keys sites.
StaticSite = namedtuple("StaticSite", "offset kind mnemonic op_str bytes")


def scan_elf(path: str | PathLike, sweep: bool = True) -> list[StaticSite]:
    """The sites of every executable segment of the ELF file at `path`, by offset.
    ValueError for a file that is not a well-formed ELF64 image."""
    with open(path, "rb") as f:
        elf = ElfImage(f.read())
    loads = [s for s in elf.segments if s.type == PT_LOAD]
    module_base = elf.link_base // _PAGE * _PAGE
    entries = _entry_points(elf)
    sites = []
    for segment in loads:
        if not segment.flags & PF_X:
            continue
        code, base = elf.segment_data(segment), segment.vaddr
        scan = scan_region(code, base, base + len(code), entries, sweep=sweep)
        for insn, kind in scan.sites:
            raw = code[insn.address - base:insn.end - base]
            sites.append(StaticSite(insn.address - module_base, kind, insn.mnemonic, insn.op_str, raw))
    return sorted(sites)


def _entry_points(elf: ElfImage) -> set[int]:
    entries = {value for info, shndx, value in elf.symbols()
               if info & 0xF in _CODE_SYMBOLS and shndx != _SHN_UNDEF and value}
    entries |= _unwind_starts(elf)
    if elf.entry:
        entries.add(elf.entry)
    return entries


def _unwind_starts(elf: ElfImage) -> set[int]:
    """Function starts from .eh_frame_hdr, the sorted index of .eh_frame.

    The index holds each FDE's initial location ready to read, so this avoids
    parsing .eh_frame. Only the layout every GNU linker writes is read (eh_frame_ptr
    as any 4-byte value, count as udata4, table as datarel sdata4 pairs); anything
    else yields no entries rather than wrong ones.
    """
    header = next((s for s in elf.segments if s.type == PT_GNU_EH_FRAME), None)
    if header is None:
        return set()
    data = elf.segment_data(header)
    if len(data) < 12 or data[0] != 1 or data[1] & 0x0F not in (0x03, 0x0B) or data[2:4] != b"\x03\x3b":
        return set()
    (count,) = struct.unpack_from("<I", data, 8)
    table = data[12:12 + 8 * count]
    if len(table) != 8 * count:
        return set()
    return {header.vaddr + location for location, _fde in struct.iter_unpack("<ii", table)}
