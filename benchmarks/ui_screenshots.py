"""Screenshots of the Dagster UI for this project, so the UI is seen rather than assumed.

Needs Debian's `chromium` and `pip install playwright` (no browser download: the system Chromium is
used). Run after `make demo` so the instance has materializations to show:

    .venv/bin/python benchmarks/ui_screenshots.py [--out ui-screenshots]

Starts `dagster dev` on a free loopback port with the project's dagster_home, captures the asset
graph and the skmm_selection asset page, and stops the server's whole process group.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def dismiss_modal(page) -> None:
    for label in ("Skip", "Dismiss", "Close"):
        button = page.get_by_role("button", name=label)
        if button.count():
            button.first.click()
            page.wait_for_timeout(500)


def main() -> None:
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - optional: installed only to take screenshots

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "ui-screenshots"))
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(ROOT / "dagster_home"), "SKMM_PROJECT_ROOT": str(ROOT)}
    log = open(out / "dagster-dev.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "dagster", "dev", "-m", "skmm_pipeline.definitions", "-h", "127.0.0.1", "-p", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/server_info", 120)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            shots = {
                "asset-graph.png": f"{base}/asset-groups",
                "skmm-selection.png": f"{base}/assets/skmm_selection",
                "finetune-eval.png": f"{base}/assets/finetune_eval",
                "checks.png": f"{base}/assets/skmm_selection?view=checks",
            }
            for name, url in shots.items():
                page.goto(url)
                page.wait_for_load_state("networkidle")
                page.wait_for_timeout(2500)
                dismiss_modal(page)
                page.screenshot(path=str(out / name), full_page=False)
                print(f"{name}: {url}")
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    print(f"screenshots_dir: {out}")


if __name__ == "__main__":
    main()
