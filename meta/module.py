"""Modules: mapped files (and anonymous code, and the vDSO) that sites are reported
against, so a site's identity survives ASLR as module + offset."""
from __future__ import annotations

import bisect
from collections import namedtuple


Mapping = namedtuple("Mapping", "start end perms offset path")   # a line of /proc/PID/maps


def parse_maps(text: str) -> list[Mapping]:
    maps = []
    for line in text.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 5:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        path = parts[5].strip() if len(parts) > 5 else ""
        maps.append(Mapping(start, end, parts[1], int(parts[2], 16), path))
    return maps


class ModuleMap:
    """Address -> (module name, module base). A file's base is the start of its
    lowest mapping; an anonymous region is its own module."""

    def __init__(self, maps: list[Mapping]) -> None:
        self.maps = sorted(maps, key=lambda m: m.start)
        self._starts = [m.start for m in self.maps]
        self._base: dict[str, int] = {}
        for m in self.maps:
            if m.path and not m.path.startswith("["):
                self._base[m.path] = min(self._base.get(m.path, m.start), m.start)

    def mapping_at(self, address: int) -> Mapping | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and self.maps[i].start <= address < self.maps[i].end:
            return self.maps[i]
        return None

    def locate(self, address: int) -> tuple[str, int]:
        m = self.mapping_at(address)
        if m is None:
            return "?", address
        if m.path in self._base:
            return m.path, address - self._base[m.path]
        return m.path or "[anon]", address - m.start
