"""YAML in and out for the config dataclasses: the loader our files are read with, the one
builder from a mapping (``build_dataclass``), ``key.sub=value`` overrides and ``to_dict`` /
``to_yaml``."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import re
import typing
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


# ---------------------------------------------------------------------- mapping -> dataclass
@functools.lru_cache(maxsize=None)
def nested_dataclasses(cls: type) -> dict[str, tuple[type, bool]]:
    """Field name -> (dataclass type, may be None) for each field of ``cls`` holding a config
    section (``X`` or ``Optional[X]``), from the type hints: no hand-kept table."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint)
        sub = hint if dataclasses.is_dataclass(hint) else next(
            (a for a in args if dataclasses.is_dataclass(a)), None)
        if sub is not None:
            out[f.name] = (sub, type(None) in args)
    return out


@functools.lru_cache(maxsize=None)
def field_aliases(cls: type) -> dict[str, str]:
    """Former key -> field name, from ``field(metadata={"aliases": (...)})``: a renamed key
    keeps loading (old files, old checkpoints' run.yaml)."""
    return {old: f.name for f in dataclasses.fields(cls) for old in f.metadata.get("aliases", ())}


def _where(cls: type, path: str) -> str:
    return f"{path} ({cls.__name__})" if path else cls.__name__


def build_dataclass(cls: type, data: Any, path: str = ""):
    """Construct config dataclass ``cls`` from mapping ``data``, sections recursively.

    ``path`` is where ``data`` sits in the file (``"moe.mohge"``; ``""`` at the top); every
    error names the full key path and the class. ``cls.normalize_mapping(data)``, where
    defined, rewrites the raw mapping first (``MoHGEConfig``: a file's ``mohge:`` wrapper).
    A ``ConfigError`` from the constructor (its ``__post_init__`` validation) is prefixed
    with ``path``."""
    if isinstance(data, dict) and hasattr(cls, "normalize_mapping"):
        data = cls.normalize_mapping(data)
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(cls, path)}: expected a mapping, got "
                          f"{type(data).__name__} {data!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    aliases, nested = field_aliases(cls), nested_dataclasses(cls)
    prefix = f"{path}." if path else ""
    kwargs = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown key in {cls.__name__}.{hint} "
                              f"Valid keys: {', '.join(names)}.")
        if name in kwargs:
            raise ConfigError(f"{prefix}{key}: {prefix}{name} is given too ({key} is its former "
                              f"name); keep one.")
        sub, optional = nested.get(name, (None, False))
        if sub is not None and not (value is None and optional):
            value = build_dataclass(sub, value, prefix + name)
        kwargs[name] = value
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{_where(cls, path)}: missing required field(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if not path:
            raise
        raise ConfigError(f"{path}: {exc}") from exc


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["train.iters=50", "moe.mohge.topk=4"]`` -> a new nested dict (values parsed as YAML)."""
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value (e.g. train.iters=50)")
        key, _, raw = item.partition("=")
        try:
            value = load_yaml(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out
