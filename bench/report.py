"""Render bench results (the dict also saved as results.json) as markdown, and judge
the acceptance targets."""
from __future__ import annotations

# A cell's status: "ok", "mismatch", "timeout", "n/a" (runner unavailable or native
# failed), "skipped" (filtered out by --only/--skip).


def _cell(res: dict, workload: str, runner: str) -> dict | None:
    return res["cells"].get(f"{runner}:{workload}")


def seconds(res: dict, workload: str, runner: str) -> tuple[float, bool] | None:
    """(median seconds, is a lower bound) or None.  A timeout counts as >= the timeout."""
    c = _cell(res, workload, runner)
    if c is None:
        return None
    if c["status"] == "ok":
        return c["median"], False
    if c["status"] == "timeout":
        return res["timeout"], True
    return None


def _why(res: dict, workload: str, runner: str) -> str:
    c = _cell(res, workload, runner)
    if c is None or c["status"] == "skipped":
        return f"{runner} not run on {workload}"
    why = c.get("short") or c.get("reason")
    return f"{runner} on {workload}: {c['status']}" + (f" ({why})" if why else "")


def _fmt(v: tuple[float, bool]) -> str:
    return (">" if v[1] else "") + f"{v[0]:.3f} s"


def cell_text(res: dict, workload: str, runner: str, ratio: bool = False) -> str:
    c = _cell(res, workload, runner)
    if c is None or c["status"] == "skipped":
        return "skipped"
    st = c["status"]
    if st == "n/a":
        return f"n/a ({c['short']})"
    if st == "timeout":
        return f"timeout (>{res['timeout']:.0f} s)"
    base = seconds(res, workload, "native")
    if ratio:
        if not base or base[0] <= 0:
            return "n/a"
        text = f"{c['median'] / base[0]:.2f}x"
    else:
        text = f"{c['median']:.3f}"
    return f"MISMATCH ({text})" if st == "mismatch" else text


def _traps_table(res: dict, runners: list[str]) -> list[str]:
    """Site traps per run (median) of sbe's runners: what the monitor still does."""
    runners = [r for r in runners if any("median_traps" in c for c in res["cells"].values()
                                         if c["runner"] == r)]
    if not runners:
        return []
    lines = ["| workload | " + " | ".join(runners) + " |", "|---|" + "---:|" * len(runners)]
    for w in res["workloads"]:
        cells = [_cell(res, w["name"], r) or {} for r in runners]
        lines.append(f"| {w['name']} | " + " | ".join(
            f"{c['median_traps']:,.0f}" if "median_traps" in c else "–" for c in cells) + " |")
    return lines


def _table(res: dict, runners: list[str], ratio: bool) -> list[str]:
    lines = ["| workload | " + " | ".join(runners) + " |",
             "|---|" + "---:|" * len(runners)]
    for w in res["workloads"]:
        cells = [cell_text(res, w["name"], r, ratio) for r in runners]
        lines.append(f"| {w['name']} | " + " | ".join(cells) + " |")
    return lines


# --- acceptance targets ------------------------------------------------------------

def _patch_over_native(res: dict, workload: str, limit: float) -> tuple[str, str]:
    what = f"patch within {limit}x of native on {workload}"
    nat, pat = seconds(res, workload, "native"), seconds(res, workload, "patch")
    if nat is None:
        return "n/a", f"{what}: {_why(res, workload, 'native')}"
    if pat is None:
        c = _cell(res, workload, "patch")
        verdict = "FAIL" if c and c["status"] == "mismatch" else "n/a"
        return verdict, f"{what}: {_why(res, workload, 'patch')}"
    ratio = pat[0] / nat[0]
    verdict = "PASS" if ratio <= limit and not pat[1] else "FAIL"
    return verdict, (f"{what}: patch {_fmt(pat)} / native {_fmt(nat)} = "
                     f"{'>' if pat[1] else ''}{ratio:.2f}x")


