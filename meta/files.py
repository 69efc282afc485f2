"""Files written whole or not at all: a reader (another sbe, `sbe sites`) never sees
half of one, even when the writer is killed midway."""
from __future__ import annotations

import os


def replace_atomically(path: str, data: bytes) -> None:
    """Write `data` to `path`, replacing any file there in one rename."""
    directory, name = os.path.split(os.path.abspath(path))
    # Beside the target, because a rename is only atomic within one filesystem; a name
    # of our own instead of mkstemp so the file gets the usual umask-given mode.
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
