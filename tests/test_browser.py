"""The UIs as a person sees them: headless Chromium (Debian's package, driven by Playwright) over
`dagster dev` and `mlflow ui` on loopback, after one tiny demo run.

Asserts that images really render (loaded, non-empty) and that tables show the methods; screenshots go
to ``ui-screenshots/browser-test/`` (``$SKMM_SCREENSHOTS`` overrides it). Skipped only where Chromium
or Playwright is not installed (`.ci/run` installs both).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import git
from procs import free_port, http_ok, start, stop, wait_for

from skmm_pipeline.tracking.mlflow_store import experiment_url, run_url

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = Path(os.environ.get("SKMM_SCREENSHOTS") or ROOT / "ui-screenshots" / "browser-test")

if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (as .ci/run does) to run the "
                "browser test", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (`pip install -e .[test]`)")

DEMO = """
import json, sys
from pathlib import Path
from skmm_pipeline.demo import run_demo
record = run_demo(Path(sys.argv[1]), budget=12, pretrain_epochs=2, log=lambda *_: None)
print(json.dumps({k: record[k] for k in ("mlflow_run_id", "mlflow_tracking_uri", "dvc_tag")}))
"""


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One demo run (budget 12, 2 pretraining epochs), then `dagster dev` and `mlflow ui` over it."""
    tmp = tmp_path_factory.mktemp("browser")
    project, home = tmp / "project", tmp / "dagster_home"
    project.mkdir()
    home.mkdir()
    git(project, "init", "-q", "-b", "main")
    git(project, "commit", "-q", "--allow-empty", "-m", "initial")
    (home / "dagster.yaml").write_text((ROOT / "dagster_home" / "dagster.yaml").read_text())
    dagster_port, mlflow_port = free_port(), free_port()
    dagster, mlflow = f"http://127.0.0.1:{dagster_port}", f"http://127.0.0.1:{mlflow_port}"
    env = {**os.environ, "DAGSTER_HOME": str(home), "SKMM_PROJECT_ROOT": str(project),
           "SKMM_MLFLOW_UI_URL": mlflow, "SKMM_DAGSTER_UI_URL": dagster}
    demo = subprocess.run([sys.executable, "-c", DEMO, str(project)], env=env, cwd=project, capture_output=True,
                          text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-4000:]
    record = json.loads(demo.stdout.strip().splitlines()[-1])
    procs = [
        start([sys.executable, "-m", "dagster", "dev", "-m", "skmm_pipeline.definitions", "-h", "127.0.0.1",
               "-p", str(dagster_port)], tmp / "dagster-dev.log", env=env, cwd=project),
        start([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", record["mlflow_tracking_uri"],
               "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"], tmp / "mlflow-ui.log",
              env=env, cwd=project),
    ]
    try:
        wait_for(lambda: http_ok(f"{dagster}/server_info"), 180, "dagster dev")
        wait_for(lambda: http_ok(f"{mlflow}/health"), 120, "mlflow ui")
        yield {"dagster": dagster, "mlflow": mlflow, **record}
    finally:
        for proc in procs:
            stop(proc, timeout=30)


@pytest.fixture(scope="module")
def page(servers):
    if SHOTS.exists():
        shutil.rmtree(SHOTS)
    SHOTS.mkdir(parents=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1100})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def rendered_images(page, selector: str, count: int = 1) -> list[dict]:
    """Wait until ``count`` images matching ``selector`` have loaded; their src and natural sizes."""
    page.wait_for_function(
        f"() => [...document.querySelectorAll({json.dumps(selector)})].filter(i => i.complete && i.naturalWidth > 0)"
        f".length >= {count}")
    return page.eval_on_selector_all(
        selector, "els => els.map(i => ({src: i.src.slice(0, 120), w: i.naturalWidth, h: i.naturalHeight}))")


def dismiss(page) -> None:
    """Close the Dagster UI's first-visit community dialog (shown once per browser profile)."""
    if getattr(page, "_dismissed", False):
        return
    button = page.get_by_role("button", name="Skip")
    try:
        button.wait_for(timeout=10_000)
    except sync_api.TimeoutError:
        return
    button.click()
    page._dismissed = True


