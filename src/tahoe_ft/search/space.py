"""A search space's parameters: `float(lo, hi)`, `logfloat(lo, hi)`, `int(lo, hi[, step])`, `choice(a, b, ...)`
parsed into `Param`s (Optuna distributions), and any value written back as a Hydra override (`key=value`).

Nothing here composes or trains: `tahoe_ft.search.plan` checks each key against the rounds' configs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from tahoe_ft.errors import UserError

KINDS = ("float", "logfloat", "int", "choice")
_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$", re.S)
_INT = re.compile(r"^[-+]?\d+$")
_BARE = re.compile(r"^[A-Za-z_][\w\-./]*$")  # a string Hydra reads unquoted
GRAMMAR = "float(lo, hi), logfloat(lo, hi), int(lo, hi), int(lo, hi, step) or choice(a, b, ...)"


@dataclass(frozen=True)
class Param:
    """One searched training key: its distribution (`kind` and `args`, parsed from the space file's text)."""

    key: str
    kind: str
    args: tuple
    text: str

    def suggest(self, trial: Any) -> Any:
        """The trial's value (Optuna's suggest_*; the key is the parameter's name in the study)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.args))
        if self.kind == "int":
            lo, hi, step = self.args
            return trial.suggest_int(self.key, lo, hi, step=step)
        lo, hi = self.args
        return trial.suggest_float(self.key, lo, hi, log=self.kind == "logfloat")

    def candidates(self) -> list:
        """Values every composition check tries: both ends of a range, every choice."""
        if self.kind == "choice":
            return list(self.args)
        return [self.args[0], self.args[1]]

    def largest(self) -> Any:
        values = [v for v in self.candidates() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return max(values) if values else None


def flatten(params: dict, where: str, prefix: str = "") -> dict[str, Any]:
    """`{optim: {lr: ...}}` and `{optim.lr: ...}` alike as `{"optim.lr": ...}`; a key given twice is an error."""
    out: dict[str, Any] = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        items = flatten(v, where, f"{key}.") if isinstance(v, dict) else {key: v}
        for name, value in items.items():
            if name in out:
                raise UserError(f"{where}: params.{name} is given twice (nested and dotted); keep one")
            out[name] = value
    return out


def parse_param(key: str, text: Any, where: str) -> Param:
    """`text` (the space file's value for `key`) as a Param; one line naming the key when it is malformed."""
    at = f"{where}: params.{key}"
    if not isinstance(text, str) or not (m := _CALL.match(text)):
        raise UserError(
            f"{at} = {text!r} is not a search range; write {GRAMMAR} (quote it on the command line: "
            f"\"sweep.params.{key}='float(0, 1)'\"; a fixed value belongs in the space's overrides)"
        )
    kind, inner = m.group(1), m.group(2)
    if kind not in KINDS:
        raise UserError(f"{at} = {text!r}: unknown range '{kind}'; write {GRAMMAR}")
    items = [scalar(s) for s in _split(inner)] if inner.strip() else []
    if kind == "choice":
        if not items:
            raise UserError(f"{at} = {text!r}: choice() is empty; list at least one value, e.g. choice(a, b)")
        if len({(type(v), v) for v in items}) != len(items):
            raise UserError(f"{at} = {text!r}: a value is listed twice; list each once")
        return Param(key, kind, tuple(items), text)
    want = "2 or 3" if kind == "int" else "2"
    if len(items) not in ((2, 3) if kind == "int" else (2,)):
        raise UserError(
            f"{at} = {text!r}: {kind}() takes {want} numbers, got {len(items)}; e.g. {kind}(1, 10)"
        )
    for v in items:
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not number or (kind == "int" and not isinstance(v, int)):
            what = "a whole number" if kind == "int" else "a finite number"
            raise UserError(f"{at} = {text!r}: bound {v!r} is not {what}; e.g. {kind}(1, 10)")
    lo, hi = items[0], items[1]
    if lo >= hi:
        what = "empty" if lo == hi else "inverted"
        raise UserError(f"{at} = {text!r}: the range is {what} ({lo} >= {hi}); give lo < hi")
    if kind == "logfloat" and lo <= 0:
        raise UserError(f"{at} = {text!r}: logfloat needs lo > 0 (got {lo}); use float() to include 0")
    if kind == "int":
        step = items[2] if len(items) == 3 else 1
        if step < 1 or step > hi - lo:
            raise UserError(f"{at} = {text!r}: step {step} must be between 1 and hi - lo = {hi - lo}")
        return Param(key, kind, (lo, lo + (hi - lo) // step * step, step), text)  # hi on the grid, as Optuna
    return Param(key, kind, (float(lo), float(hi)), text)


def scalar(s: str) -> Any:
    """One argument of a range: a quoted string, true/false/null, an int, a float, or a bare string."""
    s = s.strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "none", "~"):
        return None
    if _INT.match(s):
        return int(s)
    try:
        return float(s)
    except ValueError:
        return s


def _split(inner: str) -> list[str]:
    """Comma-separated items; commas inside quotes are kept."""
    items, cur, quote = [], [], None
    for ch in inner:
        if quote:
            cur.append(ch)
            quote = None if ch == quote else quote
        elif ch in "'\"":
            cur.append(ch)
            quote = ch
        elif ch == ",":
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    items.append("".join(cur))
    return items


def value_text(value: Any) -> str:
    """A Python value as Hydra override syntax (floats exact: repr round-trips)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(value_text(v) for v in value) + "]"
    s = str(value)
    if _BARE.match(s) and s.lower() not in ("true", "false", "null"):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override(key: str, value: Any) -> str:
    return f"{key}={value_text(value)}"
