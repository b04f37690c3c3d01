"""One validation layer for everything that comes in from outside: CLI numbers, paths and files.

Each check raises `UserError` with one line that names the input, what is wrong with it and the
fix; the CLI prints that line and exits 2. Commands run these checks before any work starts
(loading data, building models, simulating), so a bad flag never costs minutes and never leaves
half-written results. Numbers are checked where the option is declared (`typer.Option(...,
callback=number(...))`), files by the reader that owns their format through `fields` (JSON/YAML
mappings) and `read_csv` (CSV tables). Torch-free: the power tools and the board import it.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from ddi_hw.errors import UserError

# ----------------------------------------------------------------------------- numbers


def _describe(low, high, low_open, high_open, integer) -> str:
    kind = "an integer" if integer else "a finite number"
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return kind + (" " + " and ".join(parts) if parts else "")


def check_number(value, name: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False):
    """`value` itself if it is a finite (integer) number in range, else a one-line UserError.
    None passes (an option that was not given)."""
    if value is None:
        return None
    expect = _describe(low, high, low_open, high_open, integer)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = float(value).is_integer()
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise UserError(f"{name} is {value!r}; expected {expect}")
    return int(value) if integer else value


def number(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, integer: bool = False) -> Callable:
    """A typer option callback enforcing `check_number` on the option's value."""
    import typer

    def callback(ctx, param, value):
        if ctx.resilient_parsing:
            return value
        return check_number(value, param.opts[0] if param.opts else param.name, low, high,
                            low_open, high_open, integer)

    # typer tells the context and parameter apart by annotation (real classes, not strings)
    callback.__annotations__ = {"ctx": typer.Context, "param": typer.CallbackParam}
    return callback


def number_list(text: str | None, name: str, low: float | None = None, low_open: bool = False
                ) -> list[float] | None:
    """'1e6, 2e6' -> [1e6, 2e6], every item finite and in range; None/'' -> None."""
    if text is None or not text.strip():
        return None
    out = []
    for item in text.split(","):
        try:
            v = float(item)
        except ValueError:
            raise UserError(f"{name}: {item.strip()!r} is not a number; give numbers separated by "
                            "commas, e.g. 1e6,2e6") from None
        out.append(check_number(v, f"{name} item {item.strip()!r}", low=low, low_open=low_open))
    return out


# ----------------------------------------------------------------------------- paths


def input_file(path: str | Path, what: str, fix: str) -> Path:
    """An existing, readable regular file; `fix` says how to get a good one."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path} not found; {fix}")
    if not path.is_file():
        raise UserError(f"{what} {path} is not a file; {fix}")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} {path} is not readable; check its permissions")
    return path


def read_text(path: str | Path, what: str, fix: str) -> str:
    """The UTF-8 text of an input file (a stray binary byte is one line, not a traceback)."""
    path = input_file(path, what, fix)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise UserError(f"{what} {path} is not UTF-8 text (byte {err.start}, line {line}); {fix}") from None


def output_dir(path: str | Path, flag: str) -> Path:
    """A directory we can write into, created if needed and probed with a real temp file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a directory; choose another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to {flag} {path} ({err.strerror or err}); choose another {flag}") from None
    return path


