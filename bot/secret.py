"""A value that refuses to be printed."""

from __future__ import annotations

from typing import Final


class Secret:
    """Holds a credential; ``str``, ``repr`` and f-strings show a mask, only :meth:`get` reveals it."""

    __slots__ = ("_value",)
    MASK: Final = "********"

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.MASK})"

    def __str__(self) -> str:
        return self.MASK

    def __format__(self, spec: str) -> str:
        return self.MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret is not pickled")
