"""Run statistics: what was planted, what trapped, what escaped, what it cost.

Kept by the monitor and printed by `sbe run --stats` (table) or saved as JSON, so the
cost of virtualization can be read per kind and per trap.
"""
from __future__ import annotations

from collections import Counter

from sbe.meta.record import Record
from sbe.patcher.patcher import PatchCosts


class Stats(Record):
    __slots__ = ("planted", "strategies", "traps", "escapes", "escape_sites", "stops", "trap_seconds",
                 "fault_seconds", "faults", "remote_syscalls", "syscall_stops", "world_stops", "processes",
                 "threads", "wall_seconds", "switches", "patching")

    def __init__(self) -> None:
        self.planted: Counter = Counter()      # kind -> sites
        self.strategies: Counter = Counter()   # strategy -> sites
        self.traps: Counter = Counter()        # kind -> site traps
        self.escapes: Counter = Counter()      # syscall name -> escapes
        self.escape_sites: list = []           # (module, offset, nr)
        self.stops = 0
        self.trap_seconds = 0.0
        self.fault_seconds = 0.0
        self.faults = 0
        self.remote_syscalls = 0
        self.syscall_stops = 0
        self.world_stops = 0                   # times other threads were stopped to patch
        self.processes = 0
        self.threads = 0
        self.wall_seconds = 0.0
        self.switches: list = []               # modes switched to, in order
        self.patching = PatchCosts()           # counted by the Patcher

    def as_dict(self) -> dict:
        traps = sum(self.traps.values())
        return {
            "planted": dict(self.planted),
            "strategies": dict(self.strategies),
            "traps": dict(self.traps),
            "escapes": dict(self.escapes),
            "escape_sites": [list(e) for e in self.escape_sites],
            "stops": self.stops,
            "site_traps": traps,
            "trap_us": round(1e6 * self.trap_seconds / traps, 2) if traps else None,
            "fetch_faults": self.faults,
            "fault_us": round(1e6 * self.fault_seconds / self.faults, 2) if self.faults else None,
            "pages_scanned": self.patching.pages_scanned,
            "pages_cached": self.patching.pages_cached,
            "scan_ms": round(1e3 * self.patching.scan_seconds, 2),
            "swept_insns": self.patching.swept,
            "remote_syscalls": self.remote_syscalls,
            "syscall_stops": self.syscall_stops,
            "world_stops": self.world_stops,
            "processes": self.processes,
            "threads": self.threads,
            "wall_s": round(self.wall_seconds, 4),
            "stub_ms": round(1e3 * self.patching.stub_seconds, 2),
            "fallbacks": dict(self.patching.fallbacks),
            "switches": list(self.switches),
            "cache_flushes": self.patching.flushes,
            "false_sites": self.patching.false_sites,
            "copies_undone": self.patching.copies_undone,
        }

    def render(self) -> str:
        d = self.as_dict()
        kinds = sorted(set(self.planted) | set(self.traps))
        lines = ["sbe statistics", f"  {'kind':<11}{'sites':>8}{'traps':>10}"]
        for k in kinds:
            lines.append(f"  {k:<11}{self.planted[k]:>8}{self.traps[k]:>10}")
        lines.append(f"  {'total':<11}{sum(self.planted.values()):>8}{d['site_traps']:>10}")
        lines.append("  strategies: " + (", ".join(f"{k} {v}" for k, v in sorted(self.strategies.items())) or "none"))
        esc = sum(self.escapes.values())
        lines.append(f"  escapes: {esc}" + (" (" + ", ".join(f"{k} {v}" for k, v in self.escapes.items()) + ")" if esc else ""))
        lines.append(f"  pages scanned: {self.patching.pages_scanned} in {d['scan_ms']} ms "
                     f"({self.patching.swept} insns by linear sweep); from the scan cache: "
                     f"{self.patching.pages_cached}")
        lines.append(f"  monitor cost per site trap: {d['trap_us']} us; per fetch fault: {d['fault_us']} us")
        lines.append(f"  ptrace stops: {self.stops} (syscall stops {self.syscall_stops}, remote syscalls {self.remote_syscalls}, "
                     f"worlds stopped to patch {self.world_stops})")
        if self.patching.fallbacks:
            lines.append("  int3 in patch mode: " + ", ".join(f"{v} {k}" for k, v in self.patching.fallbacks.most_common()))
        lines.append(f"  stub generation: {d['stub_ms']} ms; side cache flushes: {self.patching.flushes}; "
                     f"false sites undone: {self.patching.false_sites}; "
                     f"copies of patched pages given their original bytes: {self.patching.copies_undone}")
        if self.switches:
            lines.append("  mode switches: " + " -> ".join(self.switches))
        lines.append(f"  processes: {self.processes}, threads: {self.threads}, wall: {d['wall_s']} s")
        return "\n".join(lines)
