"""patches/: one Megatron-LM patch per supported tag, apply.sh, and (with $MEGATRON_LM_DIR) a
real check.

Always on: each patch is a well-formed unified diff touching only the three expected files,
every hunk guarded and delegating to megatron_mohge.integration; apply.sh picks the patch by
tag and refuses other versions. With ``MEGATRON_LM_DIR`` pointing at a Megatron-LM checkout of
a supported tag (core_v0.16.1 or core_v0.19.0; exported trees work too): ``git apply --check``
there with that tag's patch (and not the others'), and apply / re-apply / revert with apply.sh
on a copy of the three files.
"""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mohge.compat.versions import (
    MEGATRON_LM_PATCHES,
    SUPPORTED_MEGATRON_LM_TAGS,
    megatron_lm_checkout_version,
)

ROOT = Path(__file__).resolve().parents[1]
PATCHES = {tag: ROOT / "patches" / name for tag, name in MEGATRON_LM_PATCHES.items()}
APPLY = ROOT / "patches" / "apply.sh"
EXPECTED_FILES = {"pretrain_gpt.py", "gpt_builders.py", "megatron/training/training.py"}
HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
#: What makes an added hunk a no-op without MoHGE (each hunk must contain one).
GUARDS = ('getattr(args, "mohge_config", None)', "mohge_lm is not None", "MOHGE_PATCH",
          "except ImportError")


def parse_patch(text):
    """{path: [(old_start, old_len, new_start, new_len, lines)]}; asserts hunk line counts."""
    files, current, lines = {}, None, text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("diff --git "):
            a, b = line.split()[2:4]
            assert a[2:] == b[2:], f"renames are not expected: {line}"
            current = b[2:]
            files[current] = []
        elif line.startswith("@@"):
            m = HUNK.match(line)
            assert m, f"bad hunk header: {line}"
            o0, ol, n0, nl = (int(x) if x is not None else 1 for x in m.groups())
            body, old, new = [], 0, 0
            i += 1
            while i < len(lines) and (old < ol or new < nl):
                tag = lines[i][:1]
                assert tag in (" ", "+", "-", ""), f"bad hunk line: {lines[i]!r}"
                old += tag in (" ", "-", "")
                new += tag in (" ", "+", "")
                body.append(lines[i])
                i += 1
            assert (old, new) == (ol, nl), f"{current}: hunk {line} counts {old},{new}"
            files[current].append((o0, ol, n0, nl, body))
            continue
        i += 1
    return files


def defined_names(module: str) -> set:
    """Top-level names a megatron_mohge module defines or imports (read, not imported: the
    core_v0.18+ module imports megatron.training)."""
    path = ROOT / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    if path.name == "__init__.py":  # submodules
        names.update(p.stem for p in path.parent.glob("*.py"))
        names.update(p.parent.name for p in path.parent.glob("*/__init__.py"))
    return names


def test_one_patch_per_supported_tag():
    on_disk = {p.name for p in (ROOT / "patches").glob("megatron-lm-*.patch")}
    assert on_disk == set(MEGATRON_LM_PATCHES.values())
    assert set(MEGATRON_LM_PATCHES) == set(SUPPORTED_MEGATRON_LM_TAGS)
    assert {"core_v0.16.1", "core_v0.19.0"} <= set(SUPPORTED_MEGATRON_LM_TAGS)


@pytest.mark.parametrize("tag", SUPPORTED_MEGATRON_LM_TAGS)
def test_patch_is_well_formed_and_minimal(tag):
    files = parse_patch(PATCHES[tag].read_text())
    assert set(files) == EXPECTED_FILES
    hunks = [body for hs in files.values() for *_, body in hs]
    added = [ln[1:] for body in hunks for ln in body if ln.startswith("+")]
    removed = [ln for body in hunks for ln in body if ln.startswith("-")]
    assert 10 < len(added) <= 60 and len(removed) <= 5  # a few dozen lines
    code = "\n".join(added)
    for name in ("add_mohge_args", "mohge_gpt_builder", "mohge_track_names",
                 "mohge_flops_correction", "update_training_progress"):
        assert name in code, name
    assert f'MOHGE_PATCH = "megatron-mohge/{tag}"' in code
    # every hunk is guarded: nothing changes without --mohge-config / megatron-mohge
    for body in hunks:
        new = "\n".join(ln[1:] for ln in body if ln.startswith("+"))
        assert not new or any(g in new for g in GUARDS), new
    # the functions the patch calls exist
    calls = [("megatron_mohge.integration.megatron_lm", n)
             for n in re.findall(r"mohge_lm\.(\w+)", code)]
    calls += re.findall(r"from (megatron_mohge[\w.]*) import (\w+)", code)
    assert calls
    for module, name in calls:
        assert name in defined_names(module), f"{module}.{name}"


