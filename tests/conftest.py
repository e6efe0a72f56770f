import os
import subprocess
from pathlib import Path

import pytest

# Real components everywhere; these only keep them quiet and give git an identity in temp repos.
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
for var, value in {
    "GIT_AUTHOR_NAME": "skmm-tests",
    "GIT_AUTHOR_EMAIL": "skmm-tests@localhost",
    "GIT_COMMITTER_NAME": "skmm-tests",
    "GIT_COMMITTER_EMAIL": "skmm-tests@localhost",
}.items():
    os.environ.setdefault(var, value)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A temporary git repository standing in for a user's project checkout (never the real one)."""
    root = tmp_path / "project"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "README.md").write_text("user project\n")
    git(root, "add", "README.md")
    git(root, "commit", "-q", "-m", "initial")
    return root


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home
