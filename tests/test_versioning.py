"""SubsetStore against a real temporary git repository and a real DVC local remote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from skmm_pipeline.versioning.dvc_store import SubsetStore, SubsetVersion, SubsetVersionError

HISTORY_REF = "refs/heads/skmm-subsets"
ALLOWED_IN_HISTORY = {"data.dvc", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore"}

V1_FILES = {"ids.txt": b"3\n1\n4\n", "weights.npy": bytes(range(64)), "manifest.json": b'{"n": 3}'}
V2_FILES = {"ids.txt": b"2\n7\n", "manifest.json": b'{"n": 2}'}
V1_META = {"method": "skmm", "n": 3, "metrics": {"acc": 0.5}}
V2_META = {"method": "random", "n": 2, "seed": 0}


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()


def read_dir(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture
def isolated_git(tmp_path, monkeypatch):
    """Keep the machine's git/DVC configuration out of the tests; identity comes from env vars."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    for who in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{who}_NAME", "Test User")
        monkeypatch.setenv(f"GIT_{who}_EMAIL", "test@example.com")
    return monkeypatch


@pytest.fixture
def repo(tmp_path, isolated_git) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "README").write_text("user project\n")
    git(root, "add", "README")
    git(root, "commit", "-q", "-m", "initial")
    return root


@pytest.fixture
def remote(tmp_path) -> Path:
    path = tmp_path / "dvc-remote"
    path.mkdir()
    return path


@pytest.fixture
def store(repo, remote) -> SubsetStore:
    return SubsetStore(repo, remote_url=str(remote))


