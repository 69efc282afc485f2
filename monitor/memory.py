"""Guest memory through /proc/PID/mem.

process_vm_writev cannot write read-only text; /proc/PID/mem can (the kernel forces
the write and copies the page on write, so a file mapping is never modified), in about
a microsecond for a few bytes. The file is tied to the address space it was opened
on, so it is reopened after every exec.
"""
from __future__ import annotations

import os


class GuestMemory:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)

    def read(self, address: int, size: int) -> bytes:
        return os.pread(self.fd, size, address)

    def read_upto(self, address: int, size: int) -> bytes:
        """Read as much of [address, address+size) as is mapped, stopping at a hole."""
        try:
            return os.pread(self.fd, size, address)
        except OSError:
            out = b""
            while size > 0:
                chunk = min(size, 4096 - (address & 4095))
                try:
                    data = os.pread(self.fd, chunk, address)
                except OSError:
                    break
                out += data
                if len(data) < chunk:
                    break
                address += chunk
                size -= chunk
            return out

    def write(self, address: int, data: bytes) -> None:
        written = os.pwrite(self.fd, data, address)
        if written != len(data):
            raise OSError(f"short write to guest memory at {address:#x}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
