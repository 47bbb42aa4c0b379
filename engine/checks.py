"""What a config field accepts, declared beside the field; one function checks them all.

    slot_mib: int = field(default=16, metadata=checked(integer(1, 4096)))
    ...
    def __post_init__(self):
        check_fields(self, "transport.")   # ValueError "transport.slot_mib: must be ..."

Every message starts with the field's name (tests/unit/test_config.py relies on it). A bool is
never taken for a number, and NaN fails every bound.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    kinds: tuple[type, ...]
    says: str  # what the field must be, as the message puts it
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    none: bool = False  # None is accepted as well

    def __call__(self, name: str, value) -> None:
        if not self.accepts(value):
            raise ValueError(f"{name}: must be {self.says} (got {value!r})")

    def accepts(self, value) -> bool:
        if value is None:
            return self.none
        if isinstance(value, bool):  # an int subclass: accepted only where a bool is asked for
            return bool in self.kinds
        if not isinstance(value, self.kinds):
            return False
        above = self.low < value if self.low_open else self.low <= value
        below = value < self.high if self.high_open else value <= self.high
        return above and below


def integer(low: int, high: int) -> Check:
    return Check((int,), f"an integer in [{low}, {high}]", low, high)


def number(low: float, high: float, *, high_open: bool = False) -> Check:
    return Check((int, float), f"a number in [{low}, {high}{')' if high_open else ']'}", low, high, high_open=high_open)


def positive(below: float, what: str = "a number") -> Check:
    """A number > 0; `below` only keeps out absurd values and is not mentioned."""
    return Check((int, float), f"{what} > 0", 0, below, low_open=True, high_open=True)


def flag() -> Check:
    return Check((bool,), "True or False")


def optional(check: Check, *, mention: bool = True) -> Check:
    """`check`, or None (said in the message unless `mention` is False)."""
    return dataclasses.replace(check, none=True, says=f"None or {check.says}" if mention else check.says)


def checked(check: Check) -> dict:
    """The `metadata=` of a field that `check_fields` checks."""
    return {"check": check}


def check_fields(config, prefix: str = "") -> None:
    """Check every field of the dataclass `config` that declares a Check, in field order."""
    for f in dataclasses.fields(config):
        check = f.metadata.get("check")
        if check is not None:
            check(prefix + f.name, getattr(config, f.name))
