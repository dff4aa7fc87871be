"""Validators of spec fields: one leaf module that every component's checks use.

Each raises ``ValueError`` with a message that starts with the field's name, so that the
config layer can prefix the key (``model.hidden must be >= 1, got 0``).
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence


def check_int(
    name: str, value: object, minimum: int | None = None, maximum: int | None = None
) -> int:
    """Validate a spec field that must be an integer (not a bool) in ``[minimum, maximum]``.

    Parameters
    ----------
    name : str
        The field's name; every message starts with it (the config layer prefixes the group).
    value : object
        The value to check.
    minimum : int, optional
        Smallest allowed value.
    maximum : int, optional
        Largest allowed value.

    Returns
    -------
    int
        ``value`` as a Python int.

    Raises
    ------
    ValueError
        ``"NAME must be an int ..., got VALUE"`` for a wrong type or a value out of range.
    """
    bound = " and".join(
        f" {op} {limit}" for op, limit in ((">=", minimum), ("<=", maximum)) if limit is not None
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int{bound}, got {value!r}")
    number = int(value)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be{bound}, got {number}")
    return number


def check_number(
    name: str,
    value: object,
    *,
    above: float | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
) -> float:
    """Validate a spec field that must be a finite real number (not a bool).

    Parameters
    ----------
    name : str
        The field's name; every message starts with it.
    value : object
        The value to check.
    above : float, optional
        Exclusive lower bound.
    minimum : float, optional
        Inclusive lower bound.
    maximum : float, optional
        Inclusive upper bound.

    Returns
    -------
    float
        ``value`` as a Python float.

    Raises
    ------
    ValueError
        ``"NAME must be ..., got VALUE"`` for a wrong type, NaN, infinity or a value out of
        range.
    """
    bound = " and".join(
        f" {op} {limit:g}"
        for op, limit in ((">", above), (">=", minimum), ("<=", maximum))
        if limit is not None
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number{bound}, got {number}")
    if (
        (above is not None and not number > above)
        or (minimum is not None and number < minimum)
        or (maximum is not None and number > maximum)
    ):
        raise ValueError(f"{name} must be{bound}, got {value}")
    return number


def check_node(name: str, value: object, optional: bool = False) -> None:
    """Validate a spec field that holds a component config (a mapping with ``_target_``).

    Parameters
    ----------
    name : str
        The field's name; the message starts with it.
    value : object
        The value to check.
    optional : bool
        Whether ``None`` is allowed.

    Raises
    ------
    ValueError
        ``"NAME must be a config with a _target_, got VALUE"``.
    """
    if optional and value is None:
        return
    if not isinstance(value, Mapping) or not isinstance(value.get("_target_"), str):
        raise ValueError(f"{name} must be a config with a _target_, got {value!r}")


def check_sha256_text(name: str, value: object) -> str:
    """A SHA-256 as 64 hex digits, returned in lower case."""
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", value):
        raise ValueError(f"{name} must be a SHA-256 (64 hex digits), got {value!r}")
    return value.lower()


def check_flag(name: str, value: object) -> None:
    """A bool (``true`` or ``false`` in YAML), nothing else."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def check_path_text(name: str, value: object) -> str:
    """A non-empty path (text or ``os.PathLike``), returned as text."""
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ValueError(f"{name} must be a folder path, got {value!r}")
    return str(value)


def check_int_list(name: str, value: object, minimum: int = 0) -> list[int]:
    """A list of ints ``>= minimum`` (messages name the field)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list of ints >= {minimum}, got {value!r}")
    return [check_int(name, v, minimum) for v in value]


def check_fraction_list(name: str, value: object) -> list[float]:
    """A non-empty list of fractions in (0, 1]."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{name} must be a non-empty list of fractions in (0, 1], got {value!r}")
    out = []
    for v in value:
        ok = not isinstance(v, bool) and isinstance(v, int | float) and 0.0 < float(v) <= 1.0
        if not ok:
            raise ValueError(f"{name} must hold fractions in (0, 1], got {v!r}")
        out.append(float(v))
    return out
