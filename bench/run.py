#!/usr/bin/env python3
"""Benchmark sbe against native execution and its peers (strace, valgrind, qemu-user).

Runs every workload under every runner REPEAT times, takes the median wall time, checks
that stdout and the exit status equal the native run's, and writes a markdown report
(--out, default bench/RESULTS.md) and its raw times as JSON beside it (results.json
for RESULTS.md, NAME.json for another NAME.md).

Cells: a runner that cannot run a trivial program (not installed, or sbe rejects
`--mode patch`) is "n/a (reason)"; a run over --timeout is reported as a timeout and
the cell's remaining repeats are dropped; a stdout or exit-status mismatch is
"MISMATCH" and makes this script exit 1 at the end.

Filters (--only / --skip, repeatable or comma-separated): RUNNER:WORKLOAD, RUNNER,
WORKLOAD, or '*' for either half.  Native always runs for every selected workload (it
is the reference).  Emulate mode traps every sensitive instruction and indirect
branch, so it needs minutes on branchy code; for a quick look try
  python3 bench/run.py --quick --skip emulate:branchy,emulate:python3,emulate:ls
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402
import runners as rn  # noqa: E402
import workloads as wl  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]) + "\n\nrunners: " + ", ".join(rn.NAMES)
        + "\nworkloads: " + ", ".join(wl.NAMES))
    p.add_argument("--repeat", type=int, default=5, metavar="N", help="runs per cell (default 5)")
    p.add_argument("--quick", action="store_true", help="one run per cell (same as --repeat 1)")
    p.add_argument("--timeout", type=float, default=600, metavar="SEC",
                   help="per-run timeout in seconds (default 600)")
    p.add_argument("--only", action="append", default=[], metavar="PAT",
                   help="run only the matching cells (RUNNER:WORKLOAD, RUNNER or WORKLOAD)")
    p.add_argument("--skip", action="append", default=[], metavar="PAT",
                   help="do not run the matching cells (same forms as --only)")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"), metavar="FILE",
                   help="markdown report (default bench/RESULTS.md); its raw times go beside it")
    p.add_argument("--sbe-root", default=str(rn.REPO), metavar="DIR",
                   help="run sbe from this checkout (default: this one), e.g. a `git archive` "
                        "snapshot while the work tree is being edited")
    p.add_argument("--no-install", action="store_true",
                   help="do not run bench/setup.sh when strace/valgrind/qemu-x86_64/node is missing")
    args = p.parse_args(argv)
    if args.quick:
        args.repeat = 1
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    try:
        args.only = [parse_pattern(s) for a in args.only for s in a.split(",") if s]
        args.skip = [parse_pattern(s) for a in args.skip for s in a.split(",") if s]
    except ValueError as e:
        p.error(str(e))
    return args


def parse_pattern(text: str) -> tuple[str, str]:
    if ":" in text:
        r, w = text.split(":", 1)
        r, w = r or "*", w or "*"
    elif text in rn.NAMES:
        r, w = text, "*"
    elif text in wl.NAMES:
        r, w = "*", text
    else:
        raise ValueError(f"{text!r} is neither a runner nor a workload")
    if not fnmatch.filter(rn.NAMES, r) or not fnmatch.filter(wl.NAMES, w):
        raise ValueError(f"{text!r} matches no runner:workload")
    return r, w


def selected(args, runner: str, workload: str) -> bool:
    match = lambda pats: any(fnmatch.fnmatch(runner, r) and fnmatch.fnmatch(workload, w)
                             for r, w in pats)
    return (not args.only or match(args.only)) and not match(args.skip)


def machine_info(sbe_root: Path) -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    osname = platform.system()
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass

    def out(cmd: list[str]) -> str | None:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        lines = (r.stdout or r.stderr).strip().splitlines()
        return lines[0] if r.returncode == 0 and lines else ("" if r.returncode == 0 else None)

    commit = out(["git", "-C", str(sbe_root), "rev-parse", "--short", "HEAD"])
    if commit is None:
        commit = "not a git checkout"
    elif out(["git", "-C", str(sbe_root), "status", "--porcelain", "--untracked-files=no"]):
        commit += " with uncommitted changes"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu": cpu, "cpus": os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "os": osname, "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "sbe": f"{sbe_root} ({commit})",
        "python": f"{platform.python_version()} ({sys.executable})",
        "tools": {name: out(cmd) or "not installed" for name, cmd in [
            ("gcc", ["gcc", "--version"]), ("strace", ["strace", "-V"]),
            ("valgrind", ["valgrind", "--version"]), ("qemu", ["qemu-x86_64", "--version"])]},
    }


def measure(argv, repeat, timeout, env, cwd, ref=None, warmup=0,
            stats: str | None = None) -> tuple[dict, tuple | None]:
    """Run one cell.  ref: the native (stdout, status) to check against, if any;
    warmup: runs first that are not counted; stats: the file each run of sbe writes
    its statistics to (whose site traps each counted run adds to the cell)."""
    times, statuses, traps = [], [], []
    cell = {"status": "ok", "reason": "", "argv": argv}
    for _ in range(warmup):
        try:
            rn.run_once(argv, timeout, env, cwd)
        except OSError:
            break
    for _ in range(repeat):
        try:
            r = rn.run_once(argv, timeout, env, cwd)
        except OSError as e:
            cell.update(status="n/a", short="cannot start", reason=e.strerror)
            break
        if r.timed_out:
            cell.update(status="timeout", reason=f"run {len(times) + 1} over {timeout:.0f} s")
            break
        times.append(r.seconds)
        statuses.append(r.status)
        if stats is not None and os.path.exists(stats):
            with open(stats) as f:
                traps.append(json.load(f)["site_traps"])
            os.unlink(stats)
        ref = ref or (r.stdout, r.status)
        if (r.stdout, r.status) != ref:
            what = "stdout differs" if r.stdout != ref[0] else ""
            if r.status != ref[1]:
                what += ("; " if what else "") + f"exit status {r.status}, expected {ref[1]}"
            err = rn.last_line(r.stderr)
            cell.update(status="mismatch", reason=what + (f" (stderr: {err})" if err else ""))
            break
    cell.update(times=times, exit_statuses=statuses,
                median=statistics.median(times) if times else None)
    if traps:
        cell.update(traps=traps, median_traps=statistics.median(traps))
    return cell, ref


def stub_costs(args, runners, env, cwd, tmp) -> tuple[dict, bool]:
    """The per-stub table: for each site kind, guests/bench/stubs KIND N and KIND 0
    under native and warm patch; (t(N) - t(0)) / N is what one site costs, start-up
    and exit left out. Returns {kind: {n, targets, runners: {runner: cell}}} and
    whether a run mismatched."""
    stubs = str(wl.GUEST_OUT / "stubs")
    out, failed = {}, False
    for kind, n, added, absolute in wl.STUB_KINDS:
        refs = {}
        out[kind] = {"n": n, "targets": (added, absolute), "runners": {}}
        for r in runners:
            cells = []
            for count in (n, 0):
                argv = [stubs, kind, str(count)]
                print(f"stubs      {r.name:9} {kind} {count}: ", end="", flush=True)
                stats = os.path.join(tmp, "stats.json") if r.is_sbe else None
                cell, refs[count] = measure(r.argv(argv, stats), args.repeat, args.timeout, env, cwd,
                                            refs.get(count), r.warmup if count else 0, stats)
                print(f"{cell['status']} {cell['median'] or 0:.3f} s {cell['reason']}".rstrip(), flush=True)
                cells.append(cell)
            full, empty = cells
            ok = full["status"] == empty["status"] == "ok"
            failed |= "mismatch" in (full["status"], empty["status"])
            out[kind]["runners"][r.name] = {
                "status": "ok" if ok else (full["status"] if full["status"] != "ok" else empty["status"]),
                "reason": full["reason"] or empty["reason"], "full": full, "empty": empty,
                "ns": (full["median"] - empty["median"]) / n * 1e9 if ok else None,
                "traps": full.get("median_traps")}
    return out, failed


def raw_path(out: Path) -> Path:
    """Where a report's raw times go: results.json for the default report, so one
    report's numbers never overwrite another's."""
    return out.parent / ("results.json" if out.name == "RESULTS.md" else out.stem + ".json")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python3 bench/run.py" + "".join(" " + shlex.quote(a) for a in
                                                (sys.argv[1:] if argv is None else argv))
    print("building guests/bench ...", flush=True)
    wl.build_guests()

    all_runners = rn.make_runners(Path(args.sbe_root).resolve())
    sel_runners = [r for r in all_runners if any(selected(args, r.name, w) for w in wl.NAMES)]
    missing = [r.tool for r in sel_runners if r.tool in rn.PEERS and not shutil.which(r.tool)]
    if any(selected(args, r.name, "node") for r in sel_runners) and not shutil.which("node"):
        missing.append("node")
    if missing and not args.no_install:
        print(f"missing {', '.join(missing)}: running bench/setup.sh to install them", flush=True)
        subprocess.run(["sh", str(HERE / "setup.sh")])

    env = dict(os.environ, LC_ALL="C")
    results = {"command": command, "repeat": args.repeat, "timeout": args.timeout,
               "machine": machine_info(Path(args.sbe_root).resolve()),
               "runners": [], "workloads": [], "cells": {}}
    failed = False
    with tempfile.TemporaryDirectory(prefix="sbe-bench-") as tmp:
        cwd = tmp
        # The warm runner's scan cache: the bench's own, filled by each cell's warm-up
        # run (and by the cells before it, as a user's cache holds what ran before).
        env["SBE_CACHE_DIR"] = os.path.join(tmp, "scan-cache")
        startup = str(wl.GUEST_OUT / "startup")
        unavailable = {}
        for r in all_runners:
            if r.name != "native" and r in sel_runners:
                unavailable[r.name] = rn.probe(r, startup, min(args.timeout, 120), env, cwd)
                if unavailable[r.name]:
                    print(f"runner {r.name}: n/a ({unavailable[r.name]})", flush=True)
            results["runners"].append({"name": r.name, "about": r.about,
                                       "unavailable": unavailable.get(r.name)})

        for w in wl.all_workloads(Path(tmp)):
            if not any(selected(args, r, w.name) for r in rn.NAMES):
                continue
            results["workloads"].append({"name": w.name, "argv": w.argv, "about": w.about})
            ref = empty_ref = None
            for r in all_runners:
                key = f"{r.name}:{w.name}"
                base = {"runner": r.name, "workload": w.name}
                if r.name != "native" and not selected(args, r.name, w.name):
                    results["cells"][key] = {**base, "status": "skipped"}
                    continue
                if unavailable.get(r.name):
                    results["cells"][key] = {**base, "status": "n/a",
                                             "short": unavailable[r.name].split(":")[0],
                                             "reason": unavailable[r.name]}
                    continue
                if r.name != "native" and ref is None:
                    results["cells"][key] = {**base, "status": "n/a", "short": "native failed",
                                             "reason": "no native reference"}
                    continue
                print(f"{w.name:10} {r.name:9} ", end="", flush=True)
                stats = os.path.join(tmp, "stats.json") if r.is_sbe else None
                cell, ref_out = measure(r.argv(w.argv, stats), args.repeat, args.timeout, env, cwd, ref,
                                        r.warmup, stats)
                if r.name == "native":
                    if cell["status"] == "ok" and cell["exit_statuses"][0] != 0:
                        cell.update(status="n/a", short="native failed",
                                    reason=f"exit status {cell['exit_statuses'][0]}")
                        failed = True      # a broken workload, not a slow one
                    ref = ref_out if cell["status"] == "ok" else None
                failed |= cell["status"] == "mismatch"
                if w.empty and cell["status"] == "ok" and (r.name == "native" or empty_ref is not None):
                    # Checked against native's own empty run, as the cell is against its full one.
                    empty, out = measure(r.argv(w.empty, stats), args.repeat, args.timeout, env, cwd,
                                         empty_ref, r.warmup, stats)
                    if r.name == "native":
                        empty_ref = out if empty["status"] == "ok" else None
                    failed |= empty["status"] == "mismatch"
                    cell["empty"] = {k: empty[k] for k in ("status", "reason", "times", "median")}
                results["cells"][key] = {**base, **cell}
                shown = f"{cell['median']:.3f} s" if cell["median"] is not None else ""
                if "median_traps" in cell:
                    shown += f", {cell['median_traps']:.0f} traps"
                if "empty" in cell:
                    e = cell["empty"]
                    shown += f"; doing nothing: {e['status']} {e['median'] or 0:.3f} s {e['reason']}".rstrip()
                print(f"{cell['status']:8} {shown} {cell['reason']}".rstrip(), flush=True)

        stub_runners = [r for r in all_runners if r.name in ("native", "patch")
                        and not unavailable.get(r.name) and (r.name == "native" or selected(args, r.name, "stubs"))]
        if any(r.name == "patch" for r in stub_runners):
            results["stubs"], stub_failed = stub_costs(args, stub_runners, env, cwd, tmp)
            failed |= stub_failed

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    chart = report.chart(results, out.with_suffix(".png"))
    out.write_text(report.render(results, chart))
    raw = raw_path(out)
    raw.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}, {raw}" + (f" and {chart}" if chart else ""))
    for verdict, text in report.acceptance(results):
        print(f"  {verdict:4} {text}")
    if failed:
        print("MISMATCH or native failure: see the report", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