def fake_checkout(root: Path, version=(0, 16, 1)):
    for f in EXPECTED_FILES:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("# not Megatron-LM\n")
    info = root / "megatron" / "core" / "package_info.py"
    info.parent.mkdir(parents=True, exist_ok=True)
    info.write_text(f"MAJOR = {version[0]}\nMINOR = {version[1]}\nPATCH = {version[2]}\n"
                    "PRE_RELEASE = ''\n")
    return root


def apply_sh(*args):
    return subprocess.run(["bash", str(APPLY), *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def test_apply_sh_refuses_wrong_versions(tmp_path):
    r = apply_sh(tmp_path)
    assert r.returncode != 0 and "does not look like a Megatron-LM checkout" in r.stderr
    other = fake_checkout(tmp_path / "mlm", (0, 18, 0))
    r = apply_sh(other)
    assert r.returncode == 1 and "'0.18.0'" in r.stderr and "--force" in r.stderr
    assert "core_v0.16.1, core_v0.19.0" in r.stderr  # names the supported tags
    r = apply_sh("--force", "--check", other)  # version check skipped; the files do not match
    assert r.returncode == 1 and "skipping the version check" in r.stdout
    assert "using the core_v0.19.0 patch" in r.stdout  # no 0.18 line: the newest
    assert "does not apply" in r.stderr
    r = apply_sh("--tag", "core_v0.17.1", other)
    assert r.returncode == 1 and "no patch for core_v0.17.1" in r.stderr
    assert apply_sh().returncode == 2 and apply_sh("--bogus", other).returncode == 2
    assert apply_sh("--tag").returncode == 2


@pytest.mark.parametrize("version,tag", [((0, 16, 1), "core_v0.16.1"),
                                         ((0, 19, 1), "core_v0.19.0"),
                                         ((0, 19, 0), "core_v0.19.0")])
def test_apply_sh_picks_the_patch_by_version_line(tmp_path, version, tag):
    """An exported tree: the patch of its package_info.py's MAJOR.MINOR line (core_v0.19.0's
    own version file says 0.19.1); the fake files then do not match it."""
    r = apply_sh("--check", fake_checkout(tmp_path / "mlm", version))
    assert f"is Megatron-LM {tag} (package_info.py" in r.stdout, r.stdout + r.stderr
    assert r.returncode == 1 and "does not apply" in r.stderr


def test_checkout_version_and_pretrain_style(tmp_path):
    from megatron_mohge.compat.versions import (
        PRETRAIN_STYLE_ARGS,
        PRETRAIN_STYLE_CONFIG_CONTAINER,
        megatron_lm_pretrain_style,
    )

    assert str(megatron_lm_checkout_version(fake_checkout(tmp_path / "a"))) == "0.16.1"
    assert megatron_lm_checkout_version(tmp_path / "missing") is None

    def old(provider, model_provider, model_type, forward_step, process_non_loss_data_func=None,
            extra_args_provider=None, args_defaults={}): ...

    def new(cfg_container, train_valid_test_dataset_provider, model_type, forward_step_func,
            model_provider=None, process_non_loss_data_func=None): ...

    def other(provider, model_type): ...

    assert megatron_lm_pretrain_style(old) == PRETRAIN_STYLE_ARGS
    assert megatron_lm_pretrain_style(new) == PRETRAIN_STYLE_CONFIG_CONTAINER
    assert megatron_lm_pretrain_style(other) == "unknown"


def git_repo(root: Path, tag: str) -> Path:
    git = ["git", "-C", str(root), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    subprocess.run([*git, "tag", tag], check=True)
    return root


def test_apply_sh_refuses_other_git_tag(tmp_path):
    repo = git_repo(fake_checkout(tmp_path / "mlm"), "core_v0.17.1")
    r = apply_sh("--check", repo)
    assert r.returncode == 1 and "is at core_v0.17.1, not a supported tag" in r.stderr
    # the tag decides, and must agree with the version file
    repo = git_repo(fake_checkout(tmp_path / "mlm2", (0, 16, 1)), "core_v0.19.0")
    r = apply_sh("--check", repo)
    assert r.returncode == 1
    assert "the tag says core_v0.19.0 but package_info.py says 0.16.1" in r.stderr


MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")
needs_checkout = pytest.mark.skipif(
    not MEGATRON_LM_DIR or not (Path(MEGATRON_LM_DIR or ".") / "pretrain_gpt.py").is_file(),
    reason="set MEGATRON_LM_DIR to a Megatron-LM checkout at " + " or ".join(
        SUPPORTED_MEGATRON_LM_TAGS))


def checkout_tag() -> str:
    """The supported tag of $MEGATRON_LM_DIR, by its version file's MAJOR.MINOR line."""
    v = megatron_lm_checkout_version(MEGATRON_LM_DIR)
    tags = [t for t in SUPPORTED_MEGATRON_LM_TAGS
            if t.removeprefix("core_v").rsplit(".", 1)[0] == f"{v.major}.{v.minor}"]
    if not tags:
        pytest.fail(f"MEGATRON_LM_DIR={MEGATRON_LM_DIR} is megatron-core {v}: not a supported tag")
    return tags[0]


@needs_checkout
def test_git_apply_check_against_checkout():
    tag = checkout_tag()
    r = subprocess.run(["git", "apply", "--check", "-v", str(PATCHES[tag])], cwd=MEGATRON_LM_DIR,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = apply_sh("--check", MEGATRON_LM_DIR)
    assert r.returncode == 0 and f"{PATCHES[tag].name} applies cleanly" in r.stdout, \
        r.stdout + r.stderr
    for other, patch in PATCHES.items():  # one patch per tag: the others do not apply here
        if other != tag:
            r = subprocess.run(["git", "apply", "--check", str(patch)], cwd=MEGATRON_LM_DIR,
                               capture_output=True, text=True, timeout=60)
            assert r.returncode != 0, f"{patch.name} applies to {tag} too"


@needs_checkout
def test_apply_and_revert_on_copy(tmp_path):
    src = Path(MEGATRON_LM_DIR)
    dst = tmp_path / "mlm"
    for f in [*EXPECTED_FILES, "megatron/core/package_info.py"]:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / f, dst / f)
    before = {f: (dst / f).read_text() for f in EXPECTED_FILES}
    r = apply_sh(dst)
    assert r.returncode == 0 and "applied" in r.stdout, r.stderr
    for f in EXPECTED_FILES:  # patched files still compile
        compile((dst / f).read_text(), f, "exec")
    assert f"megatron-mohge/{checkout_tag()}" in (dst / "megatron/training/training.py").read_text()
    assert "already applied" in apply_sh(dst).stdout
    r = apply_sh("--revert", dst)
    assert r.returncode == 0 and "reverted" in r.stdout
    assert {f: (dst / f).read_text() for f in EXPECTED_FILES} == before


@pytest.mark.slow
@needs_checkout
def test_patched_checkout_imports_and_hooks(tmp_path):
    """Patched Megatron-LM (full copy) parses --mohge-config; its FLOPs include the MoHGE
    correction and its training_log names the MoHGE losses."""
    dst = tmp_path / "mlm"
    shutil.copytree(MEGATRON_LM_DIR, dst, ignore=shutil.ignore_patterns(".git", "tests", "docs"))
    assert apply_sh(dst).returncode == 0
    probe = f"""
import argparse, inspect, os, sys
os.environ["WORLD_SIZE"] = "1"
import megatron.training.training as T, pretrain_gpt, gpt_builders
import megatron.training.arguments as A
assert pretrain_gpt.mohge_lm is not None and T.MOHGE_PATCH
from megatron_mohge.integration import megatron_lm as ML
sys.argv = ["pretrain_gpt.py", "--num-layers", "4", "--hidden-size", "1024",
            "--num-attention-heads", "16", "--seq-length", "4096", "--max-position-embeddings",
            "4096", "--swiglu", "--micro-batch-size", "1", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", "128000",
            "--mohge-config", "{ROOT / 'examples/configs/paper_3b_layer.yaml'}"]
a = A.parse_args(pretrain_gpt.mohge_lm.compose_extra_args_providers(None, ML.add_mohge_args))
A.validate_args(a, {{}})
a.padded_vocab_size = 128256
ML.finalize_mohge_args(a)
plain = argparse.Namespace(**{{**vars(a), "mohge_config": None}})
delta = T.num_floating_point_operations(a, 8) - T.num_floating_point_operations(plain, 8)
assert abs(delta - ML.mohge_flops_correction(a, 8)) < 1e-6 * abs(delta), delta
assert delta < 0  # the widest group is what Megatron assumes for every routed expert
src = inspect.getsource(T.training_log)
assert "mohge_track_names(args, track_names)" in src
print("OK", delta)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(dst), *os.environ.get("PYTHONPATH", "").split(os.pathsep)])}
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", probe], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    if "No module named" in r.stderr and "megatron_mohge" not in r.stderr:
        pytest.skip(f"Megatron-LM's training dependencies are missing: {r.stderr.splitlines()[-1]}")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
