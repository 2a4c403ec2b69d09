"""The configuration reference (docs/configuration.md) against the dataclasses: every field of MoHGEConfig
(nested sections included) has a row, and every row's default is the field's default."""

import dataclasses
import re
from pathlib import Path

import yaml

from megatron_mohge.config import MoHGEConfig

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def reference_rows() -> dict:
    text = REFERENCE.read_text()
    section = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([\w.]+)` \|.*\| `?([^`|]+)`? \|\s*$", line)
        if m:
            rows[m.group(1)] = m.group(2).strip()
    return rows


def dataclass_defaults(cls, prefix="") -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[prefix + f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            if dataclasses.is_dataclass(value):
                out.update(dataclass_defaults(type(value), f"{prefix}{f.name}."))
            else:
                out[prefix + f.name] = value
        else:
            out[prefix + f.name] = "required"
    return out


def test_every_field_has_a_row_with_its_default():
    rows, fields = reference_rows(), dataclass_defaults(MoHGEConfig)
    assert set(rows) == set(fields), (sorted(set(fields) - set(rows)), sorted(set(rows) - set(fields)))
    for name, default in fields.items():
        shown = rows[name]
        if default == "required":
            assert shown == "required", name
        else:
            assert parse(shown) == default, f"{name}: docs/configuration.md says {shown}, code {default!r}"


def parse(shown: str):
    """A default as the table writes it (YAML, with 1e-5 read as a number as Python would)."""
    try:
        return float(shown) if re.fullmatch(r"[-+]?[\d.]+(e[-+]?\d+)?", shown) else yaml.safe_load(shown)
    except ValueError:
        return yaml.safe_load(shown)
