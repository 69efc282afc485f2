"""Run statistics: what was planted, what trapped, what escaped, what it cost.

Kept by the monitor and printed by `sbe run --stats` (table) or saved as JSON, so the
cost of virtualization can be read per kind and per trap.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from sbe.patcher.patcher import PatchCosts


@dataclass
class Stats:
    planted: Counter = field(default_factory=Counter)      # kind -> sites
    strategies: Counter = field(default_factory=Counter)   # strategy -> sites
    traps: Counter = field(default_factory=Counter)        # kind -> site traps
    escapes: Counter = field(default_factory=Counter)      # syscall name -> escapes
    escape_sites: list = field(default_factory=list)       # (module, offset, nr)
    stops: int = 0
    trap_seconds: float = 0.0
    fault_seconds: float = 0.0
    faults: int = 0
    remote_syscalls: int = 0
    syscall_stops: int = 0
    processes: int = 0
    threads: int = 0
    wall_seconds: float = 0.0
    switches: list = field(default_factory=list)          # modes switched to, in order
    patching: PatchCosts = field(default_factory=PatchCosts)   # counted by the Patcher

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
            "processes": self.processes,
            "threads": self.threads,
            "wall_s": round(self.wall_seconds, 4),
            "stub_ms": round(1e3 * self.patching.stub_seconds, 2),
            "fallbacks": dict(self.patching.fallbacks),
            "switches": list(self.switches),
            "cache_flushes": self.patching.flushes,
            "false_sites": self.patching.false_sites,
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
        lines.append(f"  ptrace stops: {self.stops} (syscall stops {self.syscall_stops}, remote syscalls {self.remote_syscalls})")
        if self.patching.fallbacks:
            lines.append("  int3 in patch mode: " + ", ".join(f"{v} {k}" for k, v in self.patching.fallbacks.most_common()))
        lines.append(f"  stub generation: {d['stub_ms']} ms; side cache flushes: {self.patching.flushes}; "
                     f"false sites undone: {self.patching.false_sites}")
        if self.switches:
            lines.append("  mode switches: " + " -> ".join(self.switches))
        lines.append(f"  processes: {self.processes}, threads: {self.threads}, wall: {d['wall_s']} s")
        return "\n".join(lines)
