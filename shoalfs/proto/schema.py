"""Request schemas: every field of every request is type- and range-checked
at the edge, before a handler sees it (DESIGN.md §8).

A schema maps field names to checkers. `validate` returns a new dict holding
only the declared fields (unknown ones are dropped, so a handler never reads
an unchecked value) with defaults filled in for optional fields.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shoalfs.proto.errors import Code, ShoalError

Checker = Callable[[str, Any], Any]
Schema = Mapping[str, "Checker | Opt"]

U32 = (1 << 32) - 1
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
U64 = (1 << 64) - 1


def _bad(name: str, what: str) -> ShoalError:
    return ShoalError(Code.BAD_REQUEST, f"field {name!r} must be {what}")


def Int(lo: int, hi: int) -> Checker:
    def check(name: str, v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise _bad(name, f"an integer in [{lo}, {hi}]")
        return v
    return check


def Number(lo: float, hi: float) -> Checker:
    """An int or a float (a time, a duration) in [lo, hi]."""
    def check(name: str, v: Any) -> float:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
            raise _bad(name, f"a number in [{lo:g}, {hi:g}]")
        return float(v)
    return check


def Str(max_bytes: int) -> Checker:
    def check(name: str, v: Any) -> str:
        # a str of n characters is at most 4n bytes: only encode the long ones
        if not isinstance(v, str) or (len(v) * 4 > max_bytes and len(v.encode(errors="surrogatepass")) > max_bytes):
            raise _bad(name, f"a string of at most {max_bytes} bytes")
        return v
    return check


def Bytes(max_len: int) -> Checker:
    def check(name: str, v: Any) -> bytes:
        if not isinstance(v, bytes) or len(v) > max_len:
            raise _bad(name, f"bytes of at most {max_len}")
        return v
    return check


def Raw(name: str, v: Any) -> Any:
    """Any value: the handler checks it itself (a replication view, a record)."""
    return v


def Bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _bad(name, "true or false")
    return v


def ListOf(item: Checker, max_len: int) -> Checker:
    def check(name: str, v: Any) -> list[Any]:
        if not isinstance(v, list) or len(v) > max_len:
            raise _bad(name, f"a list of at most {max_len} items")
        return [item(f"{name}[]", x) for x in v]
    return check


def Tuple(*items: Checker) -> Checker:
    """A list of exactly len(items) values, each checked by its checker."""
    def check(name: str, v: Any) -> list[Any]:
        if not isinstance(v, list) or len(v) != len(items):
            raise _bad(name, f"a list of {len(items)} items")
        return [item(f"{name}[{i}]", x) for i, (item, x) in enumerate(zip(items, v, strict=True))]
    return check


def Map(name: str, v: Any) -> dict[Any, Any]:
    if not isinstance(v, dict):
        raise _bad(name, "a map")
    return v


@dataclass(frozen=True)
class Opt:
    """An optional field: absent or None gives `default`."""

    check: Checker
    default: Any = None


def validate(schema: Schema, body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ShoalError(Code.BAD_REQUEST, "request body must be a map")
    out: dict[str, Any] = {}
    for name, spec in schema.items():
        value = body.get(name)
        if isinstance(spec, Opt):
            # a fresh copy of a list or map default: a handler may not change the schema
            out[name] = copy.copy(spec.default) if value is None else spec.check(name, value)
        elif name not in body:
            raise ShoalError(Code.BAD_REQUEST, f"missing field {name!r}")
        else:
            out[name] = spec(name, value)
    return out
