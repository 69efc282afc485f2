"""Builds sbe's two cffi extension modules. `make setup` runs it.

    .venv/bin/python tools/build_native.py      # writes scanner/_region_native*.so
                                                # and monitor/_owncpuid_native*.so

scanner/_region_native is scanner/region.c, linked against the libcapstone.so the
capstone wheel ships (with its headers), found through the installed capstone
package; without it sbe scans with scanner/region.py, the reference, at a few times
the cost. monitor/_owncpuid_native is monitor/owncpuid.c; without it sbe's own
thread runs without CPUID faulting, and each ptrace stop costs more where the guest
has it (see that file).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parents[1]
MODULE = "_region_native"
OWN_CPUID = "_owncpuid_native"

CDEF = """
    struct sbe_site { uint32_t offset; uint8_t size; char mnemonic[32]; char op_str[160]; };
    struct sbe_scan {
        uint32_t *starts; uint8_t *sizes; size_t nstarts;
        uint64_t *targets; size_t ntargets;
        uint64_t *outside; size_t noutside;
        struct sbe_site *sites; size_t nsites;
        size_t swept;
    };
    int sbe_scan(const uint8_t *code, size_t len, uint64_t base, uint64_t end,
                 const uint64_t *entries, size_t nentries, const uint64_t *known, size_t nknown,
                 int sweep, const uint8_t *info, size_t ninfo, struct sbe_scan *out);
    void sbe_scan_free(struct sbe_scan *out);
    int sbe_scan_init(void);
    size_t sbe_insn_names(char *buf, size_t cap);
"""
OWN_CPUID_CDEF = "int sbe_own_cpuid_faulting(void); void sbe_own_cpuid_faulting_off(void);"


def capstone_dir() -> Path:
    spec = importlib.util.find_spec("capstone")
    if spec is None or spec.origin is None:
        sys.exit("build_native: the capstone package is not installed")
    return Path(spec.origin).parent


def soname(path: Path) -> str:
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile
    with open(path, "rb") as f:
        for section in ELFFile(f).iter_sections():
            if isinstance(section, DynamicSection):
                for tag in section.iter_tags("DT_SONAME"):
                    return tag.soname
    return path.name


def main() -> int:
    capstone = capstone_dir()
    include, lib = capstone / "include", capstone / "lib"
    if not (include / "capstone" / "capstone.h").exists() or not (lib / "libcapstone.so").exists():
        sys.exit(f"build_native: {capstone} has no headers or libcapstone.so")
    # The extension names libcapstone by its soname, which the wheel's file does not
    # carry: linked by a name that resolves on its own, the module loads without
    # the capstone binding having loaded the library first (a warm run never does).
    linkdir = ROOT / "build" / "capstone"
    linkdir.mkdir(parents=True, exist_ok=True)
    alias = linkdir / soname(lib / "libcapstone.so")
    alias.unlink(missing_ok=True)
    alias.symlink_to(lib / "libcapstone.so")
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(MODULE, (ROOT / "scanner" / "region.c").read_text(),
                   include_dirs=[str(include)], library_dirs=[str(lib)], libraries=["capstone"],
                   extra_compile_args=["-O2", "-Wall", "-Werror"],
                   extra_link_args=[f"-Wl,-rpath,{linkdir}"])
    _compile(ffi, ROOT / "scanner")
    own = FFI()
    own.cdef(OWN_CPUID_CDEF)
    own.set_source(OWN_CPUID, (ROOT / "monitor" / "owncpuid.c").read_text(),
                   extra_compile_args=["-O2", "-Wall", "-Werror"])
    _compile(own, ROOT / "monitor")
    return 0


def _compile(ffi: FFI, where: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(ffi.compile(tmpdir=tmp, verbose=False))
        target = where / built.name
        shutil.copyfile(built, target.with_suffix(".tmp"))
        os.replace(target.with_suffix(".tmp"), target)
    print(f"built {target.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