def _patch_vs_emulate(res: dict, workload: str, factor: float) -> tuple[str, str]:
    what = f"patch >= {factor:.0f}x faster than emulate on {workload}"
    pat, emu = seconds(res, workload, "patch"), seconds(res, workload, "emulate")
    if pat is None or pat[1]:
        c = _cell(res, workload, "patch")
        verdict = "FAIL" if c and c["status"] in ("mismatch", "timeout") else "n/a"
        return verdict, f"{what}: {_why(res, workload, 'patch')}"
    if emu is None:
        return "n/a", f"{what}: {_why(res, workload, 'emulate')}"
    speedup = emu[0] / pat[0]
    text = (f"{what}: emulate {_fmt(emu)} / patch {_fmt(pat)} = "
            f"{'>' if emu[1] else ''}{speedup:.1f}x")
    if speedup >= factor:
        return "PASS", text
    return ("n/a", text + " (emulate timed out; raise --timeout)") if emu[1] else ("FAIL", text)


def _patch_vs_peers(res: dict, workload: str) -> tuple[str, str]:
    nat = seconds(res, workload, "native")
    what = f"patch faster than valgrind and qemu-user on {workload} (native {_fmt(nat)})"
    pat = seconds(res, workload, "patch")
    if pat is None or pat[1]:
        c = _cell(res, workload, "patch")
        verdict = "FAIL" if c and c["status"] in ("mismatch", "timeout") else "n/a"
        return verdict, f"{what}: {_why(res, workload, 'patch')}"
    parts, verdicts = [f"patch {_fmt(pat)}"], []
    for peer in ("valgrind", "qemu"):
        v = seconds(res, workload, peer)
        if v is None:
            parts.append(f"{peer} n/a")
            continue
        verdicts.append(pat[0] < v[0])
        parts.append(f"{peer} {_fmt(v)}")
    text = f"{what}: " + ", ".join(parts)
    if not verdicts:
        return "n/a", text
    return ("PASS" if all(verdicts) else "FAIL"), text


def _startup_target(res: dict, workload: str, runner: str, limit: float, per: int = 1,
                    peer: str | None = None) -> tuple[str, str]:
    """`runner` on `workload` within `limit` seconds (per process when `per` > 1),
    and faster than `peer` in the same run when one is named."""
    unit = f" per process ({per} processes)" if per > 1 else ""
    what = f"{runner} on {workload} <= {limit * 1000:.0f} ms{unit}" + (f" and faster than {peer}" if peer else "")
    t = seconds(res, workload, runner)
    if t is None or t[1]:
        c = _cell(res, workload, runner)
        verdict = "FAIL" if c and c["status"] in ("mismatch", "timeout") else "n/a"
        return verdict, f"{what}: {_why(res, workload, runner)}"
    ok = t[0] / per <= limit
    text = f"{what}: {t[0] / per * 1000:.0f} ms"
    if peer:
        v = seconds(res, workload, peer)
        if v is None:
            text += f", {peer} n/a"
        else:
            ok = ok and t[0] < v[0]
            text += f", {peer} {_fmt(v)}"
    return ("PASS" if ok else "FAIL"), text


# The start-up targets: (workload, runner, seconds, processes, peer to beat).
STARTUP_TARGETS = [
    ("true", "patch", 0.15, 1, "valgrind"),
    ("true", "patch-cold", 0.35, 1, None),
    ("ls", "patch", 0.25, 1, None),
    ("python3-pass", "patch", 0.5, 1, None),
    ("sh50", "patch", 0.04, 52, "valgrind"),   # sh, seq and 50 true
]
# The steady-state targets: patch / native, each less its own start-up (_steady_work).
STEADY_TARGETS = [("branchy", 1.1), ("calls", 1.05), ("syscalls", 1.5), ("rdtsc", 1.3),
                  ("mixed", 1.1), ("python3", 1.3), ("node", 2.0)]
# What the start-up chart shows, in this order.
CHART_WORKLOADS = ["true", "ls", "python3-pass", "sh50", "gcc"]
CHART_RUNNERS = ["native", "patch", "patch-cold", "strace", "valgrind", "qemu"]


def acceptance(res: dict) -> list[tuple[str, str]]:
    names = {w["name"] for w in res["workloads"]}
    out = [_patch_over_native(res, w, 1.15) for w in ("branchy", "calls") if w in names]
    if "syscalls" in names:
        out.append(_patch_over_native(res, "syscalls", 1.5))
    out += [_patch_vs_emulate(res, w, 50) for w in ("syscalls", "cpuid") if w in names]
    long = [w["name"] for w in res["workloads"]
            if (s := seconds(res, w["name"], "native")) and s[0] > 0.5]
    out += [_patch_vs_peers(res, w) for w in long]
    out += [_startup_target(res, *target) for target in STARTUP_TARGETS if target[0] in names]
    out += [_steady_target(res, w, limit) for w, limit in STEADY_TARGETS if w in names]
    out += [t for kind in res.get("stubs", {}) for t in _stub_targets(res, kind)]
    return out


