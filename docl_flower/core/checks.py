"""Validators of spec fields: one leaf module that every component's checks use.

Each raises ``ValueError`` with a message that starts with the field's name, so that the
config layer can prefix the key (``model.hidden must be >= 1, got 0``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping


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
