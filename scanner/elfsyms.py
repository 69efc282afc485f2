"""The functions an ELF64 image in memory exports, read with struct alone.

The vDSO is scanned from its exported functions, at the start of every process tree
whose scan cache does not know it yet; pyelftools would cost that start 40 ms to
import for a table of a dozen symbols. This reads what it needs and nothing else:
the lowest PT_LOAD address (the image's link base) and the STT_FUNC symbols of its
symbol tables. Bad input gives an empty set, never an exception: a vDSO that cannot
be read is scanned from nothing, and its pages fault like any other's.
"""
from __future__ import annotations

import struct

_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_PT_LOAD, _SHT_SYMTAB, _SHT_DYNSYM, _STT_FUNC = 1, 2, 11, 2


def function_addresses(image: bytes, base: int) -> set[int]:
    """Where the image's functions lie once it is mapped at `base`."""
    try:
        (ident, _, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum,
         _) = _HEADER.unpack_from(image)
        if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
            return set()
        loads = [_PHDR.unpack_from(image, phoff + i * phentsize) for i in range(phnum)]
        low = min(p[3] for p in loads if p[0] == _PT_LOAD)
        found = set()
        for i in range(shnum):
            _, kind, _, _, offset, size, _, _, _, entsize = _SHDR.unpack_from(image, shoff + i * shentsize)
            if kind not in (_SHT_SYMTAB, _SHT_DYNSYM) or entsize < _SYM.size:
                continue
            for at in range(offset, offset + size - _SYM.size + 1, entsize):
                _, info, _, _, value, _ = _SYM.unpack_from(image, at)
                if info & 0xF == _STT_FUNC and value:
                    found.add(base + value - low)
        return found
    except (struct.error, ValueError):
        return set()
