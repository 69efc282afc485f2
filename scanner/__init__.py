"""Finding the guest instructions sbe must virtualize, from code bytes alone.

Nothing here touches a process: the monitor reads the bytes and hands them over, so
the scanner can be tested, and run by `sbe scan`, without ptrace.
"""
