"""Checking notebook parameters.

papermill hands a notebook whatever the command line or a YAML file produced: ``-p eta 1e-3`` arrives
as a float, ``-p layer 04`` as the integer 4, ``-p model_tag nan`` as a float NaN, and a YAML
``1e-3`` (no dot) as the string ``"1e-3"``. Each notebook passes its parameters through
:func:`checked` right after the ``parameters`` cell, so a value either becomes the intended type or
the run stops with a message that names the parameter, the value and what to pass instead.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

_INTEGER = re.compile(r"^[+-]?\d+$")
_NONE_WORDS = {"", "none", "null"}
_TRUE_WORDS = {"true", "yes", "1"}
_FALSE_WORDS = {"false", "no", "0"}
KINDS = ("int", "float", "str", "bool", "path", "int_list", "float_list", "str_list")


class ParameterError(ValueError):
    """A notebook parameter has a value that cannot be used."""


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ParameterError(f"Parameter {name} must be an integer, got {_describe(value)}.")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INTEGER.match(value.strip()):
        return int(value.strip())
    raise ParameterError(f"Parameter {name} must be an integer, got {_describe(value)}.")


def _as_float(name: str, value: Any, allow_nonfinite: bool) -> float:
    if isinstance(value, bool):
        raise ParameterError(f"Parameter {name} must be a number, got {_describe(value)}.")
    number: float | None = None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None:
        raise ParameterError(f"Parameter {name} must be a number such as 1e-3, got {_describe(value)}.")
    if not allow_nonfinite and not math.isfinite(number):
        raise ParameterError(f"Parameter {name} must be a finite number, got {_describe(value)}.")
    return number


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        # papermill's -p parses unquoted values: `-p model_tag nan` arrives as float('nan').
        raise ParameterError(
            f"Parameter {name} must be text, got {_describe(value)}. With papermill, pass text with "
            f"-r {name} VALUE (raw) or quote it in the YAML parameters file."
        )
    text = value.strip()
    if not text:
        raise ParameterError(f"Parameter {name} must not be empty.")
    return text


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise ParameterError(f"Parameter {name} must be true or false, got {_describe(value)}.")


def _list_items(value: Any) -> Sequence[Any]:
    if isinstance(value, str):
        return [item for item in re.split(r"[,\s]+", value.strip()) if item]
    if isinstance(value, (list, tuple)):
        return value
    return [value]


def _as_int_list(name: str, value: Any) -> list[int]:
    return [_as_int(f"{name}[{index}]", item) for index, item in enumerate(_list_items(value))]


def _as_float_list(name: str, value: Any, allow_nonfinite: bool) -> list[float]:
    return [_as_float(f"{name}[{index}]", item, allow_nonfinite) for index, item in enumerate(_list_items(value))]


def _as_str_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        items: Sequence[Any] = [item for item in (part.strip() for part in value.split(",")) if item]
    elif isinstance(value, (list, tuple)):
        items = value
    else:
        raise ParameterError(f"Parameter {name} must be a list of strings, got {_describe(value)}.")
    return [_as_str(f"{name}[{index}]", item) for index, item in enumerate(items)]


def checked(
    name: str,
    value: Any,
    kind: str,
    *,
    optional: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: Sequence[Any] | None = None,
    allow_nonfinite: bool = False,
) -> Any:
    """Return ``value`` converted to ``kind``, or raise :class:`ParameterError` naming ``name``.

    ``kind`` is one of ``int``, ``float``, ``str``, ``bool``, ``path`` (a string, returned as
    :class:`~pathlib.Path`), ``int_list``, ``float_list`` and ``str_list`` (a list, or a comma-separated string).
    With ``optional=True``, ``None`` and the strings ``""``, ``"none"`` and ``"null"`` give ``None``.
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown parameter kind {kind!r}; expected one of {', '.join(KINDS)}.")
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
        if optional:
            return None
        raise ParameterError(f"Parameter {name} is required, got {_describe(value)}.")

    if kind == "int":
        result: Any = _as_int(name, value)
    elif kind == "float":
        result = _as_float(name, value, allow_nonfinite)
    elif kind == "bool":
        result = _as_bool(name, value)
    elif kind == "int_list":
        result = _as_int_list(name, value)
    elif kind == "float_list":
        result = _as_float_list(name, value, allow_nonfinite)
    elif kind == "str_list":
        result = _as_str_list(name, value)
    else:
        result = _as_str(name, value)
        if kind == "path":
            result = Path(result).expanduser()

    values = result if kind in ("int_list", "float_list", "str_list") else [result]
    for item in values:
        if minimum is not None and item < minimum:
            raise ParameterError(f"Parameter {name} must be at least {minimum}, got {_describe(value)}.")
        if maximum is not None and item > maximum:
            raise ParameterError(f"Parameter {name} must be at most {maximum}, got {_describe(value)}.")
        if choices is not None and item not in choices:
            raise ParameterError(
                f"Parameter {name} must be one of {', '.join(map(str, choices))}, got {_describe(value)}."
            )
    return result


def check_all(namespace: dict[str, Any], spec: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Check every parameter named in ``spec`` (name -> (kind, options for :func:`checked`)).

    Returns the converted values; a notebook applies them with ``globals().update(...)``. A name
    missing from ``namespace`` is an error, so a renamed parameter cannot go unnoticed.
    """
    missing = [name for name in spec if name not in namespace]
    if missing:
        raise ParameterError(f"Parameters {missing} are not defined; the parameters cell must assign them.")
    return {name: checked(name, namespace[name], kind, **options) for name, (kind, options) in spec.items()}
