"""Conventions of the tree: no stale pointers, one legend of shape suffixes, the suite
reports its slow tests. (The import layers, circles and module sizes: test_structure.py.)"""

import configparser
import re
import tokenize
from pathlib import Path


import megatron_mohge.routing as routing

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_mohge"


def _py_files(*dirs):
    return sorted(p for d in dirs for p in d.rglob("*.py") if ".venv" not in p.parts)


def test_no_pointer_to_a_missing_design_note_and_no_gpu_claim():
    """Comments must point at where a formula lives; "verified on a GPU" only if negated."""
    bad = []
    for path in _py_files(PACKAGE, ROOT / "tests"):
        if path == Path(__file__):
            continue
        text = path.read_text()
        if re.search(r"design note", text, re.IGNORECASE):
            bad.append(f"{path}: design note")
        for m in re.finditer(r"(\w+\s+)?verified on a GPU", text, re.IGNORECASE):
            if not (m.group(1) or "").strip().lower().endswith("not"):
                bad.append(f"{path}: {m.group(0)!r}")
    assert not bad, bad


def _legend():
    """Suffix letters of the table in ``megatron_mohge.routing``'s docstring."""
    rows = re.findall(r"^(\S+)\s{2,}\S", routing.__doc__, re.MULTILINE)
    return {r for r in rows if r not in ("suffix",) and not r.startswith("=")}


def test_every_shape_suffix_is_in_the_one_legend():
    legend = _legend()
    assert {"T", "D", "G", "E", "K", "N", "W", "1"} <= legend
    suffix = re.compile(r"[a-z0-9]_([A-Z][A-Z0-9]*)$")
    missing = {}
    for path in _py_files(PACKAGE):
        with open(path, "rb") as f:
            for tok in tokenize.tokenize(f.readline):
                # ALL_CAPS constants (FP8_ALIGN) are not shape-suffixed tensors
                m = (suffix.search(tok.string)
                     if tok.type == tokenize.NAME and not tok.string.isupper() else None)
                if m and not set(m.group(1)) <= legend:
                    missing.setdefault(tok.string, str(path))
    assert not missing, missing


def test_default_suite_reports_slow_tests():
    ini = configparser.ConfigParser()
    ini.read(ROOT / "pytest.ini")
    assert "--durations" in ini["pytest"]["addopts"]
