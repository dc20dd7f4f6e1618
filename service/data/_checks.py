"""Small argument checks shared by the data modules."""

from __future__ import annotations

import operator

from service.errors import ConfigError


def non_negative_int(value: object, field: str) -> int:
    """Return ``value`` as an ``int`` if it is an integer ``>= 0``.

    Args:
        value: The value to check; ``bool`` is rejected, numpy integers are accepted.
        field: Name reported in the error.

    Returns:
        The value as a Python ``int``.

    Raises:
        ConfigError: The value is not an integer or is negative.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{field} must be an integer, got {value!r}", field=field)
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{field} must be an integer, got {value!r}", field=field) from None
    if v < 0:
        raise ConfigError(f"{field} must not be negative, got {value!r}", field=field)
    return v


def positive_int(value: object, field: str) -> int:
    """Return ``value`` as an ``int`` if it is an integer ``>= 1``.

    Args:
        value: The value to check.
        field: Name reported in the error.

    Returns:
        The value as a Python ``int``.

    Raises:
        ConfigError: The value is not an integer or is below 1.
    """
    v = non_negative_int(value, field)
    if v < 1:
        raise ConfigError(f"{field} must be at least 1, got {value!r}", field=field)
    return v
