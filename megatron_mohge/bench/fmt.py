"""Text formatting of benchmark figures for the markdown tables (a missing value is a dash)."""

from __future__ import annotations

import math
from typing import Any, Optional

from megatron_mohge.util import numbers

DASH = "—"


def as_number(v: Any) -> Optional[float]:
    """``v`` as a finite-or-nan float, or None when missing / not a number."""
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def fmt_count(v: Any) -> str:
    """Parameter counts: 1.23B / 45.6M / 7.89K / 512."""
    x = as_number(v)
    if x is None:
        return DASH
    if math.isnan(x):
        return "nan"
    return numbers.fmt_count(x, "report")


def fmt_float(v: Any, digits: int = 3, suffix: str = "") -> str:
    x = as_number(v)
    if x is None:
        return DASH
    return f"{x:.{digits}f}{suffix}"


def fmt_delta(value: Any, base: Any) -> str:
    """Relative change ``value / base - 1`` in percent with sign, e.g. ``-18.8%``."""
    v, b = as_number(value), as_number(base)
    if v is None or b is None or b == 0 or math.isnan(v) or math.isnan(b):
        return ""
    return f"{(v / b - 1.0) * 100.0:+.1f}%"


def with_delta(text: str, value: Any, base: Any, is_base: bool) -> str:
    if text == DASH:
        return text
    if is_base:
        return f"{text} (base)"
    d = fmt_delta(value, base)
    return f"{text} ({d})" if d else text


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """The cells of :func:`md_table` as fixed-width text for a terminal: the first column
    left-aligned, the others right-aligned, two spaces between columns, a rule under the
    header."""
    widths = [max(map(len, col)) for col in zip(header, *rows)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    head = line(header)
    return "\n".join([head, "-" * len(head), *map(line, rows)])
