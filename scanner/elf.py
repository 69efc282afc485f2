"""The sites of an x86-64 ELF file, found without running it (`sbe scan PROG`).

The file is scanned the way the runtime scans pages, with scan_region, so the two
agree; the file just offers more entry points up front: its entry, its function
symbols and the start of every function that has unwind information, which
stripped binaries keep.
"""
from __future__ import annotations

import struct
from os import PathLike
from typing import NamedTuple

from elftools.elf.constants import P_FLAGS
from elftools.elf.elffile import ELFFile

from .scan import scan_region

_PAGE = 4096
_SYMBOL = struct.Struct("<IBBHQQ")  # Elf64_Sym: name, info, other, shndx, value, size
_CODE_SYMBOLS = (2, 10)             # STT_FUNC, STT_GNU_IFUNC (an ifunc's resolver is code)
_SHN_UNDEF = 0


class StaticSite(NamedTuple):
    offset: int   # from the module's lowest mapping, as the runtime keys sites
    kind: str
    mnemonic: str
    op_str: str
    bytes: bytes


def scan_elf(path: str | PathLike, sweep: bool = True) -> list[StaticSite]:
    """The sites of every executable segment of the ELF file at `path`, by offset."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        module_base = min(s["p_vaddr"] for s in loads) // _PAGE * _PAGE
        entries = _entry_points(elf)
        sites = []
        for segment in loads:
            if not segment["p_flags"] & P_FLAGS.PF_X:
                continue
            code, base = segment.data(), segment["p_vaddr"]
            scan = scan_region(code, base, base + len(code), entries, sweep=sweep)
            for insn, kind in scan.sites:
                raw = code[insn.address - base:insn.end - base]
                sites.append(StaticSite(insn.address - module_base, kind, insn.mnemonic, insn.op_str, raw))
    return sorted(sites)


def _entry_points(elf: ELFFile) -> set[int]:
    entries = _function_symbols(elf) | _unwind_starts(elf)
    if elf["e_entry"]:
        entries.add(elf["e_entry"])
    return entries


def _function_symbols(elf: ELFFile) -> set[int]:
    # Unpacked by hand: pyelftools builds a Symbol object with its name for each of
    # the thousands of symbols, which costs more than the scan of a small binary.
    starts = set()
    for name in (".symtab", ".dynsym"):
        table = elf.get_section_by_name(name)
        if table is None or table["sh_entsize"] != _SYMBOL.size:
            continue
        for _name, info, _other, shndx, value, _size in _SYMBOL.iter_unpack(table.data()):
            if info & 0xF in _CODE_SYMBOLS and shndx != _SHN_UNDEF and value:
                starts.add(value)
    return starts


def _unwind_starts(elf: ELFFile) -> set[int]:
    """Function starts from .eh_frame_hdr, the sorted index of .eh_frame.

    The index holds each FDE's initial location ready to read, so this avoids
    parsing .eh_frame. Only the layout every GNU linker writes is read (eh_frame_ptr
    as any 4-byte value, count as udata4, table as datarel sdata4 pairs); anything
    else yields no entries rather than wrong ones.
    """
    header = next((s for s in elf.iter_segments() if s["p_type"] == "PT_GNU_EH_FRAME"), None)
    if header is None:
        return set()
    data = header.data()
    if len(data) < 12 or data[0] != 1 or data[1] & 0x0F not in (0x03, 0x0B) or data[2:4] != b"\x03\x3b":
        return set()
    (count,) = struct.unpack_from("<I", data, 8)
    table = data[12:12 + 8 * count]
    if len(table) != 8 * count:
        return set()
    return {header["p_vaddr"] + location for location, _fde in struct.iter_unpack("<ii", table)}