def _steady_work(res: dict, workload: str, runner: str) -> float | None:
    """The runner's median on `workload` less what starting it costs: the median of the
    same program doing no work where the workload has one, else the `startup` guest's."""
    t, c = seconds(res, workload, runner), _cell(res, workload, runner)
    empty = (c or {}).get("empty")
    if empty is not None:
        s = (empty["median"], False) if empty["status"] == "ok" else None
    else:
        s = seconds(res, "startup", runner)
    return None if t is None or s is None or t[1] else max(t[0] - s[0], 0.0)


def _steady_target(res: dict, workload: str, limit: float) -> tuple[str, str]:
    own = "empty" in (_cell(res, workload, "patch") or {})
    what = (f"patch within {limit}x of native on {workload}, start-up subtracted "
            f"({'its own run doing nothing' if own else 'the startup guest'})")
    nat, pat = _steady_work(res, workload, "native"), _steady_work(res, workload, "patch")
    if nat is None or pat is None or not nat:
        return "n/a", f"{what}: {_why(res, workload, 'patch')}"
    ratio = pat / nat
    return ("PASS" if ratio <= limit else "FAIL"), f"{what}: {pat:.3f} s / {nat:.3f} s = {ratio:.2f}x"


def _stub_targets(res: dict, kind: str) -> list[tuple[str, str]]:
    row = res["stubs"][kind]["runners"]
    added, absolute = res["stubs"][kind]["targets"]
    nat, pat = (row.get(r, {}).get("ns") for r in ("native", "patch"))
    out = []
    if added is not None:
        what = f"a {kind} site costs patch <= {added} ns more than native"
        out.append(("n/a", f"{what}: {_stub_why(row)}") if nat is None or pat is None else
                   ("PASS" if pat - nat <= added else "FAIL", f"{what}: {pat:.1f} - {nat:.1f} = {pat - nat:.1f} ns"))
    if absolute is not None:
        what = f"a {kind} site costs patch <= {absolute} ns"
        out.append(("n/a", f"{what}: {_stub_why(row)}") if pat is None else
                   ("PASS" if pat <= absolute else "FAIL", f"{what}: {pat:.1f} ns (native {nat:.1f} ns)"
                    if nat is not None else f"{what}: {pat:.1f} ns"))
    return out


def _stub_why(row: dict) -> str:
    return "; ".join(f"{r} {c['status']} {c['reason']}".strip() for r, c in row.items() if c["ns"] is None) or "n/a"


def stub_table(res: dict) -> list[str]:
    """ns per site of each kind: native, patch, and what patch adds."""
    rows = res.get("stubs")
    if not rows:
        return []
    lines = ["| site kind | loops | native ns | patch ns | added ns | patch traps |", "|---|---:|---:|---:|---:|---:|"]
    for kind, entry in rows.items():
        row = entry["runners"]
        nat, pat = (row.get(r, {}).get("ns") for r in ("native", "patch"))
        traps = row.get("patch", {}).get("traps")
        fmt = lambda v: "–" if v is None else f"{v:.1f}"
        lines.append(f"| {kind} | {entry['n']:,} | {fmt(nat)} | {fmt(pat)} | "
                     f"{fmt(None if nat is None or pat is None else pat - nat)} | "
                     f"{'–' if traps is None else f'{traps:,.0f}'} |")
    return lines