def test_two_versions_leave_user_branch_head_and_index_alone(repo, store):
    initial = git(repo, "rev-parse", "HEAD")
    # A change the user staged before versioning must stay staged, and nothing else staged.
    (repo / "README").write_text("user project, edited\n")
    git(repo, "add", "README")
    staged_before = git(repo, "ls-files", "--stage")

    v1 = store.write_version(V1_FILES, V1_META)
    v2 = store.write_version(V2_FILES, V2_META)

    assert (v1.tag, v2.tag) == ("subset-v0001", "subset-v0002")
    assert v1.pushed and v2.pushed
    assert v2.data_md5.endswith(".dir") and v1.data_md5 != v2.data_md5
    assert git(repo, "rev-parse", HISTORY_REF) == v2.commit
    assert git(repo, "rev-parse", "subset-v0001^{commit}") == v1.commit
    assert git(repo, "cat-file", "-t", "subset-v0001") == "tag"  # annotated

    versions = store.list_versions()
    assert versions == [v1, v2]
    assert [v.meta for v in versions] == [V1_META, V2_META]
    assert all(v.created.endswith("+00:00") for v in versions)
    assert store.latest() == v2
    message = git(repo, "tag", "-l", "--format=%(contents)", "subset-v0002")
    assert json.loads(message.splitlines()[-1]) == V2_META

    assert git(repo, "rev-parse", "main") == initial
    assert git(repo, "rev-parse", "HEAD") == initial
    assert git(repo, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert git(repo, "ls-files", "--stage") == staged_before
    assert git(repo, "diff", "--cached", "--name-only") == "README"
    assert read_dir(repo / "data") == V2_FILES
    leftovers = [p.name for p in repo.iterdir() if p.name.startswith(".data.")]
    assert leftovers == []


def test_read_file_of_an_older_version_without_checkout(repo, store):
    v1 = store.write_version(V1_FILES, V1_META)
    store.write_version(V2_FILES, V2_META)
    for name, content in V1_FILES.items():
        assert store.read_file(v1.tag, name) == content
    assert store.read_file("subset-v0002", "ids.txt") == V2_FILES["ids.txt"]
    assert read_dir(repo / "data") == V2_FILES  # the work tree was not checked out
    with pytest.raises(SubsetVersionError, match="weights.npy"):
        store.read_file("subset-v0002", "weights.npy")


def test_history_commits_hold_only_dvc_metadata(repo, store):
    v1 = store.write_version(V1_FILES, V1_META)
    v2 = store.write_version(V2_FILES, V2_META)
    for version in (v1, v2):
        names = set(git(repo, "ls-tree", "-r", "--name-only", version.tag).splitlines())
        assert "data.dvc" in names and ".dvc/config" in names
        assert names <= ALLOWED_IN_HISTORY
    assert git(repo, "rev-parse", f"{v2.commit}^") == v1.commit
    assert git(repo, "rev-list", "--count", v1.commit) == "1"  # v1 is a root commit
    changed = git(repo, "diff-tree", "--no-commit-id", "--name-only", "-r", v1.commit, v2.commit)
    assert changed.splitlines() == ["data.dvc"]
    assert v2.data_md5 in git(repo, "show", f"{v2.tag}:data.dvc")


def test_fresh_clone_checks_out_a_tag_and_pulls_it(tmp_path, repo, store):
    from dvc.repo import Repo

    store.write_version(V1_FILES, V1_META)
    store.write_version(V2_FILES, V2_META)

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    git(clone, "checkout", "-q", "subset-v0001")
    assert not (clone / "data").exists()
    with Repo(str(clone)) as dvc_repo:
        dvc_repo.pull()
    assert read_dir(clone / "data") == V1_FILES
    assert [v.tag for v in SubsetStore(clone).list_versions()] == ["subset-v0001", "subset-v0002"]

    git(clone, "checkout", "-q", "subset-v0002")
    with Repo(str(clone)) as dvc_repo:
        dvc_repo.pull(force=True)
    assert read_dir(clone / "data") == V2_FILES


def test_hand_edited_data_is_refused(repo, store):
    v1 = store.write_version(V1_FILES, V1_META)
    (repo / "data" / "ids.txt").write_bytes(b"edited by hand\n")

    with pytest.raises(SubsetVersionError, match="data"):
        store.write_version(V2_FILES, V2_META)

    assert [v.tag for v in store.list_versions()] == [v1.tag]
    assert git(repo, "tag", "-l") == v1.tag
    assert git(repo, "rev-parse", HISTORY_REF) == v1.commit
    assert (repo / "data" / "ids.txt").read_bytes() == b"edited by hand\n"

    # An empty cache must not hide the edit (DVC's status would only say "not in cache").
    shutil.rmtree(repo / ".dvc" / "cache")
    with pytest.raises(SubsetVersionError, match="modified"):
        store.check_clean()

    # A missing data/ (e.g. a clone that was never pulled) is not an edit.
    shutil.rmtree(repo / "data")
    store.check_clean()
    assert store.write_version(V2_FILES, V2_META).tag == "subset-v0002"


def test_failure_mid_version_rolls_everything_back(repo, store):
    v1 = store.write_version(V1_FILES, V1_META)
    dvc_file_before = (repo / "data.dvc").read_bytes()
    gitignore_before = (repo / ".gitignore").read_bytes()
    # A stray lightweight tag with the next version's name makes the tag step fail after data/
    # was swapped, dvc add ran and the history ref moved.
    git(repo, "tag", "subset-v0002", "HEAD")

    with pytest.raises(SubsetVersionError, match="subset-v0002") as info:
        store.write_version(V2_FILES, V2_META)
    assert info.value.__cause__ is not None

    assert read_dir(repo / "data") == V1_FILES
    assert (repo / "data.dvc").read_bytes() == dvc_file_before
    assert (repo / ".gitignore").read_bytes() == gitignore_before
    assert git(repo, "rev-parse", HISTORY_REF) == v1.commit
    assert git(repo, "rev-parse", "subset-v0002") == git(repo, "rev-parse", "HEAD")  # untouched
    assert store.list_versions() == [v1]
    assert [p.name for p in repo.iterdir() if p.name.startswith(".data.")] == []

    # The rolled-back state is clean and versioning resumes once the collision is gone.
    store.check_clean()
    git(repo, "tag", "-d", "subset-v0002")
    v2 = store.write_version(V2_FILES, V2_META)
    assert v2.tag == "subset-v0002"
    assert store.read_file(v1.tag, "weights.npy") == V1_FILES["weights.npy"]


def test_failure_on_first_version_leaves_no_trace(repo, store):
    git(repo, "tag", "subset-v0001", "HEAD")
    with pytest.raises(SubsetVersionError):
        store.write_version(V1_FILES, V1_META)
    assert not (repo / "data").exists()
    assert not (repo / "data.dvc").exists()
    assert not (repo / ".gitignore").exists()
    assert subprocess.run(
        ["git", "rev-parse", "-q", "--verify", HISTORY_REF], cwd=repo, capture_output=True
    ).returncode != 0
    assert store.list_versions() == []
    assert store.latest() is None


def test_push_failure_still_records_the_version(tmp_path, repo, caplog):
    not_a_dir = tmp_path / "remote-is-a-file"
    not_a_dir.write_text("")
    store = SubsetStore(repo, remote_url=str(not_a_dir))
    with caplog.at_level("WARNING", logger="skmm_pipeline.versioning.dvc_store"):
        version = store.write_version(V1_FILES, V1_META)
    assert version.pushed is False
    assert "push" in caplog.text
    assert store.list_versions() == [SubsetVersion(**{**version.__dict__, "pushed": True})]
    assert store.read_file(version.tag, "ids.txt") == V1_FILES["ids.txt"]


def test_fallback_identity_when_git_has_none(repo, remote, isolated_git):
    for who in ("AUTHOR", "COMMITTER"):
        isolated_git.delenv(f"GIT_{who}_NAME")
        isolated_git.delenv(f"GIT_{who}_EMAIL")
    isolated_git.delenv("EMAIL", raising=False)
    version = SubsetStore(repo, remote_url=str(remote)).write_version(V1_FILES, V1_META)
    tagger = git(repo, "tag", "-l", "--format=%(taggername) %(taggeremail)", version.tag)
    assert tagger == "skmm-pipeline <skmm-pipeline@localhost>"


def test_input_and_repository_errors(tmp_path, repo, store):
    with pytest.raises(SubsetVersionError, match="repo_root must be absolute"):
        SubsetStore("relative/repo")

    plain = tmp_path / "not-a-repo"
    plain.mkdir()
    with pytest.raises(SubsetVersionError, match="not a git work tree"):
        SubsetStore(plain).write_version(V1_FILES, V1_META)
    assert not (plain / ".dvc").exists()

    for bad in ("sub/ids.txt", "../escape", ".."):
        with pytest.raises(SubsetVersionError, match="file name"):
            store.write_version({bad: b"x"}, {})
    with pytest.raises(SubsetVersionError, match="JSON"):
        store.write_version(V1_FILES, {"bad": object()})
    assert not (repo / "data").exists()

    store.write_version(V1_FILES, V1_META)
    with pytest.raises(SubsetVersionError, match="unknown subset version"):
        store.read_file("subset-v0099", "ids.txt")
    with pytest.raises(SubsetVersionError, match="unknown subset version"):
        store.read_file("main", "ids.txt")
    with pytest.raises(SubsetVersionError, match="file name"):
        store.read_file("subset-v0001", "sub/ids.txt")