def test_asset_graph_shows_the_lineage(servers, page):
    # Everything upstream of finetune_eval, group boxes (ingest, sketch, select, ...) around their assets.
    page.goto(f"{servers['dagster']}/assets/finetune_eval?view=lineage&lineageScope=upstream&lineageDepth=10")
    page.get_by_text("validation_sketch").first.wait_for()
    dismiss(page)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(SHOTS / "asset-graph.png"))
    for asset in ("raw_shard", "gradient_sketch", "validation_sketch", "skmm_selection", "subset_version", "finetune_eval"):
        assert page.get_by_text(asset).count(), asset


def test_finetune_eval_shows_plot_grid_and_results(servers, page):
    page.goto(f"{servers['dagster']}/assets/finetune_eval")
    dismiss(page)
    images = rendered_images(page, "img[src*='get-artifact']", count=3)
    page.screenshot(path=str(SHOTS / "finetune-eval.png"), full_page=True)
    assert {i["src"].split("path=plots/")[-1].split("&")[0] for i in images} == {"accuracy.png", "subset_grid.png",
                                                                                 "versions.png"}
    assert all(i["w"] >= 250 and i["h"] >= 150 for i in images), images
    page.get_by_role("cell", name="uniform (x5)").first.wait_for()
    assert page.get_by_role("cell", name="skmm", exact=True).count() and page.get_by_role("cell", name="full pool").count()


def test_skmm_selection_shows_diagnostics_and_grid(servers, page):
    page.goto(f"{servers['dagster']}/assets/skmm_selection")
    dismiss(page)
    page.get_by_role("cell", name="moment_ratio").first.wait_for()
    page.screenshot(path=str(SHOTS / "skmm-selection.png"), full_page=True)
    row = page.locator("tr", has=page.get_by_text("subset_grid", exact=True)).first
    row.get_by_text("[Show Markdown]").click()
    grid = rendered_images(page, "[role=dialog] img[src^='data:image/png']")
    assert grid[0]["w"] >= 250 and grid[0]["h"] >= 300, grid
    page.screenshot(path=str(SHOTS / "skmm-selection-grid.png"))


def test_mlflow_run_page(servers, page):
    page.goto(f"{servers['mlflow']}/#/experiments")
    page.get_by_text("skmm").first.wait_for()
    run = subprocess.run([sys.executable, "-c", (
        "import sys, json; from mlflow.tracking import MlflowClient; c = MlflowClient(sys.argv[1]); r = c.get_run(sys.argv[2]);"
        "e = c.get_experiment(r.info.experiment_id);"
        "print(json.dumps([r.info.run_name, e.experiment_id, e.tags, r.data.tags['dagster.run_id']]))"),
        servers["mlflow_tracking_uri"], servers["mlflow_run_id"]], capture_output=True, text=True, timeout=120)
    name, experiment, tags, dagster_run = json.loads(run.stdout.strip().splitlines()[-1])
    assert name == f"{servers['dvc_tag']}-skmm-n12" and tags["mlflow.experimentKind"] == "custom_model_development"
    page.goto(experiment_url(servers["mlflow"], experiment))
    page.get_by_text(name).first.wait_for()  # the runs table, not the GenAI overview
    page.wait_for_timeout(1500)
    page.screenshot(path=str(SHOTS / "mlflow-experiment.png"))
    page.goto(run_url(servers["mlflow"], experiment, servers["mlflow_run_id"]))
    page.get_by_text(name).first.wait_for()
    link = page.locator(f"a[href='{servers['dagster']}/runs/{dagster_run}']").first
    link.wait_for()  # the run's description links the Dagster run
    page.screenshot(path=str(SHOTS / "mlflow-run.png"), full_page=True)
    page.get_by_text("Artifacts", exact=True).first.click()
    page.get_by_text("plots", exact=True).first.click()
    page.get_by_text("subset_grid.png", exact=True).first.click()
    # The artifact viewer's <img> (its src is a blob or artifact URL, depending on the MLflow version).
    page.wait_for_function("() => [...document.images].some(i => i.complete && i.naturalWidth >= 250)")
    page.screenshot(path=str(SHOTS / "mlflow-artifact-grid.png"))
