"""ELF images as scanner/elfread.py reads them, against pyelftools."""
from __future__ import annotations

import io

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import given, settings
from hypothesis import strategies as st

from sbe.scanner.elfread import function_addresses
from test_reversibility import own_vdso

BASE = 0x7F00_0000_0000


def reference(image: bytes, base: int) -> set[int]:
    elf = ELFFile(io.BytesIO(image))
    low = min(s["p_vaddr"] for s in elf.iter_segments() if s["p_type"] == "PT_LOAD")
    return {base + sym["st_value"] - low
            for section in elf.iter_sections() if section["sh_type"] in ("SHT_DYNSYM", "SHT_SYMTAB")
            for sym in section.iter_symbols() if sym["st_info"]["type"] == "STT_FUNC" and sym["st_value"]}


@pytest.mark.parametrize("path", ["[vdso]", "/usr/lib/x86_64-linux-gnu/libc.so.6", "/bin/true"])
def test_function_addresses_agree_with_pyelftools(path):
    if path == "[vdso]":
        image = own_vdso()
    else:
        with open(path, "rb") as f:
            image = f.read()
    got = function_addresses(image, BASE)
    assert got == reference(image, BASE)
    assert got or path == "/bin/true"      # a stripped executable exports none


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, 6000), garbage=st.binary(max_size=64))
def test_a_damaged_image_gives_a_set_never_an_error(cut, garbage):
    image = own_vdso()
    assert isinstance(function_addresses(image[:cut] + garbage, BASE), set)


@pytest.mark.parametrize("path", ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/bin/python3.11", "/bin/true"])
def test_segments_symbols_and_entry_agree_with_pyelftools(path):
    from sbe.scanner.elfread import PT_LOAD, ElfImage
    with open(path, "rb") as f:
        data = f.read()
    ours, theirs = ElfImage(data), ELFFile(io.BytesIO(data))
    assert ours.entry == theirs["e_entry"]
    assert [(s.type == PT_LOAD, s.flags, s.offset, s.vaddr, s.filesz) for s in ours.segments] == [
        (s["p_type"] == "PT_LOAD", s["p_flags"], s["p_offset"], s["p_vaddr"], s["p_filesz"])
        for s in theirs.iter_segments()]
    expected = sorted((sym["st_shndx"] if isinstance(sym["st_shndx"], int) else 0, sym["st_value"])
                      for section in theirs.iter_sections() if section["sh_type"] in ("SHT_DYNSYM", "SHT_SYMTAB")
                      for sym in section.iter_symbols())
    assert sorted((shndx if shndx < 0xFF00 else 0, value) for _, shndx, value in ours.symbols()) == expected


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, 3000), garbage=st.binary(max_size=64))
def test_a_damaged_file_is_a_value_error(cut, garbage):
    from sbe.scanner.elfread import ElfImage
    with open("/bin/true", "rb") as f:
        data = f.read()
    try:
        elf = ElfImage(data[:cut] + garbage)
        for segment in elf.segments:
            elf.segment_data(segment)
        list(elf.symbols())
    except ValueError:
        pass
