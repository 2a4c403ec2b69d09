"""Every results.json (mohge-bench, the GPU check) records the git commit of the code that made
it: ``env.commit`` (null outside a git checkout of this package) and ``env.dirty`` (tracked
files changed since that commit)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from megatron_mohge.bench import environment

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def _package_at(root: Path, monkeypatch) -> Path:
    """A stand-in package tree under ``root``; ``environment()`` then looks for the code's git there."""
    module = root / "megatron_mohge" / "bench" / "environment.py"
    module.parent.mkdir(parents=True)
    module.write_text("# stand-in\n")
    monkeypatch.setattr(environment, "__file__", str(module))
    return module


def _init_repo(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    _git(path, "init", "-q")
    _git(path, "config", "user.email", "t@example.com")
    _git(path, "config", "user.name", "t")


def test_a_checkout_records_its_commit_and_whether_it_is_dirty(tmp_path, monkeypatch):
    module = _package_at(tmp_path / "repo", monkeypatch)
    _init_repo(tmp_path / "repo")
    _git(tmp_path / "repo", "add", "-A")
    _git(tmp_path / "repo", "commit", "-q", "-m", "x")
    head = _git(tmp_path / "repo", "rev-parse", "HEAD")
    env = environment.environment()
    assert (env["commit"], env["dirty"]) == (head, False)
    (tmp_path / "repo" / "untracked.txt").write_text("run output\n")  # not a code change
    assert environment.environment()["dirty"] is False
    module.write_text("# edited\n")
    env = environment.environment()
    assert (env["commit"], env["dirty"]) == (head, True)


def test_no_git_checkout_records_null(tmp_path, monkeypatch):
    _package_at(tmp_path / "site-packages", monkeypatch)
    env = environment.environment()
    assert (env["commit"], env["dirty"]) == (None, None)


def test_a_repository_around_an_installed_package_is_not_its_commit(tmp_path, monkeypatch):
    # e.g. a venv inside some project's checkout: that project's commit is not the code's
    _init_repo(tmp_path / "project")
    (tmp_path / "project" / "f").write_text("x\n")
    _git(tmp_path / "project", "add", "-A")
    _git(tmp_path / "project", "commit", "-q", "-m", "x")
    _package_at(tmp_path / "project" / "venv" / "site-packages", monkeypatch)
    assert environment.environment()["commit"] is None


def test_without_a_git_binary_the_commit_is_null(tmp_path, monkeypatch):
    _package_at(tmp_path / "repo", monkeypatch)
    _init_repo(tmp_path / "repo")

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert environment.environment()["commit"] is None


def test_this_checkout_records_head():
    repo = Path(environment.__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    assert environment.environment()["commit"] == _git(repo, "rev-parse", "HEAD")
