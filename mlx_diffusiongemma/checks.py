"""Checks of single values from files, flags and requests: each failure is one line naming the
value and what was expected. Types are checked before ranges, since a string or NaN compares
in surprising ways (every comparison with NaN is false, so NaN passes any `x < lo` test)."""

import json
import math
import os
import stat
from typing import Optional


def describe(value) -> str:
    """How a wrong value is shown: its JSON kind where that is the surprise."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return repr(value)


def _bounds(lo, hi, lo_open) -> str:
    if hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}]" if lo is not None else f"<= {hi}"
    return f"{'>' if lo_open else '>='} {lo}" if lo is not None else ""


def check_int(
    name: str,
    value,
    lo: Optional[int] = 1,
    hi: Optional[int] = None,
    exc=ValueError,
    cap: Optional[int] = None,
) -> int:
    """An integer (not a bool, float or string) in [lo, hi]; `cap` is a limit of the
    implementation rather than of the setting, named only when exceeded."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise exc(f"{name} must be an integer {_bounds(lo, hi, False)} (got {describe(value)})")
    if cap is not None and value > cap:
        raise exc(f"{name} {value} is larger than the largest supported, {cap}")
    return value


def check_number(
    name: str,
    value,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    lo_open: bool = False,
    exc=ValueError,
) -> float:
    """A finite real number (int or float, not a bool or string) in [lo, hi] (or (lo, hi])."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        bounds = " " + _bounds(lo, hi, lo_open) if lo is not None or hi is not None else ""
        raise exc(f"{name} must be a finite number{bounds} (got {describe(value)})")
    return value


def check_bool(name: str, value, exc=ValueError) -> bool:
    if not isinstance(value, bool):
        raise exc(f"{name} must be true or false (got {describe(value)})")
    return value


def check_object(name: str, value, exc=ValueError) -> dict:
    """A JSON object (dict); callers treat null as unset before calling."""
    if not isinstance(value, dict):
        raise exc(f"{name} must be a JSON object (got {describe(value)})")
    return value


def check_token_ids(name: str, value, exc=ValueError) -> list:
    """One id or a list of ids (as `eos_token_id` is written), as a list."""
    ids = value if isinstance(value, list) else [value]
    for i in ids:
        check_int(name, i, lo=0, exc=exc)
    return ids


JSON_LIMIT = 64 << 20  # bytes: far above any config or index, far below a mistaken weight file


def read_json(path, exc=ValueError):
    """The parsed contents of a small JSON file, read only if it is a regular file (a FIFO
    would block); `exc` carries the reason with the file's name."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise exc(f"{path} is not a regular file")
        if st.st_size > JSON_LIMIT:
            raise exc(f"{path} is too large for a JSON file ({st.st_size} bytes)")
        with open(path, "rb") as f:
            return json.loads(f.read())
    except OSError as e:
        reason = "a broken link" if os.path.islink(path) else e.strerror
        raise exc(f"{path} cannot be read ({reason})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise exc(f"{path} is not valid JSON ({e})") from None
