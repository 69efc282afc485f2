"""sbe: a scan-before-execute, in-place code patching virtualizer for x86-64 Linux.

The repository's top-level folders install as this package's subpackages (the
distribution is `scan-before-execute`; imports read `from sbe.scanner import ...`):
monitor (ptrace, the event loop, the CLI), patcher (scan results applied to a live
guest, stub code generation), handlers (one module per site kind's emulation),
scanner and meta (pure: bytes to sites, and the state model).
"""
__version__ = "0.1.0"
