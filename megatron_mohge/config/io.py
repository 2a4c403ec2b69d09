"""YAML in and out for the config dataclasses: the loader our files are read with, and
``to_dict`` / ``to_yaml``."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from megatron_mohge.config.errors import ConfigError


class _YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` / ``5E+4`` as floats.

    PyYAML implements YAML 1.1, whose float pattern needs a dot (``1.0e-3``), so ``1e-3``
    would load as the *string* "1e-3"; YAML 1.2 and Python both read it as a number, and so
    do our configs wherever a float is expected.
    """


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """Parse YAML text as our config files are parsed (safe, scientific notation = float)."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_file(path: Union[str, Path], what: str) -> Any:
    """Parse YAML file ``path``; ``what`` names it in errors (e.g. "run config")."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{what}: file not found: {path}")
    raw = p.read_bytes()
    if b"\x00" in raw:
        raise ConfigError(f"{what} {path}: not a text file (it contains NUL bytes); pass the "
                          f"YAML config file")
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 BOM (some Windows editors) is fine
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path}: not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} "
                          f"at offset {exc.start}); save the file as UTF-8") from None
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path}: invalid YAML: {exc}") from exc


class YamlDataclass:
    """``to_dict`` / ``to_yaml`` for the config dataclasses (field order kept)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: Optional[Union[str, Path]] = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text
