"""docs/flags.md against the code: each row's run-file key changes exactly the Megatron-LM flags
the row lists (``integration.flags.megatron_lm_flags``), the keys of the second table change
none, every run-file key and every rendered flag is in the document, and the ``--mohge-*``
table is what ``add_mohge_args`` defines (field from ``CLI_OVERRIDES``, values)."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
from packaging.version import Version

from megatron_mohge.config.run import RunConfig
from megatron_mohge.integration.flags import megatron_lm_flags
from megatron_mohge.integration.megatron_lm.args import CLI_OVERRIDES, add_mohge_args

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "flags.md"
CONFIGS = ROOT / "examples" / "configs"
MOHGE, STOCK = "small_mohge_1node.yaml", "small_moe_1node.yaml"
REFERENCE = [MOHGE, STOCK, "paper_3b_mohge.yaml", "paper_3b_moe.yaml"]
# keys that pick which rows apply, or that map to no flag by rule (docs/flags.md says which)
NOT_IN_TABLES = {"model.vocab_size", "moe.kind", "moe.router", "moe.noisy_gating", "moe.mohge"}


def _section(title: str) -> str:
    return DOC.read_text().split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _rows(title: str) -> list[list[str]]:
    rows = []
    for line in _section(title).splitlines():
        if line.startswith("| `"):
            rows.append([c.strip() for c in line.strip().strip("|").split(" | ")])
    return rows


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _flags(name: str, overrides: list[str], tmp_path: Path) -> dict:
    run = RunConfig.from_yaml(CONFIGS / name, [f"output_dir={tmp_path}", *overrides])
    out, key = {}, None
    for tok in megatron_lm_flags(run, mohge_config_path=tmp_path / "layer.yaml",
                                 megatron_lm_version=Version("0.19.0"),
                                 optim_fully_reshardable=True):
        if tok.startswith("--"):
            key = tok
            out[key] = []
        else:
            out[key].append(tok)
    return out


def _changed(a: dict, b: dict) -> set:
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k)}


def _keyed_rows() -> dict:
    """run-file key -> (base run file, listed flags, overrides)."""
    out = {}
    for key_cell, flags_cell, checked in _rows("Keys that become flags"):
        key = _ticked(key_cell)[0]
        base = STOCK if "*stock*" in key_cell else MOHGE
        main = re.sub(r"\([^)]*\)", "", flags_cell)  # parentheses: notes, other tags
        flags = {f for span in _ticked(main) for f in re.findall(r"--[a-z0-9-]+", span)}
        out[key] = (base, flags, _ticked(checked)[0].split())
    return out


@pytest.fixture(autouse=True)
def _no_checkout(monkeypatch):
    monkeypatch.delenv("MEGATRON_LM_DIR", raising=False)


def test_each_key_changes_exactly_its_flags(tmp_path):
    rows = _keyed_rows()
    assert len(rows) > 50
    base = {name: _flags(name, [], tmp_path) for name in (MOHGE, STOCK)}
    wrong = []
    for key, (name, listed, overrides) in rows.items():
        changed = _changed(base[name], _flags(name, overrides, tmp_path))
        if key == "launch.extra_args":  # verbatim: the row lists none, the override names it
            listed = {t.strip("[]") for t in overrides[0].split("=", 1)[1].split(",")}
        # flags of the other keys the same overrides set may change as well
        others = set().union(*(rows[o.split("=")[0]][1] for o in overrides[1:]
                               if o.split("=")[0] in rows))
        if not listed <= changed or not changed <= listed | others:
            wrong.append(f"{key}: listed {sorted(listed)}, changed {sorted(changed)}")
    assert not wrong, "\n".join(wrong)


def test_keys_without_a_flag_change_none(tmp_path):
    base = _flags(MOHGE, [], tmp_path)
    wrong = {}
    for key_cell, _, checked in _rows("Keys with no Megatron-LM flag"):
        changed = _changed(base, _flags(MOHGE, _ticked(checked)[0].split(), tmp_path))
        if changed:
            wrong[_ticked(key_cell)[0]] = sorted(changed)
    assert not wrong


def _run_keys(run) -> set:
    keys = set()
    for f in dataclasses.fields(run):
        value = getattr(run, f.name)
        if dataclasses.is_dataclass(value) and not hasattr(value, "widths"):
            keys |= {f"{f.name}.{g.name}" for g in dataclasses.fields(value)}
        else:
            keys.add(f.name)
    return keys


def test_every_run_file_key_is_in_a_table(tmp_path):
    run = RunConfig.from_yaml(CONFIGS / MOHGE, [f"output_dir={tmp_path}"])
    documented = set(_keyed_rows()) | {_ticked(r[0])[0] for r in _rows("Keys with no Megatron-LM flag")}
    keys = {k for k in _run_keys(run) if not k.startswith("moe.mohge.")}
    assert keys - documented - NOT_IN_TABLES == set()


def test_every_rendered_flag_is_documented(tmp_path):
    text = _section("Keys that become flags")
    documented = set(re.findall(r"(--[a-z0-9-]+)", text))
    for name in REFERENCE:
        missing = set(_flags(name, [], tmp_path)) - documented
        assert not missing, (name, sorted(missing))


def test_mohge_flags_table_is_the_override_mapping():
    rows = {_ticked(flag)[0]: (_ticked(field)[0], _ticked(values) or [values.strip()])
            for flag, field, values in _rows("`--mohge-*` flags (Megatron-LM side)")}
    parser = add_mohge_args(argparse.ArgumentParser())
    code = {}
    for action in parser._actions:
        flag = next((o for o in action.option_strings if o.startswith("--mohge-")), None)
        if flag is None or action.dest not in CLI_OVERRIDES:
            continue  # --mohge-config, the FLOPs flags: no layer field
        section, name = CLI_OVERRIDES[action.dest]
        values = list(action.choices) if action.choices else [action.type.__name__]
        code[flag] = (name if section is None else f"{section}.{name}", values)
    assert rows == code