def output_file(path: str | Path, flag: str) -> Path:
    """A file path whose directory is writable (the file itself is replaced atomically later)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file name")
    output_dir(path.parent if str(path.parent) else Path("."), f"{flag} folder")
    return path


def safe_name(name: str) -> str:
    """`name` usable as one path component: no separators, no leading dot, nothing else odd."""
    import re

    clean = re.sub(r"[^A-Za-z0-9._+-]", "_", str(name)).lstrip(".")
    return clean or "unnamed"


# ----------------------------------------------------------------------------- mappings

_TYPE_NAMES = {str: "text", int: "an integer", float: "a finite number", bool: "true or false",
               dict: "a mapping", list: "a list", type(None): "null"}


def _is(value, types: tuple) -> bool:
    for t in types:
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value):
            return True
        if t not in (int, float) and isinstance(value, t):
            return True
    return False


def fields(obj: Any, schema: dict[str, Any], where: str, fix: str) -> Any:
    """Check a decoded JSON/YAML object against `schema`: {"a.b": spec}, where a key starting
    with "?" is optional and spec is a type, a tuple of types, or (types, expect, check).
    The first problem is one line naming the field and `fix`. Returns `obj`."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a mapping of fields, got {type(obj).__name__}; {fix}")
    for key, spec in schema.items():
        optional = key.startswith("?")
        parts = key.lstrip("?").split(".")
        cur, present = obj, True
        for i, part in enumerate(parts):
            if not isinstance(cur, dict):
                raise UserError(f"{where}: field '{'.'.join(parts[:i])}' must be a mapping; {fix}")
            if part not in cur:
                present = False
                break
            cur = cur[part]
        if not present:
            if optional:
                continue
            raise UserError(f"{where}: field '{'.'.join(parts)}' is missing; {fix}")
        types, expect, check = spec if isinstance(spec, tuple) and len(spec) == 3 and callable(spec[2]) \
            else (spec, None, None)
        types = types if isinstance(types, tuple) else (types,)
        expect = expect or " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        if not _is(cur, types) or (check is not None and not check(cur)):
            shown = repr(cur) if len(repr(cur)) <= 40 else repr(cur)[:37] + "..."
            raise UserError(f"{where}: field '{'.'.join(parts)}' is {shown}; expected {expect}; {fix}")
    return obj


def read_json(path: str | Path, what: str, fix: str) -> Any:
    import json

    text = read_text(path, what, fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno}); {fix}") from None


# ----------------------------------------------------------------------------- CSV

# column rule -> (description, check on a float array that is True where the value is fine)
_RULES: dict[str, tuple[str, Callable]] = {
    "finite": ("a finite number", lambda v: _np().isfinite(v)),
    "finite|nan": ("a finite number or empty", lambda v: ~_np().isinf(v)),
    ">=0": ("a finite non-negative number", lambda v: _np().isfinite(v) & (v >= 0)),
    ">0": ("a finite number > 0 (non-negative and not zero)", lambda v: _np().isfinite(v) & (v > 0)),
    "int>=0": ("an integer >= 0", lambda v: _np().isfinite(v) & (v >= 0) & (v == _np().round(v))),
    "[0,1]": ("a number in [0, 1]", lambda v: _np().isfinite(v) & (v >= 0) & (v <= 1)),
    "<=1|nan": ("a number <= 1 or empty", lambda v: _np().isnan(v) | (_np().isfinite(v) & (v <= 1))),
}


def _np():
    import numpy as np

    return np


def read_csv(path: str | Path, columns: Iterable[str], what: str, fix: str,
             numbers: dict[str, str] | None = None, min_rows: int = 1):
    """A CSV table that must hold `columns` and at least `min_rows` rows, with the `numbers`
    columns ({column: rule from _RULES}) converted to float and checked row by row."""
    import pandas as pd

    path = input_file(path, what, fix)
    columns = list(columns)
    try:
        df = pd.read_csv(path, encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {err.start}); {fix}") from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{what} {path} is empty; expected a header with columns {', '.join(columns)}") from None
    except (pd.errors.ParserError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "parse error"
        raise UserError(f"{what} {path} is not a readable CSV table ({first}); {fix}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        has = ", ".join(map(str, df.columns[:8])) + (", ..." if len(df.columns) > 8 else "")
        raise UserError(f"{what} {path} lacks columns {', '.join(missing)} (its header: {has}); {fix}")
    if len(df) < min_rows:
        raise UserError(f"{what} {path} has {len(df)} data rows, needs at least {min_rows}; {fix}")
    for col, rule in (numbers or {}).items():
        if col not in df.columns:
            continue
        expect, check = _RULES[rule]
        vals = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
        np = _np()
        bad = (~check(vals) & ~np.isnan(vals)) | (df[col].notna().to_numpy() & np.isnan(vals))
        if not rule.endswith("|nan"):
            bad |= np.isnan(vals)  # an empty cell
        if bad.any():
            i = int(bad.argmax())
            raise UserError(f"{what} {path} row {i + 2}: column '{col}' is {df[col].iloc[i]!r}; "
                            f"expected {expect}")
        df[col] = vals
    return df
