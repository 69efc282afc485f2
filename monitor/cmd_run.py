"""Run a program under sbe, every sensitive instruction and indirect branch virtualized.

The guest's stdin, stdout and stderr pass through untouched; sbe's own messages go to
stderr only when asked (-v, --stats) or to --log FILE. sbe exits with the guest's
status, or 128+N when a signal N killed it, as a shell reports it.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys


log = logging.getLogger(__name__)

# sbe's own failure, as `timeout` and `env` report theirs: not a status the guest gave.
SBE_FAILED = 125


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["patch", "emulate"], default="patch",
                   help="patch: sites jump to stubs in the guest (default); emulate: every "
                   "site is an int3 the monitor emulates. SIGUSR1 to sbe switches a running "
                   "guest to the other mode")
    p.add_argument("--emulate-kinds", metavar="KIND[,KIND]", default="",
                   help="in patch mode, leave these site kinds as traps (e.g. branch,cpuid)")
    p.add_argument("--emulate-sites", metavar="MODULE+OFFSET[,...]", default="",
                   help="in patch mode, leave these sites as traps (module basename or path, "
                   "offset in hex, as `sbe sites` prints them)")
    p.add_argument("--cache-size", metavar="BYTES", type=_size, default=1 << 20,
                   help="size of each side cache (default 1M; K and M suffixes)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="the scan cache: what earlier runs scanned, found again by content "
                   "(default $SBE_CACHE_DIR, else $XDG_CACHE_HOME/sbe, else ~/.cache/sbe)")
    p.add_argument("--no-cache", action="store_true",
                   help="scan everything, and save nothing for later runs")
    p.add_argument("--no-pin", action="store_true",
                   help="leave the CPUs alone: by default a guest of one task shares sbe's CPU "
                        "(every stop is then cheaper) until it starts a second task")
    p.add_argument("--sites-out", metavar="FILE",
                   help="save the site table (every process's sites, with hits) as JSON, for `sbe sites`")
    p.add_argument("--stats", action="store_true",
                   help="print statistics (sites per kind, traps, escapes, costs) on stderr at the end")
    p.add_argument("--stats-json", metavar="FILE", help="write the statistics as JSON to FILE")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log what sbe does on stderr (-vv for more)")
    p.add_argument("--log", metavar="FILE", help="write sbe's log to FILE instead of stderr")
    p.add_argument("program", metavar="PROGRAM", help="the program to run (looked up in PATH like a shell)")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="its arguments")


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20}
    try:
        value = int(text[:-1]) * units[text[-1].lower()] if text[-1:].lower() in units else int(text, 0)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if not 4096 <= value <= 1 << 30:
        raise argparse.ArgumentTypeError("the cache size must be between 4K and 1G")
    return (value + 4095) & ~4095


def policy_from(args):
    from sbe.meta.site import KINDS
    from sbe.patcher.patcher import PatchPolicy
    kinds = [k for k in args.emulate_kinds.split(",") if k]
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"--emulate-kinds: unknown kind {k!r} (kinds: {', '.join(KINDS)})")
    sites = []
    for item in filter(None, args.emulate_sites.split(",")):
        module, plus, offset = item.rpartition("+")
        try:
            sites.append((module, int(offset, 16)))
        except ValueError:
            plus = ""
        if not plus or not module:
            raise ValueError(f"--emulate-sites: {item!r} is not MODULE+OFFSET")
    return PatchPolicy(kinds, sites, args.cache_size)


def setup_logging(verbose: int, path: str | None) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.FileHandler(path) if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("sbe: %(message)s"))
    root = logging.getLogger("sbe")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    if not path and verbose == 0:
        # Quiet by default: the guest's stderr is the user's.
        root.setLevel(logging.ERROR)


def forward_signals(session) -> None:
    """SIGTERM/SIGHUP sent to sbe go to the guest, as to a shell's child; SIGINT and
    SIGQUIT from the terminal reach the guest directly (same process group)."""
    def forward(signum, _frame):
        try:
            os.kill(session.first_pid, signum)
        except OSError:
            pass
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)

    def switch(_signum, _frame):
        session.request_switch()
    signal.signal(signal.SIGUSR1, switch)
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)


def run(args) -> int:
    from sbe.meta.scancache import ScanCache, default_directory
    from sbe.monitor.launch import LaunchError, resolve
    from sbe.monitor.session import Session

    setup_logging(args.verbose, args.log)
    args_list = args.args[1:] if args.args[:1] == ["--"] else args.args
    argv = [args.program, *args_list]
    try:
        path = resolve(args.program)
    except LaunchError as e:
        print(f"sbe: {e}", file=sys.stderr)
        return e.status
    if args.sites_out and os.path.isdir(args.sites_out):
        print(f"sbe: --sites-out {args.sites_out}: Is a directory", file=sys.stderr)
        return 2
    try:
        policy = policy_from(args)
    except ValueError as e:
        print(f"sbe: {e}", file=sys.stderr)
        return 2
    cache = None if args.no_cache else ScanCache(args.cache_dir or default_directory())
    session = Session(argv, path, mode=args.mode, policy=policy, record_sites=bool(args.sites_out),
                      cache=cache, pin=not args.no_pin, own_process=True)
    try:
        session.start()
    except LaunchError as e:
        print(f"sbe: {e}", file=sys.stderr)
        return e.status
    forward_signals(session)
    try:
        status = session.run()
    except Exception as e:  # noqa: BLE001 - sbe's own failure: one line, the guest is gone
        log.debug("sbe failed", exc_info=True)
        print(f"sbe: internal error: {type(e).__name__}: {e} (the guest was killed; -vv for details)",
              file=sys.stderr)
        return SBE_FAILED
    if args.sites_out:
        try:
            from sbe.meta import sitesfile
            sitesfile.save(args.sites_out, argv, args.mode, session.site_rows())
        except OSError as e:
            print(f"sbe: cannot write {args.sites_out}: {e.strerror}", file=sys.stderr)
    if args.stats:
        print(session.stats.render(), file=sys.stderr)
    if args.stats_json:
        import json   # here: most runs write no JSON, and the import costs every start 2 ms
        with open(args.stats_json, "w") as f:
            json.dump(session.stats.as_dict(), f, indent=1)
    return status