def chart(res: dict, path) -> str | None:
    """The start-up rows as grouped bars (log seconds), written to `path`; its name,
    or None when there is nothing to draw or no matplotlib (`make bench` installs it)."""
    workloads = [w for w in CHART_WORKLOADS if any(x["name"] == w for x in res["workloads"])]
    runners = [r for r in CHART_RUNNERS if any(seconds(res, w, r) for w in workloads)]
    if not workloads or not runners:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(runners)
    for i, r in enumerate(runners):
        xs, ys = [], []
        for j, w in enumerate(workloads):
            v = seconds(res, w, r)
            if v is not None:
                xs.append(j + (i - (len(runners) - 1) / 2) * width)
                ys.append(v[0])
        ax.bar(xs, ys, width, label=r)
    ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel(f"seconds, median of {res['repeat']} (log scale)")
    ax.set_title("start-up: sbe (warm scan cache, and cold) against native and peers")
    ax.legend(ncol=3, fontsize="small")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def steady_state(res: dict) -> list[str]:
    """Each runner's time less its own start-up (_steady_work): what the workload itself
    costs under that runner, once the fixed cost of starting (for sbe: Python, its
    imports, the program's pages planted) is set aside. The steady-state targets are
    judged on these; the whole-run ratios above say how much of a miss is start-up."""
    runners = [r["name"] for r in res["runners"]]

    def work(w, r):
        return _steady_work(res, w, r)

    lines = ["| workload | " + " | ".join(runners) + " |", "|---|" + "---:|" * len(runners)]
    for w in res["workloads"]:
        if w["name"] == "startup":
            continue
        base = work(w["name"], "native")
        cells = []
        for r in runners:
            v = work(w["name"], r)
            cells.append("–" if v is None else f"{v:.3f}" + (f" ({v / base:.1f}x)" if base else ""))
        lines.append(f"| {w['name']} | " + " | ".join(cells) + " |")
    notes = []
    for w, factor in (("syscalls", 50), ("cpuid", 50)):
        e, p = work(w, "emulate"), work(w, "patch")
        if e is not None and p:
            notes.append(f"- {w}: emulate {e:.3f} s / patch {p:.3f} s = {e / p:.1f}x "
                         f"(target {factor}x on raw times)")
    return lines + ([""] + notes if notes else [])


# --- the document --------------------------------------------------------------------

def render(res: dict, chart_name: str | None = None) -> str:
    m = res["machine"]
    runners = [r["name"] for r in res["runners"]]
    lines = [
        "# sbe benchmark results", "",
        f"- date: {m['date']}",
        f"- CPU: {m['cpu']} ({m['cpus']} logical CPUs)",
        f"- kernel: {m['kernel']}; OS: {m['os']}",
        f"- load average at start: {m['loadavg']}",
        f"- sbe: {m['sbe']}; its Python: {m['python']}",
        "- tools: " + "; ".join(f"{k}: {v}" for k, v in m["tools"].items()),
        f"- command: `{res['command']}`",
        f"- median of {res['repeat']} run(s) per cell, wall-clock seconds; "
        f"timeout {res['timeout']:.0f} s per run; stdout and exit status checked against native", "",
        "## Median seconds", "", *_table(res, runners, ratio=False), "",
        "## Ratio to native", "", *_table(res, runners, ratio=True), "",
    ]
    traps = _traps_table(res, runners)
    if traps:
        lines += ["## Site traps per run (median; `--stats-json`)", "", *traps, ""]
    stubs = stub_table(res)
    if stubs:
        lines += ["## What one site costs (ns; guests/bench/stubs, (t(N) - t(0)) / N, medians)", "",
                  *stubs, ""]
    if chart_name:
        lines += ["## Start-up", "", f"![start-up times]({chart_name})", ""]
    lines += ["## Acceptance targets", ""]
    lines += [f"- **{v}** {text}" for v, text in acceptance(res)]
    steady = steady_state(res)
    if steady:
        lines += ["", "## Less start-up", "",
                  "Each runner's median less the same runner's median of the same program doing no "
                  "work (argument 0, `python3 -c pass`, `node -e 0`), or of the `startup` guest where "
                  "a workload has no such run. Seconds, and in brackets the ratio to native's; '–' "
                  "where a cell did not run.", "",
                  *steady]
    lines += ["", "## Runners", ""]
    for r in res["runners"]:
        extra = f" — unavailable: {r['unavailable']}" if r["unavailable"] else ""
        lines.append(f"- `{r['name']}`: {r['about']}{extra}")
    lines += ["", "## Workloads", ""]
    lines += [f"- `{w['name']}`: {w['about']}" for w in res["workloads"]]
    problems = [c for c in res["cells"].values() if c["status"] in ("mismatch", "timeout")]
    if problems:
        lines += ["", "## Problems", ""]
        lines += [f"- {c['runner']} on {c['workload']}: {c['status']}: {c['reason']}" for c in problems]
    return "\n".join(lines) + "\n"
