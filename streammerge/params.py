"""The parameter language of mergekit configs: settings, filters, gradients, typed values.

Imports nothing of the package. A *setting* is a scalar, a gradient (list of scalars), or a
list of conditionals `{filter, value}`; SEMANTICS.md §1.4 gives the rules implemented here.
Methods declare `ParamSpec`s; config parses settings; plan evaluates them per tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Scalar = bool | int | float | str
FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32
Kind = Literal["float", "int", "bool", "str"]
Scope = Literal["shared", "input", "nonbase"]


@dataclass(frozen=True)
class Gradient:
    """A list of scalars interpolated over a slice's layers (t in [0, 1])."""

    values: tuple[Scalar, ...]


@dataclass(frozen=True)
class Conditional:
    """`{filter: F, value: V}`: V applies to tensors whose name contains F (None or "*" = all)."""

    filter: str | None
    value: Scalar | Gradient


@dataclass(frozen=True)
class CondList:
    """Conditionals tried in order; the first whose filter matches wins."""

    items: tuple[Conditional, ...]


Setting = Scalar | Gradient | CondList


@dataclass(frozen=True)
class ParamSpec:
    """A parameter a method declares: its type, scope and default (None + required = no default)."""

    name: str
    kind: Kind
    scope: Scope
    default: Scalar | None = None
    required: bool = False
    nullable: bool = False  # `passthrough.scale` may be left unset
    bounds: tuple[float, float] | None = None  # inclusive range a number must lie in (a share, a fraction)


class ParamTypeError(ValueError):
    """A value does not have the declared type; the message says what was expected."""


def coerce(value: object, kind: Kind) -> Scalar:
    """Validate `value` as `kind` in pydantic's lax mode ("1e-5" -> 1e-5, 0/1 -> False/True)."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ParamTypeError(f"expected true or false, got {value!r}")
    if kind == "str":
        if isinstance(value, str):
            return value
        raise ParamTypeError(f"expected a string, got {value!r}")
    num = _number(value)
    if num is None or not math.isfinite(num):
        raise ParamTypeError(f"expected a number, got {_short(value)}")
    if kind == "int":
        if float(num) != int(num):
            raise ParamTypeError(f"expected a whole number, got {_short(value)}")
        return int(num)
    if abs(num) > FLOAT32_MAX:  # the merge's arithmetic is float32: torch refused it mid-run, after a traceback
        raise ParamTypeError(f"expected a number of float32's range (at most {FLOAT32_MAX:.7g} in magnitude), "
                             f"got {_short(value)}")
    return float(num)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...({len(text)} characters)"


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
    except (ValueError, OverflowError):  # "abc", or an integer of hundreds of digits
        return None
    return None


def filter_matches(flt: str | None, tensor_name: str) -> bool:
    """A filter matches if null, "*", or a plain case-sensitive substring of the name."""
    return flt is None or flt == "*" or flt in tensor_name


def evaluate(setting: Setting, tensor_name: str, t: float, kind: Kind) -> Scalar | None:
    """Evaluate a setting for one tensor at gradient position t; None = no value here.

    Example:
        >>> evaluate(Gradient((0.0, 1.0)), "model.layers.3.mlp.up_proj.weight", 0.25, "float")
        0.25
    """
    return evaluate_traced(setting, tensor_name, t, kind)[0]


def evaluate_traced(setting: Setting, tensor_name: str, t: float, kind: Kind) -> tuple[Scalar | None, str]:
    """Like `evaluate`, with how the value was found: the filter that matched, the gradient used."""
    if isinstance(setting, CondList):
        for i, cond in enumerate(setting.items):
            if filter_matches(cond.filter, tensor_name):
                value, how = evaluate_traced(cond.value, tensor_name, t, kind)
                which = "no filter" if cond.filter in (None, "*") else f"filter {cond.filter!r} matches"
                return value, f"[{i}] ({which})" + (f", {how}" if how else "")
        return None, f"no filter of {len(setting.items)} matches"
    if isinstance(setting, Gradient):
        return interpolate(setting.values, t, kind), f"gradient {list(setting.values)} at t={t:.6g}"
    return coerce(setting, kind), ""


def interpolate(values: tuple[Scalar, ...], t: float, kind: Kind) -> Scalar | None:
    """A gradient at t: piecewise-linear for numbers, step selection for bools/strings."""
    if not values:
        return None
    typed = [coerce(v, kind) for v in values]
    n = len(typed)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in typed):
        s = t * (n - 1)
        i0 = min(n - 1, max(0, math.floor(s)))
        i1 = min(n - 1, i0 + 1)
        f = s - i0
        return coerce((1 - f) * float(typed[i0]) + f * float(typed[i1]), kind)
    return typed[min(n - 1, max(0, math.floor(t * (n - 1))))]
