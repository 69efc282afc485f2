"""The workloads: the C guests in guests/bench/ and a few real programs."""
from __future__ import annotations

import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from runners import REPO

GUEST_SRC = REPO / "guests" / "bench"
GUEST_OUT = REPO / "build" / "guests" / "bench"
SAMPLE_OUT = REPO / "build" / "guests"
DATA_MIB = 20

# name, what it stresses (native sizes are for an idle ~3 GHz x86-64 core)
GUESTS = [
    ("branchy", "branchy integer loop with a 16-case switch jump table (~3 s: long enough that sbe's fixed start-up cost does not hide its steady-state cost)"),
    ("calls", "call/return-heavy recursion: naive fib(45) + ackermann(2, 10000) (~3 s: long enough that sbe's fixed start-up cost does not hide its steady-state cost)"),
    ("syscalls", "2000000 x getppid() through the libc wrapper (0.3 s natively: with 200000, the "
                 "start-up subtracted was as large as the work measured)"),
    ("cpuid", "200000 x cpuid leaf 0 (inline asm)"),
    ("rdtsc", "2000000 x rdtsc (inline asm)"),
    ("mixed", "FNV-1a over a 1 MiB buffer, 2500 passes, hex lines write()n to /dev/null (~3 s: long enough that sbe's fixed start-up cost does not hide its steady-state cost)"),
    ("startup", "returns 0 at once: start-up and exit cost"),
]
GUEST_ARGS = {"syscalls": ["2000000"]}   # other guests run their default sizes
PY_CODE = "print(sum(i * i for i in range(25_000_000)))"
# A JIT-compiled hot loop: V8 writes its machine code at run time.
NODE_CODE = "let s = 0; for (let i = 0; i < 3e8; i++) s += i % 7; console.log(s)"
# The per-stub table: (site kind, loop count, target of added ns per site or None,
# target of absolute ns per site or None); see guests/bench/stubs.c.
STUB_KINDS = [
    ("syscall", 10_000_000, 60, None),
    ("rdtsc", 10_000_000, 5, None),
    ("rdtscp", 10_000_000, 5, None),
    ("cpuid", 1_000_000, None, 30),     # natively a VM exit (~1 us): 10^6 is plenty
    ("call", 10_000_000, None, None),
    ("jmp", 10_000_000, None, None),
]
NAMES = [g for g, _ in GUESTS] + ["stubs", "threads", "ls", "sha256sum", "python3", "node", "true", "python3-pass",
                                  "sh50", "gcc"]
# A small translation unit for `gcc -O2 -c`: driver, cc1 and as, three programs.
GCC_SOURCE = """#include <stdio.h>
#include <stdlib.h>
#include <string.h>
struct node { struct node *next; int key; char name[32]; };
static int cmp(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }
int count(const struct node *n) { int c = 0; for (; n; n = n->next) c += n->key & 1; return c; }
int find(const struct node *n, const char *name) {
    for (; n; n = n->next) if (!strcmp(n->name, name)) return n->key;
    return -1;
}
void sort(int *v, size_t n) { qsort(v, n, sizeof *v, cmp); }
int main(void) { printf("%d\\n", count(NULL) + find(NULL, "x")); return 0; }
"""


# The guests whose argument 0 makes them do no work: that run is their own start-up.
EMPTY_ARG = {"branchy", "syscalls", "cpuid", "rdtsc", "mixed"}


@dataclass
class Workload:
    name: str
    argv: list[str]
    about: str
    # The same program doing no work: its start-up and exit alone, subtracted to judge
    # the steady state (python3's start-up is not a C guest's).
    empty: list[str] | None = None


def build_guests() -> None:
    subprocess.run(["make", "-s", "-C", str(GUEST_SRC), f"OUT={GUEST_OUT}"], check=True)
    # The threads row runs a sample guest of the test suite's.
    subprocess.run(["make", "-s", "-C", str(REPO / "guests"), f"OUT={SAMPLE_OUT}", str(SAMPLE_OUT / "latecode")],
                   check=True)


def _which(prog: str) -> str:
    # Absolute paths: qemu-x86_64 does not search PATH.
    return shutil.which(prog) or prog


def _python3() -> str:
    # The system interpreter, not a pyenv shim (a shell script) that would be measured too.
    for cand in ("/usr/bin/python3", shutil.which("python3"), sys.executable):
        if cand and Path(cand).is_file() and not _is_script(cand):
            return cand
    return sys.executable


def _is_script(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"#!"


def make_data(tmp: Path) -> Path:
    """A deterministic 20 MiB file of pseudo-random bytes for sha256sum."""
    path = tmp / f"data-{DATA_MIB}MiB.bin"
    path.write_bytes(random.Random(20).randbytes(DATA_MIB << 20))
    return path


def all_workloads(tmp: Path) -> list[Workload]:
    out = [Workload(name, [str(GUEST_OUT / name), *GUEST_ARGS.get(name, ())], about,
                    [str(GUEST_OUT / name), "0"] if name in EMPTY_ARG else None) for name, about in GUESTS]
    data = make_data(tmp)
    out += [
        Workload("threads", [str(SAMPLE_OUT / "latecode"), "200000"],
                 "guests/latecode 200000: 4 threads calling syscall, cpuid, rdtsc and an indirect "
                 "call into code first reached after the threads start"),
        Workload("ls", [_which("ls"), "-l", "/usr/bin"], "ls -l /usr/bin (LC_ALL=C)"),
        Workload("sha256sum", [_which("sha256sum"), str(data)],
                 f"sha256sum of a {DATA_MIB} MiB file"),
        Workload("python3", [_python3(), "-c", PY_CODE], f"python3 -c '{PY_CODE}' (~1 s)",
                 [_python3(), "-c", "pass"]),
        Workload("node", [_which("node"), "-e", NODE_CODE], f"node -e '{NODE_CODE}' (a JIT's hot loop, ~0.7 s)",
                 [_which("node"), "-e", "0"]),
        Workload("true", [_which("true")], "/bin/true: start-up alone, through ld.so and libc"),
        Workload("python3-pass", [_python3(), "-c", "pass"], "python3 -c pass: an interpreter's start-up"),
        Workload("sh50", ["/bin/sh", "-c", "for i in $(seq 50); do /bin/true; done"],
                 "a shell running 50 short processes (one monitor for the whole tree)"),
    ]
    source = tmp / "small.c"
    source.write_text(GCC_SOURCE)
    out.append(Workload("gcc", [_which("gcc"), "-O2", "-c", str(source), "-o", str(tmp / "small.o")],
                        "gcc -O2 -c of a 13-line C file (driver, cc1, as)"))
    return out
