"""What sbe reads of an ELF64 image: its program headers, its symbol tables and its
entry, with struct alone.

pyelftools would cost each of its users 40 ms to import, and more to build an
object per section and symbol: a cold start reads the vDSO's dozen functions, and
`sbe scan` libc's segments and thousands of symbols. Anything malformed raises
ValueError (an offset out of the image is one).
"""
from __future__ import annotations

import struct
from collections import namedtuple

_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
SYMBOL = struct.Struct("<IBBHQQ")      # Elf64_Sym: name, info, other, shndx, value, size
PT_LOAD, PT_GNU_EH_FRAME = 1, 0x6474E550
PF_X = 1
_SHT_SYMTAB, _SHT_DYNSYM, _STT_FUNC = 2, 11, 2

Segment = namedtuple("Segment", "type flags offset vaddr filesz")


class ElfImage:
    """An ELF64 little-endian image (a file's bytes, or a mapped image's)."""

    def __init__(self, data: bytes) -> None:
        try:
            (ident, _, machine, _, self.entry, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum,
             _) = _HEADER.unpack_from(data)
            if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
                raise ValueError("not an ELF64 little-endian file")
            self.data = data
            self.segments = []
            for i in range(phnum):
                kind, flags, offset, vaddr, _paddr, filesz, _, _ = _PHDR.unpack_from(data, phoff + i * phentsize)
                self.segments.append(Segment(kind, flags, offset, vaddr, filesz))
            self._sections = [_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)] if shoff else []
        except struct.error as e:
            raise ValueError(f"truncated ELF file ({e})") from None

    def segment_data(self, segment: Segment) -> bytes:
        data = self.data[segment.offset:segment.offset + segment.filesz]
        if len(data) != segment.filesz:
            raise ValueError("a segment lies beyond the end of the file")
        return data

    @property
    def link_base(self) -> int:
        """The lowest PT_LOAD address."""
        loads = [s.vaddr for s in self.segments if s.type == PT_LOAD]
        if not loads:
            raise ValueError("no loadable segment")
        return min(loads)

    def symbols(self):
        """(info, shndx, value) of every symbol of its .symtab and .dynsym."""
        for _, kind, _, _, offset, size, _, _, _, entsize in self._sections:
            if kind not in (_SHT_SYMTAB, _SHT_DYNSYM) or entsize != SYMBOL.size:
                continue
            table = self.data[offset:offset + size - size % entsize]
            if len(table) != size - size % entsize:
                raise ValueError("a symbol table lies beyond the end of the file")
            for _name, info, _other, shndx, value, _size in SYMBOL.iter_unpack(table):
                yield info, shndx, value


def function_addresses(image: bytes, base: int) -> set[int]:
    """Where the functions of the image (the vDSO) lie once it is mapped at `base`;
    an empty set for an image that cannot be read, whose pages then fault and are
    scanned like any other's."""
    try:
        elf = ElfImage(image)
        low = elf.link_base
        return {base + value - low for info, _, value in elf.symbols() if info & 0xF == _STT_FUNC and value}
    except ValueError:
        return set()
