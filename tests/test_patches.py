"""patches/: the Megatron-LM patch file, apply.sh, and (with $MEGATRON_LM_DIR) a real check.

Always on: the patch is a well-formed unified diff touching only the three expected files and
delegating to megatron_mohge.integration; apply.sh refuses wrong versions. With
``MEGATRON_LM_DIR`` pointing at a Megatron-LM core_v0.16.1 checkout: ``git apply --check``
there, and apply / re-apply / revert with apply.sh on a copy of the three files.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATCH = ROOT / "patches" / "megatron-lm-core_v0.16.1.patch"
APPLY = ROOT / "patches" / "apply.sh"
EXPECTED_FILES = {"pretrain_gpt.py", "gpt_builders.py", "megatron/training/training.py"}
HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


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


def test_patch_is_well_formed_and_minimal():
    text = PATCH.read_text()
    files = parse_patch(text)
    assert set(files) == EXPECTED_FILES
    added = [ln[1:] for hunks in files.values() for *_, body in hunks for ln in body
             if ln.startswith("+")]
    removed = [ln for hunks in files.values() for *_, body in hunks for ln in body
               if ln.startswith("-")]
    assert 10 < len(added) <= 60 and len(removed) <= 5  # a few dozen lines
    code = "\n".join(added)
    for name in ("add_mohge_args", "mohge_gpt_builder", "mohge_track_names",
                 "mohge_flops_correction", "update_training_progress"):
        assert name in code, name
    assert "MOHGE_PATCH" in code
    # every hunk is guarded: nothing changes without --mohge-config / megatron-mohge
    assert code.count('getattr(args, "mohge_config", None)') == 3
    assert "except ImportError" in code
    # the functions the patch calls exist
    from megatron_mohge.integration import megatron_lm as ML

    for name in re.findall(r"mohge_lm\.(\w+)", code) + re.findall(
            r"from megatron_mohge\.integration\.megatron_lm import (\w+)", code):
        assert callable(getattr(ML, name)), name


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
    newer = fake_checkout(tmp_path / "mlm", (0, 18, 0))
    r = apply_sh(newer)
    assert r.returncode == 1 and "'0.18.0'" in r.stderr and "--force" in r.stderr
    r = apply_sh("--force", "--check", newer)  # version check skipped; the files do not match
    assert r.returncode == 1 and "skipping the version check" in r.stdout
    assert "does not apply" in r.stderr
    assert apply_sh().returncode == 2 and apply_sh("--bogus", newer).returncode == 2


def test_checkout_version_and_pretrain_style(tmp_path):
    from megatron_mohge.compat.versions import (
        MEGATRON_LM_PATCHES,
        megatron_lm_checkout_version,
        megatron_lm_pretrain_style,
    )

    assert str(megatron_lm_checkout_version(fake_checkout(tmp_path / "a"))) == "0.16.1"
    assert megatron_lm_checkout_version(tmp_path / "missing") is None
    assert (ROOT / "patches" / MEGATRON_LM_PATCHES["core_v0.16.1"]) == PATCH

    def old(provider, model_provider, model_type, forward_step, process_non_loss_data_func=None,
            extra_args_provider=None, args_defaults={}): ...

    def new(cfg_container, provider, model_provider, model_type, forward_step): ...

    assert megatron_lm_pretrain_style(old) == "args"
    assert megatron_lm_pretrain_style(new) == "config_container"


def test_apply_sh_refuses_other_git_tag(tmp_path):
    repo = fake_checkout(tmp_path / "mlm")
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    subprocess.run([*git, "tag", "core_v0.17.1"], check=True)
    r = apply_sh("--check", repo)
    assert r.returncode == 1 and "is at core_v0.17.1, not core_v0.16.1" in r.stderr


MEGATRON_LM_DIR = os.environ.get("MEGATRON_LM_DIR")
needs_checkout = pytest.mark.skipif(
    not MEGATRON_LM_DIR or not (Path(MEGATRON_LM_DIR or ".") / "pretrain_gpt.py").is_file(),
    reason="set MEGATRON_LM_DIR to a Megatron-LM core_v0.16.1 checkout")


@needs_checkout
def test_git_apply_check_against_checkout():
    r = subprocess.run(["git", "apply", "--check", "-v", str(PATCH)], cwd=MEGATRON_LM_DIR,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    r = apply_sh("--check", MEGATRON_LM_DIR)
    assert r.returncode == 0 and "applies cleanly" in r.stdout, r.stdout + r.stderr


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
    assert "MOHGE_PATCH" in (dst / "megatron/training/training.py").read_text()
    assert "already applied" in apply_sh(dst).stdout
    r = apply_sh("--revert", dst)
    assert r.returncode == 0 and "reverted" in r.stdout
    assert {f: (dst / f).read_text() for f in EXPECTED_FILES} == before


@pytest.mark.slow
@needs_checkout
def test_patched_checkout_imports_and_hooks(tmp_path):
    """Patched Megatron-LM (full copy) imports; its FLOPs and track names include MoHGE."""
    dst = tmp_path / "mlm"
    shutil.copytree(MEGATRON_LM_DIR, dst, ignore=shutil.ignore_patterns(".git", "tests", "docs"))
    assert apply_sh(dst).returncode == 0
    probe = f"""
import argparse, copy, sys
import megatron.training.training as T, pretrain_gpt, gpt_builders
assert pretrain_gpt.mohge_lm is not None and T.MOHGE_PATCH
from megatron_mohge.integration import megatron_lm as ML
a = ML.add_mohge_args(argparse.ArgumentParser()).parse_args(
    ["--mohge-config", "{ROOT / 'examples/configs/paper_3b_layer.yaml'}"])
base = dict(num_layers=4, moe_layer_freq=1, mtp_num_layers=None, hidden_size=1024,
            seq_length=4096, swiglu=True, ffn_hidden_size=4096, is_hybrid_model=False,
            group_query_attention=False, num_attention_heads=16, num_query_groups=16,
            kv_channels=64, multi_latent_attention=False, attention_output_gate=False,
            experimental_attention_variant=None, padded_vocab_size=128256)
vars(a).update(base)
plain = argparse.Namespace(**{{**vars(a), "mohge_config": None}})
delta = T.num_floating_point_operations(a, 8) - T.num_floating_point_operations(plain, 8)
assert abs(delta - ML.mohge_flops_correction(a, 8)) < 1e-6 * abs(delta), delta
print("OK", delta)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(dst), *os.environ.get("PYTHONPATH", "").split(os.pathsep)])}
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", probe], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    if "No module named" in r.stderr and "megatron_mohge" not in r.stderr:
        pytest.skip(f"Megatron-LM's training dependencies are missing: {r.stderr.splitlines()[-1]}")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
