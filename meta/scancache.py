"""The persistent scan cache: what the scans of one code mapping found, kept on disk
and found again by content (the way an ahead-of-time code cache is found).

A scan is a pure function of a mapping's bytes and of the entries runs learned into
it, so its result is keyed by a digest of those bytes and of this format's version:
a rebuilt or replaced file never matches an old entry, and every offset is relative
to the mapping's start, so ASLR does not matter. An entry holds, for each page the
runs scanned, the instruction starts, the roots scans started from (branch targets
validated at run time among them), the landing points the code reveals, and the
sites; applying it (patcher/) plants those sites with their kinds, windows and strategieswithout decoding again.

A cache can never make a run wrong: a file that is not a regular file of ours, has
another magic, version or key, fails its checksum or does not parse is ignored (and
rewritten by the next store), and so is a directory other users may write to.
Writers merge under a lock (pages one run scanned are added to what others saved;
for a page both scanned, the newer decoding wins and the roots of both are kept) and
publish by rename, so a reader never sees a torn entry.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import marshal
import os
import stat
import sys
import time
from array import array
from bisect import bisect_left

from sbe.meta.files import replace_atomically
from sbe.meta.record import Record

log = logging.getLogger(__name__)

VERSION = 12
LIMIT = 256 << 20          # bytes of entries kept; least recently used go first
USERS = 16                 # programs a page remembers as having executed it
# The format's version, and the Python whose marshal format the payload is in.
MAGIC = b"SBESCAN" + bytes([VERSION, *sys.version_info[:2], marshal.version])
SUFFIX = ".scan"
DIGEST = 32


def key_of(code: bytes, maker: bytes = b"") -> str:
    """The entry's name for a mapping holding `code`. `maker`: a digest of the code
    that makes what entries hold (scanner, planner, stubs), so that what other code
    made (another sbe, a fix to a stub) is never served."""
    return hashlib.sha256(MAGIC + maker + code).hexdigest()


def default_directory(environ=os.environ) -> str:
    if environ.get("SBE_CACHE_DIR"):
        return environ["SBE_CACHE_DIR"]
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sbe")


class PageRecord(Record):
    """One scanned page, offsets relative to the mapping's start. Its instruction
    starts, a thousand a page, are a sorted array of offsets, not a set: a warm
    start of python3 read 312,000 of them, and unmarshalling them as sets of ints
    took 70 ms where the array's bytes take nothing; membership is a bisection, and
    a page state turns them into addresses only when it needs them all."""
    __slots__ = ("starts", "roots", "targets", "sites", "exits", "users")

    def __init__(self, starts=(), roots=None, targets=None, sites=None, exits=None, users=None) -> None:
        self.starts: array = starts if isinstance(starts, array) else array("I", sorted(starts))
        self.roots: set = set() if roots is None else roots
        self.targets: set = set() if targets is None else targets
        self.sites: dict = {} if sites is None else sites   # offset -> (size, kind, mnemonic, op_str, plan, stub)
        self.exits: set = set() if exits is None else exits  # entries it gives other pages
        # The programs whose runs executed the page (it faulted at a fetch), most
        # recent first: a warm run of one of them plants it when its mapping
        # appears, others at its first fetch (a shell's pages of libc are not
        # /bin/true's).
        self.users: list = [] if users is None else users

    def has_start(self, offset: int) -> bool:
        i = bisect_left(self.starts, offset)
        return i < len(self.starts) and self.starts[i] == offset

    def merged(self, newer: "PageRecord") -> "PageRecord":
        """This record with a newer scan of the page merged in (a new record: one a
        run planted from is never changed under it). The newer decoding replaces
        this one's: starts from two runs' decodings could overlap (a sweep's guess,
        which the other run's ground truth dropped), and a trap planted inside a
        real instruction would corrupt it. Roots (where control really arrived) are
        kept from both; those the kept decoding lacks are scanned again when control
        comes there. A run that kept no plan for a site (emulate mode, say) loses
        none another run made for the same instruction: plans are checked before
        use anyway."""
        sites = {o: self.sites[o] if site[4] is None and self.sites.get(o, (None,))[:4] == site[:4]
                 else site for o, site in newer.sites.items()}
        return PageRecord(newer.starts, self.roots | newer.roots, newer.targets, sites, newer.exits,
                          list(dict.fromkeys(newer.users + self.users))[:USERS])


class Entry(Record):
    __slots__ = ("key", "path", "size", "pages")

    def __init__(self, key: str, path: str, size: int, pages: dict | None = None) -> None:
        self.key = key
        self.path = path          # the file it was mapped from, for people
        self.size = size          # the mapping's length
        self.pages: dict = {} if pages is None else pages   # page offset -> PageRecord

    def merge(self, other: "Entry") -> None:
        for offset, record in other.pages.items():
            mine = self.pages.get(offset)
            self.pages[offset] = record if mine is None else mine.merged(record)


def encode(entry: Entry) -> bytes:
    pages = {offset: (r.starts.tobytes(), r.roots, r.targets, r.sites, r.exits, tuple(r.users))
             for offset, r in entry.pages.items()}
    # Not compressed: python3's entry is 2.8 MB, and zlib cost each warm start 10 ms
    # to inflate it (and each store 37 ms) where reading it whole costs one.
    payload = marshal.dumps((entry.key, entry.path, entry.size, pages))
    return MAGIC + hashlib.sha256(payload).digest() + payload


class CorruptEntry(ValueError):
    pass


def decode(data: bytes, key: str) -> Entry:
    """The entry in `data`, which must be the one named `key`; CorruptEntry otherwise.

    marshal, not JSON: a warm start reads libc's entry (a thousand sites with their
    plans and stubs), and rebuilding it from JSON took 30 ms where marshal hands back
    the sets and tuples themselves. marshal trusts its input, so nothing reaches it
    that fails the checksum, and the format is tied to this Python (MAGIC)."""
    if data[:len(MAGIC)] != MAGIC:
        raise CorruptEntry("not a scan cache entry of this version")
    digest, payload = data[len(MAGIC):len(MAGIC) + DIGEST], data[len(MAGIC) + DIGEST:]
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptEntry("checksum mismatch")
    try:
        stored, path, size, pages = marshal.loads(payload)
        if stored != key:
            raise CorruptEntry("entry for other content")
        entry = Entry(key, str(path), int(size))
        for offset, (starts, roots, targets, sites, exits, users) in pages.items():
            offsets = array("I")
            offsets.frombytes(starts)
            # As marshal made them: the checksum says this module wrote them.
            entry.pages[offset] = PageRecord(offsets, roots, targets, sites, exits, list(users)[:USERS])
    except CorruptEntry:
        raise
    except (ValueError, KeyError, TypeError, EOFError) as e:
        raise CorruptEntry(f"unreadable ({type(e).__name__})") from None
    return entry


class ScanCache:
    """One cache directory. Every failure to read or write is a miss, never an error
    of the run: the run scans as if the cache were empty."""

    def __init__(self, directory: str, limit: int = LIMIT) -> None:
        self.directory = directory
        self.limit = limit
        self.usable = self._check_directory()
        # Entries this process read or wrote: a process tree execs the same programs
        # over and over (a shell loop), and decoding an entry costs milliseconds.
        self._known: dict[str, Entry] = {}
        self._pending: dict[str, Entry] = {}   # staged, for flush

    def _check_directory(self) -> bool:
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            st = os.stat(self.directory)
        except OSError as e:
            log.info("scan cache %s unusable: %s", self.directory, e.strerror)
            return False
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            log.info("scan cache %s ignored: not a directory of ours that only we can write",
                     self.directory)
            return False
        return True

    def path_of(self, key: str) -> str:
        return os.path.join(self.directory, key + SUFFIX)

    def load(self, key: str) -> Entry | None:
        entry = self._known.get(key) or self._read(key)
        if entry is None:
            return None
        self._known[key] = entry
        try:
            path = self.path_of(key)
            os.utime(path, (time.time(), os.stat(path).st_mtime))   # last used, for eviction
        except OSError:
            pass
        return entry

    def _read(self, key: str) -> Entry | None:
        if not self.usable:
            return None
        path = self.path_of(key)
        if not os.path.lexists(path):
            return None
        entry, why = self.inspect(key)
        if entry is None:
            log.info("scan cache entry %s ignored: %s", path, why)
        return entry

    def stage(self, entry: Entry) -> None:
        """Merge `entry` into what this process will store at `flush`, and serve it
        to the rest of the run: a shell's thousand subshells each learn a page or
        two of libc, and storing libc's entry (read, merge, write, fsync) costs
        tens of milliseconds each time."""
        base = self._pending.get(entry.key) or self._known.get(entry.key)
        merged = Entry(entry.key, entry.path, entry.size, dict(base.pages) if base else {})
        merged.merge(entry)
        self._pending[entry.key] = self._known[entry.key] = merged

    def flush(self) -> None:
        """Store what was staged."""
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            self.store(entry)

    def store(self, entry: Entry) -> None:
        """Merge `entry` into what the cache holds for its key."""
        if not self.usable:
            return
        try:
            with open(os.path.join(self.directory, entry.key + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                old = self._read(entry.key)      # what other runs wrote meanwhile too
                if old is not None:
                    old.merge(entry)
                    entry = old
                replace_atomically(self.path_of(entry.key), encode(entry))
                self._known[entry.key] = entry
            self.evict()
        except OSError as e:
            log.info("scan cache entry for %s not saved: %s", entry.path, e.strerror)

    def files(self) -> list[tuple[str, os.stat_result]]:
        """(key, stat) of every entry file, least recently used first."""
        found = []
        try:
            names = os.listdir(self.directory)
        except OSError:
            return []
        for name in names:
            if name.endswith(SUFFIX):
                try:
                    found.append((name[:-len(SUFFIX)], os.lstat(os.path.join(self.directory, name))))
                except OSError:
                    continue
        return sorted(found, key=lambda f: f[1].st_atime)

    def evict(self) -> int:
        """Drop least recently used entries until the cache fits its limit."""
        files = self.files()
        total, dropped = sum(st.st_size for _, st in files), 0
        for key, st in files:
            if total <= self.limit:
                break
            self.remove(key)
            total -= st.st_size
            dropped += 1
        return dropped

    def remove(self, key: str) -> None:
        for path in (self.path_of(key), os.path.join(self.directory, key + ".lock")):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def inspect(self, key: str) -> tuple[Entry | None, str]:
        """The entry named `key` and "" if it is valid, else None and why not. Only a
        regular file of ours is read: never a link, a fifo or a device."""
        try:
            fd = os.open(self.path_of(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            return None, e.strerror or str(e)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                return None, "not a file of ours"
            with os.fdopen(fd, "rb", closefd=False) as f:
                return decode(f.read(), key), ""
        except OSError as e:
            return None, e.strerror or str(e)
        except CorruptEntry as e:
            return None, str(e)
        finally:
            os.close(fd)
