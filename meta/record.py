"""Record: the base of sbe's plain data classes.

What dataclasses would give them (fields in order, a readable repr, equality by
field), with the fields named in `__slots__` and the `__init__` written out. Every
start of sbe made its fifteen data classes with dataclasses, and that cost 19 ms of
a warm start that takes 150: 10 ms to import it (it pulls in inspect, ast and dis)
and about 0.6 ms a class for the code it generates and compiles. Value types that
never change are namedtuples instead.
"""
from __future__ import annotations


class Record:
    __slots__ = ()

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None    # mutable: equal records may stop being equal
