"""Subset versions against real temporary git repositories, a real DVC local remote and a real
MLflow sqlite store: writing, browsing, restoring, failure handling, degraded mode, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from skmm_pipeline import cli
from skmm_pipeline.tracking.mlflow_store import MlflowTracker, run_tags, sqlite_uri
from skmm_pipeline.versioning.catalog import SubsetCatalog
from skmm_pipeline.versioning.dvc_store import SubsetStore, SubsetVersionError
from skmm_pipeline.versioning.subsets import SubsetManifest, record_subset_version

HISTORY_REF = "refs/heads/skmm-subsets"
# DVC's own metadata travels with each version so that a clone can `dvc pull` it.
ALLOWED_IN_HISTORY = {"data.dvc", ".gitignore", ".dvc/config", ".dvc/.gitignore", ".dvcignore"}

V1_FILES = {"ids.txt": b"3\n1\n4\n", "weights.npy": bytes(range(64)), "manifest.json": b'{"n": 3}'}
V2_FILES = {"ids.txt": b"2\n7\n", "manifest.json": b'{"n": 2}'}
V1_META = {"method": "skmm", "n": 3, "metrics": {"acc": 0.5}}
V2_META = {"method": "random", "n": 2, "seed": 0}

SHARDS = {"s0": "sha-s0", "s1": "sha-s1", "s2": "sha-s2"}


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()


def read_dir(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def selection(k: int, ids: list[str], shards=("s0", "s1"), method: str = "skmm") -> SubsetManifest:
    return SubsetManifest(
        sample_ids=ids,
        weights=[1.0 / len(ids)] * len(ids),
        method=method,
        seed=k,
        shards={s: SHARDS[s] for s in shards},
        sketch_identity={"kind": "gaussian", "seed": k, "m": 8, "model_id": "model-abc"},
        budget=len(ids),
        pool_size=30,
        metrics={"moment_ratio": 0.25 * (k + 1), "objective_trace": 10.0 - k},
        dagster_run_id=f"dagster-run-{k}",
    )


IDS_1 = [f"s0/{i}" for i in range(8)] + [f"s1/{i}" for i in range(4)]
IDS_2 = [f"s0/{i}" for i in range(4, 10)] + [f"s1/{i}" for i in range(6)]
IDS_3 = [f"s1/{i}" for i in range(2, 6)] + [f"s2/{i}" for i in range(5)]


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
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
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
    (root / ".gitignore").write_text("secrets.env\n")
    git(root, "add", "README", ".gitignore")
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


@pytest.fixture(scope="module")
def tracker(tmp_path_factory) -> MlflowTracker:
    """One migrated MLflow sqlite store for the whole module (migrations take seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    tracker = MlflowTracker(sqlite_uri(root / "mlflow.db"), root / "artifacts", experiment="versions")
    tracker.experiment_id()
    return tracker


def fail_ref_update(repo: Path, ref: str) -> None:
    """A real git hook that aborts any transaction touching ``ref`` (git >= 2.28)."""
    hook = repo / ".git" / "hooks" / "reference-transaction"
    hook.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        input=$(cat)
        if [ "$1" = prepared ] && printf '%s\\n' "$input" | grep -q " {ref}$"; then
            echo "refusing {ref}" >&2
            exit 1
        fi
        exit 0
        """))
    hook.chmod(0o755)


def history_files(repo: Path) -> set[str]:
    names = set()
    for commit in git(repo, "rev-list", HISTORY_REF).splitlines():
        names |= set(git(repo, "ls-tree", "-r", "--name-only", commit).splitlines())
    return names


# ---------------------------------------------------------------------- writing


def test_two_versions_leave_user_branch_head_and_index_alone(repo, store):
    initial = git(repo, "rev-parse", "HEAD")
    # An unrelated change the user staged before versioning stays staged and never leaks into a
    # version: history commits are built from a private index.
    (repo / "README").write_text("user project, edited\n")
    git(repo, "add", "README")
    staged_before = git(repo, "ls-files", "--stage")

    v1 = store.write_version(V1_FILES, V1_META)
    v2 = store.write_version(V2_FILES, V2_META)

    assert (v1.tag, v2.tag) == ("subset-v0001", "subset-v0002")
    assert v1.pushed and v2.pushed and store.pending_pushes() == []
    assert v2.data_md5.endswith(".dir") and v1.data_md5 != v2.data_md5
    assert git(repo, "rev-parse", HISTORY_REF) == v2.commit
    assert git(repo, "rev-parse", "subset-v0001^{commit}") == v1.commit
    assert git(repo, "cat-file", "-t", "subset-v0001") == "tag"  # annotated

    versions = store.list_versions()
    assert versions == [v1, v2]
    assert [v.meta for v in versions] == [V1_META, V2_META]
    assert all(v.created.endswith("+00:00") for v in versions)
    assert store.latest() == v2 and store.get("subset-v0001") == v1
    message = git(repo, "tag", "-l", "--format=%(contents)", "subset-v0002")
    assert json.loads(message.splitlines()[-1]) == V2_META

    assert git(repo, "rev-parse", "main") == initial
    assert git(repo, "rev-parse", "HEAD") == initial
    assert git(repo, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert git(repo, "ls-files", "--stage") == staged_before
    assert git(repo, "diff", "--cached", "--name-only") == "README"
    assert "README" not in history_files(repo)
    assert read_dir(repo / "data") == V2_FILES
    leftovers = [p.name for p in repo.iterdir() if p.name.startswith(".data.")]
    assert leftovers == []


def test_history_commits_hold_only_data_dvc_and_dvc_metadata(repo, store):
    v1 = store.write_version(V1_FILES, V1_META)
    v2 = store.write_version(V2_FILES, V2_META)
    for version in (v1, v2):
        names = set(git(repo, "ls-tree", "-r", "--name-only", version.tag).splitlines())
        assert "data.dvc" in names and ".dvc/config" in names
        assert names <= ALLOWED_IN_HISTORY
        # The user's .gitignore (with its own entries) is never committed; the history carries
        # a one-line .gitignore for data/.
        assert git(repo, "show", f"{version.tag}:.gitignore") == "/data"
    assert "secrets.env" in (repo / ".gitignore").read_text()
    assert git(repo, "rev-parse", f"{v2.commit}^") == v1.commit
    assert git(repo, "rev-list", "--count", v1.commit) == "1"  # v1 is a root commit
    changed = git(repo, "diff-tree", "--no-commit-id", "--name-only", "-r", v1.commit, v2.commit)
    assert changed.splitlines() == ["data.dvc"]
    assert v2.data_md5 in git(repo, "show", f"{v2.tag}:data.dvc")


def test_read_file_of_an_older_version_without_checkout(repo, store):
    v1 = store.write_version(V1_FILES, V1_META)
    store.write_version(V2_FILES, V2_META)
    for name, content in V1_FILES.items():
        assert store.read_file(v1.tag, name) == content
    assert store.read_file("subset-v0002", "ids.txt") == V2_FILES["ids.txt"]
    assert store.list_files(v1.tag) == sorted(V1_FILES)
    assert read_dir(repo / "data") == V2_FILES  # the work tree was not checked out
    with pytest.raises(SubsetVersionError, match="weights.npy"):
        store.read_file("subset-v0002", "weights.npy")


def test_three_selections_tags_list_diff_checkout_with_mlflow(repo, store, tracker):
    selections = [selection(0, IDS_1), selection(1, IDS_2), selection(2, IDS_3, shards=("s1", "s2"))]
    recorded = [record_subset_version(store, m, tracker) for m in selections]
    assert [r.version.tag for r in recorded] == ["subset-v0001", "subset-v0002", "subset-v0003"]

    # finetune_eval's runs: per-method, per-n metrics, joined to versions by the DVC tag.
    accuracy = {"subset-v0001": 0.70, "subset-v0003": 0.76}
    for r in recorded:
        if r.version.tag in accuracy:
            with tracker.run("finetune_eval", tags=run_tags("dagster-eval", "finetune_eval", version=r.version)) as run:
                run.log_eval_metrics([
                    {"method": "skmm", "n": r.manifest.n, "test_accuracy": accuracy[r.version.tag]},
                    {"method": "uniform", "n": r.manifest.n, "test_accuracy": 0.6},
                ])

    catalog = SubsetCatalog(store, tracking_uri=tracker.tracking_uri)
    table = catalog.versions()
    assert list(table["tag"]) == ["subset-v0001", "subset-v0002", "subset-v0003"]
    assert list(table["method"]) == ["skmm"] * 3 and list(table["n"]) == [12, 12, 9]
    assert table["test_accuracy"].tolist()[0] == pytest.approx(0.70)
    assert table["test_accuracy"].isna().tolist() == [False, True, False]
    assert list(table["shards"]) == ["s0,s1", "s0,s1", "s1,s2"]
    assert table["pushed"].all() and table["date"].notna().all()
    assert list(table["mlflow_run_id"]) == [r.mlflow_run_id for r in recorded]

    # The manifest records the provenance the issue asks for; MLflow has the selection run.
    manifest = catalog.manifest("subset-v0002")
    assert manifest["dagster_run_id"] == "dagster-run-1"
    assert manifest["mlflow_run_id"] == recorded[1].mlflow_run_id
    assert manifest["shards"] == {"s0": "sha-s0", "s1": "sha-s1"}
    assert manifest["model_id"] == "model-abc" and manifest["sketch_identity"]["seed"] == 1
    assert manifest["c_S"] == pytest.approx(2.0)  # 1 / moment_ratio
    run = tracker.client.get_run(recorded[1].mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dvc.tag"] == "subset-v0002"
    assert run.data.tags["dvc.md5"] == recorded[1].version.data_md5
    assert run.data.tags["dagster.run_id"] == "dagster-run-1"
    assert run.data.params["n"] == "12" and run.data.metrics["c_S"] == pytest.approx(2.0)
    artifacts = {a.path for a in tracker.client.list_artifacts(run.info.run_id, "subset")}
    assert artifacts == {"subset/manifest.json", "subset/subset.csv"}

    subset = catalog.subset("subset-v0001")
    assert subset["sample_id"].tolist() == IDS_1
    assert subset["weight"].sum() == pytest.approx(1.0) and subset["rank"].tolist() == list(range(12))
    assert subset["shard"].tolist()[:1] == ["s0"] and subset["row"].tolist()[:2] == [0, 1]

    diff = catalog.diff("subset-v0001", "subset-v0003")
    assert set(diff.added["sample_id"]) == set(IDS_3) - set(IDS_1)
    assert set(diff.removed["sample_id"]) == set(IDS_1) - set(IDS_3)
    assert diff.overlap == len(set(IDS_1) & set(IDS_3)) == 2
    assert diff.jaccard == pytest.approx(2 / len(set(IDS_1) | set(IDS_3)))
    metrics = diff.metrics.set_index("metric")
    assert metrics.loc["test_accuracy/skmm", "delta"] == pytest.approx(0.06)
    assert metrics.loc["moment_ratio", "delta"] == pytest.approx(0.5)
    assert diff.changes["n"] == (12, 9) and "shards" in diff.changes

    details = catalog.show("subset-v0003")
    shown = details.metrics.set_index("metric")
    assert shown.loc["test_accuracy/skmm", "source"] == "mlflow"
    assert len(details.mlflow_run_ids) == 2  # the selection run and the evaluation run

    # Checkout of the first version restores byte-identical files; a later write still works.
    catalog.checkout("subset-v0001")
    assert read_dir(repo / "data") == selections[0].with_mlflow_run_id(recorded[0].mlflow_run_id).files()
    assert (repo / "data.dvc").read_bytes() == git(repo, "show", "subset-v0001:data.dvc").encode() + b"\n"
    assert git(repo, "status", "--porcelain", "--", "data") == ""
    v4 = store.write_version(*_files_meta(selection(3, IDS_2)))
    assert v4.tag == "subset-v0004"
    assert history_files(repo) <= ALLOWED_IN_HISTORY


def _files_meta(manifest: SubsetManifest):
    return manifest.files(), manifest.tag_meta()


def test_fresh_clone_plus_dvc_pull_recovers_every_version(tmp_path, repo, store):
    from dvc.repo import Repo

    written = [selection(k, ids).files() for k, ids in enumerate((IDS_1, IDS_2, IDS_3))]
    for files in written:
        store.write_version(files, {"method": "skmm"})

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    git(clone, "fetch", "-q", "origin", f"{HISTORY_REF}:{HISTORY_REF}")
    assert not (clone / "data").exists() and not (clone / ".dvc").exists()  # main has neither

    # Plain git + DVC, as a user without this package would do it.
    for k, files in enumerate(written, start=1):
        git(clone, "checkout", "-q", f"subset-v{k:04d}")
        with Repo(str(clone)) as dvc_repo:
            dvc_repo.pull(force=True)
        assert read_dir(clone / "data") == files
    git(clone, "checkout", "-q", "main")
    shutil.rmtree(clone / "data")

    # The package's API on a clone whose work tree has no DVC set-up and an empty cache.
    clone2 = tmp_path / "clone2"
    git(tmp_path, "clone", "-q", str(repo), str(clone2))
    other = SubsetStore(clone2)
    assert [v.tag for v in other.list_versions()] == ["subset-v0001", "subset-v0002", "subset-v0003"]
    assert other.read_file("subset-v0002", "subset.csv") == written[1]["subset.csv"]
    other.checkout("subset-v0002")
    assert read_dir(clone2 / "data") == written[1]
    assert git(clone2, "status", "--porcelain", "--", "data") == ""
    assert git(clone2, "rev-parse", "--abbrev-ref", "HEAD") == "main"


# ---------------------------------------------------------------------- safety


def test_hand_edited_data_is_refused(repo, store):
    v1 = store.write_version(V1_FILES, V1_META)
    (repo / "data" / "ids.txt").write_bytes(b"edited by hand\n")

    with pytest.raises(SubsetVersionError, match="data"):
        store.write_version(V2_FILES, V2_META)
    with pytest.raises(SubsetVersionError, match="local modifications"):
        store.checkout(v1.tag)

    assert [v.tag for v in store.list_versions()] == [v1.tag]
    assert git(repo, "tag", "-l") == v1.tag
    assert git(repo, "rev-parse", HISTORY_REF) == v1.commit
    assert (repo / "data" / "ids.txt").read_bytes() == b"edited by hand\n"

    # An empty cache must not hide the edit (DVC's status would only say "not in cache").
    cache = repo / ".dvc" / "cache"
    shutil.copytree(cache, repo.parent / "cache-backup")
    shutil.rmtree(cache)
    with pytest.raises(SubsetVersionError, match="modified"):
        store.check_clean()
    shutil.copytree(repo.parent / "cache-backup", cache)

    # checkout --force discards the edit and restores the version exactly.
    store.checkout(v1.tag, force=True)
    assert read_dir(repo / "data") == V1_FILES

    # A missing data/ (e.g. a clone that was never pulled) is not an edit.
    shutil.rmtree(repo / "data")
    store.check_clean()
    assert store.write_version(V2_FILES, V2_META).tag == "subset-v0002"


def test_an_unversioned_data_dir_of_the_user_is_never_replaced(repo, store):
    (repo / "data").mkdir()
    (repo / "data" / "raw.csv").write_text("the user's own data\n")
    with pytest.raises(SubsetVersionError, match="not a subset version.*Nothing was written"):
        store.write_version(V1_FILES, V1_META)
    with pytest.raises(SubsetVersionError, match="data.dvc is missing"):
        store.check_clean()
    assert read_dir(repo / "data") == {"raw.csv": b"the user's own data\n"}
    assert not (repo / ".dvc").exists() and not (repo / "data.dvc").exists()
    assert git(repo, "status", "--porcelain") == "?? data/"


def test_staged_changes_to_the_versioned_paths_are_refused(repo, store):
    v1 = store.write_version(V1_FILES, V1_META)
    (repo / "data.dvc").write_text((repo / "data.dvc").read_text())
    git(repo, "add", "data.dvc")  # e.g. the user pins a subset in their branch
    git(repo, "commit", "-q", "-m", "pin subset")
    store.write_version(V2_FILES, V2_META)  # committed, not staged: fine
    git(repo, "add", "data.dvc")  # now staged and different from HEAD
    staged = git(repo, "diff", "--cached", "--name-only")
    before = (read_dir(repo / "data"), (repo / "data.dvc").read_bytes(), git(repo, "rev-parse", HISTORY_REF))

    with pytest.raises(SubsetVersionError, match="staged changes to data.dvc"):
        store.write_version(V1_FILES, V1_META)
    assert (read_dir(repo / "data"), (repo / "data.dvc").read_bytes(), git(repo, "rev-parse", HISTORY_REF)) == before
    assert git(repo, "diff", "--cached", "--name-only") == staged
    assert [v.tag for v in store.list_versions()] == [v1.tag, "subset-v0002"]


def test_forced_failure_mid_versioning_keeps_previous_version_and_fails_mlflow_run(repo, store, tracker):
    first = record_subset_version(store, selection(0, IDS_1), tracker)
    dvc_file_before = (repo / "data.dvc").read_bytes()
    gitignore_before = (repo / ".gitignore").read_bytes()
    data_before = read_dir(repo / "data")
    # The tag step fails after data/ was swapped, dvc add ran and the history ref moved.
    fail_ref_update(repo, "refs/tags/subset-v0002")

    failing = selection(1, IDS_2)
    failing = SubsetManifest(**{**failing.__dict__, "dagster_run_id": "dagster-run-doomed"})
    with pytest.raises(SubsetVersionError, match="subset-v0002.*rolled back") as info:
        record_subset_version(store, failing, tracker)
    assert info.value.__cause__ is not None

    assert read_dir(repo / "data") == data_before
    assert (repo / "data.dvc").read_bytes() == dvc_file_before
    assert (repo / ".gitignore").read_bytes() == gitignore_before
    assert git(repo, "rev-parse", HISTORY_REF) == first.version.commit
    assert git(repo, "tag", "-l") == "subset-v0001"
    assert store.list_versions() == [first.version]
    assert [p.name for p in repo.iterdir() if p.name.startswith(".data.")] == []
    store.check_clean()

    runs = tracker.client.search_runs(
        [tracker.experiment_id()], "tags.`dagster.run_id` = 'dagster-run-doomed'"
    )
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert "subset-v0002" in runs[0].data.tags["error"]
    assert tracker.client.get_run(first.mlflow_run_id).info.status == "FINISHED"

    (repo / ".git" / "hooks" / "reference-transaction").unlink()
    second = record_subset_version(store, selection(1, IDS_2), tracker)
    assert second.version.tag == "subset-v0002"
    assert SubsetCatalog(store).subset("subset-v0001")["sample_id"].tolist() == IDS_1


def test_failure_on_first_version_leaves_no_trace(repo, store):
    fail_ref_update(repo, "refs/tags/subset-v0001")
    with pytest.raises(SubsetVersionError, match="rolled back"):
        store.write_version(V1_FILES, V1_META)
    assert not (repo / "data").exists()
    assert not (repo / "data.dvc").exists()
    assert (repo / ".gitignore").read_text() == "secrets.env\n"
    assert subprocess.run(
        ["git", "rev-parse", "-q", "--verify", HISTORY_REF], cwd=repo, capture_output=True
    ).returncode != 0
    assert store.list_versions() == []
    assert store.latest() is None


def test_tag_scheme_collisions(repo, store, caplog):
    v1 = store.write_version(V1_FILES, V1_META)
    state = (read_dir(repo / "data"), (repo / "data.dvc").read_bytes(), git(repo, "rev-parse", HISTORY_REF))

    # A lightweight tag with the next version's name: refused before anything is written.
    git(repo, "tag", "subset-v0002", "HEAD")
    with pytest.raises(SubsetVersionError, match="subset-v0002 is already taken.*Nothing was written"):
        store.write_version(V2_FILES, V2_META)
    assert (read_dir(repo / "data"), (repo / "data.dvc").read_bytes(), git(repo, "rev-parse", HISTORY_REF)) == state
    with pytest.raises(SubsetVersionError, match="not a readable subset version"):
        store.get("subset-v0002")

    # An annotated tag in the scheme without metadata is not a version: it is skipped (with a
    # warning when listing) and numbering continues after it.
    git(repo, "tag", "-d", "subset-v0002")
    git(repo, "tag", "-a", "-m", "release notes, not JSON", "subset-v0002", "HEAD")
    with caplog.at_level("WARNING", logger="skmm_pipeline.versioning.dvc_store"):
        assert store.list_versions() == [v1]
    assert "subset-v0002" in caplog.text
    assert store.write_version(V2_FILES, V2_META).tag == "subset-v0003"


def test_concurrent_writers_are_serialised(tmp_path, repo, remote):
    SubsetStore(repo, remote_url=str(remote)).ensure_initialized()
    script = textwrap.dedent("""\
        import sys
        from pathlib import Path
        from skmm_pipeline.versioning.dvc_store import SubsetStore
        k = sys.argv[2]
        v = SubsetStore(Path(sys.argv[1])).write_version({"ids.txt": f"writer {k}\\n".encode()}, {"writer": k})
        print(v.tag)
        """)
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(repo), str(k)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for k in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err for _, err in outputs]
    assert sorted(out.strip() for out, _ in outputs) == ["subset-v0001", "subset-v0002", "subset-v0003"]
    store = SubsetStore(repo)
    versions = store.list_versions()
    assert sorted(v.meta["writer"] for v in versions) == ["0", "1", "2"]
    for v in versions:
        assert store.read_file(v.tag, "ids.txt") == f"writer {v.meta['writer']}\n".encode()
    assert git(repo, "rev-list", "--count", HISTORY_REF) == "3"

    # A writer that cannot get the lock in time says so and writes nothing.
    patient = SubsetStore(repo)
    impatient = SubsetStore(repo, lock_timeout=0.2)
    with patient._locked():
        with pytest.raises(SubsetVersionError, match="another process"):
            impatient.write_version(V1_FILES, V1_META)
    assert len(store.list_versions()) == 3


# ---------------------------------------------------------------------- remote


def test_unreachable_remote_records_locally_and_retries_next_time(tmp_path, repo):
    blocker = tmp_path / "offline"
    blocker.write_text("a file where the remote's parent directory should be")
    store = SubsetStore(repo, remote_url=str(blocker / "remote"))

    v1 = store.write_version(V1_FILES, V1_META)
    assert v1.pushed is False and v1.push_error
    assert store.pending_pushes() == [v1.tag]
    assert store.list_versions() == [v1] and store.get(v1.tag).pushed is False
    assert store.read_file(v1.tag, "ids.txt") == V1_FILES["ids.txt"]
    with pytest.raises(SubsetVersionError, match=r"could not push 1 subset version\(s\) \(subset-v0001\)"):
        store.push_pending()
    assert store.pending_pushes() == [v1.tag]

    # The remote comes back: the next version pushes both.
    blocker.unlink()
    blocker.mkdir()
    v2 = store.write_version(V2_FILES, V2_META)
    assert v2.pushed and store.pending_pushes() == []
    assert all(v.pushed for v in store.list_versions())
    assert store.push_pending() == []

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    assert SubsetStore(clone).read_file(v1.tag, "weights.npy") == V1_FILES["weights.npy"]


def test_no_remote_queues_versions_until_one_is_configured(tmp_path, repo):
    store = SubsetStore(repo)
    v1 = store.write_version(V1_FILES, V1_META)
    assert not v1.pushed and "no default DVC remote" in v1.push_error
    with pytest.raises(SubsetVersionError, match="no default DVC remote"):
        store.push_pending()
    remote = tmp_path / "late-remote"
    SubsetStore(repo, remote_url=str(remote)).ensure_initialized()
    assert store.push_pending() == [v1.tag]
    assert store.pending_pushes() == [] and any(p.is_file() for p in remote.rglob("*"))


# ---------------------------------------------------------------------- degraded mode


def test_without_git_versions_are_content_hashes(tmp_path, remote, isolated_git, caplog):
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(SubsetVersionError, match="not a git work tree"):
        SubsetStore(plain, mode="git").write_version(V1_FILES, V1_META)
    assert not (plain / ".dvc").exists()

    store = SubsetStore(plain, remote_url=str(remote))
    with caplog.at_level("WARNING", logger="skmm_pipeline.versioning.dvc_store"):
        v1 = store.write_version(*_files_meta(selection(0, IDS_1)))
    assert "degraded mode" in caplog.text
    v2 = store.write_version(*_files_meta(selection(1, IDS_2)))
    assert store.uses_git() is False and v1.commit == ""
    assert v1.tag == f"subset-{v1.data_md5[:12]}" and v1.pushed and v2.pushed
    again = store.write_version(*_files_meta(selection(0, IDS_1)))  # same content, same version
    assert again.tag == v1.tag
    assert [v.tag for v in store.list_versions()] == [v1.tag, v2.tag]

    catalog = SubsetCatalog(store)
    assert catalog.versions()["tag"].tolist() == [v1.tag, v2.tag]
    assert catalog.subset(v1.tag)["sample_id"].tolist() == IDS_1
    diff = catalog.diff(v1.tag, v2.tag)
    assert set(diff.added["sample_id"]) == set(IDS_2) - set(IDS_1)
    store.checkout(v1.tag)
    assert read_dir(plain / "data") == selection(0, IDS_1).files()

    # A copy without the DVC cache reads any version from the remote.
    copy = tmp_path / "copy"
    shutil.copytree(plain, copy, ignore=shutil.ignore_patterns("cache"))
    assert not (copy / ".dvc" / "cache").exists()
    other = SubsetStore(copy)
    assert other.read_file(v2.tag, "subset.csv") == selection(1, IDS_2).files()["subset.csv"]
    other.checkout(v2.tag)
    assert read_dir(copy / "data") == selection(1, IDS_2).files()

    # A damaged cache object is detected, not returned.
    record = json.loads((copy / ".skmm-versions" / "records" / f"{v2.tag}.json").read_text())
    assert v2.data_md5 in record["dvc_file"] and record["meta"]["seed"] == 1
    victim = next(p for p in (copy / ".dvc" / "cache").rglob("*") if p.is_file() and not p.name.endswith(".dir"))
    victim.chmod(0o644)
    victim.write_bytes(b"bit rot")
    with pytest.raises(SubsetVersionError, match="corrupt"):
        for name in ("subset.csv", "manifest.json"):
            other.read_file(v2.tag, name)


# ---------------------------------------------------------------------- bad input


def test_corrupt_manifest_is_refused_or_reported(repo, store, caplog):
    good = selection(0, IDS_1).files()
    for files, match in (
        ({**good, "manifest.json": b"{not json"}, "manifest.json to be versioned is corrupt"),
        ({**good, "manifest.json": b"[1, 2]"}, "expected a JSON object"),
        ({**good, "subset.csv": good["subset.csv"].replace(b"s1/3,s1,3,", b"s1/7,s1,7,")}, "does not match"),
        ({"subset.csv": b"id,weight\n1,0.5\n"}, "no sample_id column"),
    ):
        with pytest.raises(SubsetVersionError, match=match):
            store.write_version(files, {"method": "skmm"})
    assert not (repo / "data").exists() and store.list_versions() == []

    v1 = store.write_version(good, selection(0, IDS_1).tag_meta())
    catalog = SubsetCatalog(store)
    # The manifest object is damaged in the local cache (e.g. disk corruption).
    manifest_obj = next(
        p for p in (repo / ".dvc" / "cache").rglob("*")
        if p.is_file() and p.read_bytes() == good["manifest.json"]
    )
    manifest_obj.chmod(0o644)
    manifest_obj.write_bytes(b'{"truncated": ')
    with pytest.raises(SubsetVersionError, match="manifest.json of subset-v0001 is corrupt"):
        catalog.manifest(v1.tag)
    assert catalog.subset(v1.tag)["sample_id"].tolist() == IDS_1  # the rest stays readable

    # A version tag whose JSON metadata was damaged is reported, not listed as a version.
    git(repo, "tag", "-a", "-f", "-m", "skmm subset\n\n{broken", "subset-v0001", v1.commit)
    with caplog.at_level("WARNING", logger="skmm_pipeline.versioning.dvc_store"):
        assert store.list_versions() == []
    assert "no valid JSON metadata" in caplog.text


def test_unknown_tags_and_bad_arguments_give_clear_errors(tmp_path, repo, store):
    with pytest.raises(SubsetVersionError, match="repo_root must be absolute"):
        SubsetStore("relative/repo")
    with pytest.raises(SubsetVersionError, match="mode must be one of"):
        SubsetStore(repo, mode="svn")
    with pytest.raises(SubsetVersionError, match="unknown subset version 'subset-v0001'.*no versions"):
        store.get("subset-v0001")

    for bad in ("sub/ids.txt", "../escape", ".."):
        with pytest.raises(SubsetVersionError, match="file name"):
            store.write_version({bad: b"x"}, {})
    with pytest.raises(SubsetVersionError, match="JSON"):
        store.write_version(V1_FILES, {"bad": object()})
    assert not (repo / "data").exists()

    store.write_version(V1_FILES, V1_META)
    catalog = SubsetCatalog(store)
    for call in (
        lambda: store.read_file("subset-v0099", "ids.txt"),
        lambda: store.read_file("main", "ids.txt"),
        lambda: store.checkout("subset-v0099"),
        lambda: catalog.diff("subset-v0001", "nope"),
        lambda: catalog.show("subset-0001"),
    ):
        with pytest.raises(SubsetVersionError, match=r"unknown subset version .*known: subset-v0001"):
            call()
    with pytest.raises(SubsetVersionError, match="file name"):
        store.read_file("subset-v0001", "sub/ids.txt")
    with pytest.raises(SubsetVersionError, match="subset.csv"):
        catalog.subset("subset-v0001")  # a version written without the subset files


def test_fallback_identity_when_git_has_none(repo, remote, isolated_git):
    for who in ("AUTHOR", "COMMITTER"):
        isolated_git.delenv(f"GIT_{who}_NAME")
        isolated_git.delenv(f"GIT_{who}_EMAIL")
    isolated_git.delenv("EMAIL", raising=False)
    version = SubsetStore(repo, remote_url=str(remote)).write_version(V1_FILES, V1_META)
    tagger = git(repo, "tag", "-l", "--format=%(taggername) %(taggeremail)", version.tag)
    assert tagger == "skmm-pipeline <skmm-pipeline@localhost>"


# ---------------------------------------------------------------------- command line


def test_versions_cli(tmp_path, repo, store, tracker, capsys):
    recorded = [record_subset_version(store, selection(k, ids), tracker)
                for k, ids in enumerate((IDS_1, IDS_2))]
    with tracker.run("finetune_eval", tags=run_tags(version=recorded[1].version)) as run:
        run.log_eval_metrics([{"method": "skmm", "n": 12, "test_accuracy": 0.8125}])

    def skmm(*args: str) -> tuple[int, str, str]:
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, _ = skmm("versions", "list", "--repo", str(repo), "--mlflow", tracker.tracking_uri)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["tag", "date", "method", "n", "test_accuracy", "shards", "pushed"]
    assert lines[1].split()[0] == "subset-v0001" and lines[1].split()[-3:] == ["-", "s0,s1", "yes"]
    assert "0.8125" in lines[2] and "UTC" in lines[2]

    code, out, _ = skmm("versions", "list", "--repo", str(repo), "--mlflow", "none", "--format", "csv")
    assert code == 0 and out.splitlines()[0].startswith("tag,date,method,n,seed,c_S,test_accuracy,shards")

    code, out, _ = skmm("versions", "show", "subset-v0002", "--repo", str(repo), "--mlflow", tracker.tracking_uri)
    assert code == 0 and "method skmm  n 12" in out and "test_accuracy/skmm" in out
    assert recorded[1].mlflow_run_id in out and "s0/4" in out

    code, out, _ = skmm("versions", "diff", "subset-v0001", "subset-v0002", "--repo", str(repo), "--mlflow", "none")
    added, removed = set(IDS_2) - set(IDS_1), set(IDS_1) - set(IDS_2)
    assert code == 0 and f"overlap {len(set(IDS_1) & set(IDS_2))}" in out
    assert f"added ({len(added)}): " + " ".join(sorted(added, key=IDS_2.index)) in out
    assert f"removed ({len(removed)})" in out and "moment_ratio" in out

    code, out, _ = skmm("versions", "checkout", "subset-v0001", "--repo", str(repo))
    assert code == 0 and "restored to subset-v0001" in out
    assert read_dir(repo / "data") == recorded[0].manifest.files()

    code, out, _ = skmm("versions", "push", "--repo", str(repo))
    assert code == 0 and out.strip() == "nothing to push"

    code, out, err = skmm("versions", "show", "subset-v0042", "--repo", str(repo))
    assert code == 2 and err.startswith("skmm: error: unknown subset version 'subset-v0042'")
    assert "Traceback" not in err

    # An unreadable MLflow store costs the metrics column, not the listing.
    code, out, err = skmm("versions", "list", "--repo", str(repo), "--mlflow", "sqlite:///relative.db")
    assert code == 0 and "subset-v0002" in out and "skmm: warning" in err


# A write beyond RLIMIT_FSIZE fails (EFBIG) as one on a full disk fails (ENOSPC): part-way, with an OSError.
FULL_DISK = """
import resource, signal, sys
from skmm_pipeline.versioning.dvc_store import SubsetStore, SubsetVersionError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = 1 << 20
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    SubsetStore(sys.argv[1], remote_url=sys.argv[2]).write_version({"ids.txt": b"9\\n", "big.bin": bytes(2 * limit)},
                                                                   {"method": "skmm", "n": 1})
except SubsetVersionError as exc:
    print(f"refused: {exc}")
"""


def test_a_disk_that_fills_up_mid_version_rolls_it_back_and_the_next_write_works(repo, remote, store):
    v1 = store.write_version(V1_FILES, V1_META)
    before = read_dir(repo / "data"), (repo / "data.dvc").read_bytes(), git(repo, "status", "--porcelain")
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(repo), str(remote)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("refused: writing subset-v0002 failed"), out.stderr[-2000:]
    assert "rolled back" in out.stdout and out.stdout.count("\n") == 1
    assert (read_dir(repo / "data"), (repo / "data.dvc").read_bytes(), git(repo, "status", "--porcelain")) == before
    assert store.list_versions() == [v1] and store.pending_pushes() == []
    assert not [p for p in repo.rglob("*") if p.name.startswith(".data.") or p.name.endswith(".tmp")]
    v2 = store.write_version(V2_FILES, V2_META)
    assert v2.tag == "subset-v0002" and v2.pushed
