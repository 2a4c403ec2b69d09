"""``ConfigError`` and the field validators every config module uses (a leaf module).

Each validator raises a one-line ``ConfigError`` that names the field (``train.lr``) and
what it expected.
"""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """Invalid MoHGE configuration; the message names the field and the fix."""


def expect_int(name: str, value: Any, minimum: int) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {value}")


def parse_split(split: Any, name: str = "split") -> list[float]:
    """``"949,50,1"`` -> normalised train/validation/test weights (Megatron-LM's rule: one to
    three comma-separated non-negative weights, missing ones 0); train and validation must be
    positive. ConfigError naming ``name`` otherwise."""
    parts = [p.strip() for p in str(split).split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not weights or len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"{name} {split!r} is not valid: use up to three comma-separated "
                          f"non-negative weights for train,validation,test, e.g. '949,50,1'")
    weights += [0.0] * (3 - len(weights))
    if weights[0] <= 0 or weights[1] <= 0:
        which = "train" if weights[0] <= 0 else "validation"
        raise ConfigError(f"{name} {split!r} gives the {which} split no share of the data; "
                          f"both train and validation need a positive weight, e.g. '949,50,1'")
    total = sum(weights)
    return [w / total for w in weights]


def expect_number(name: str, value: Any, minimum: float) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is a number >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {value}")


def expect_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true or false, got {value!r}")


def expect_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
