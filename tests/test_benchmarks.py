"""Every benchmark script runs: a `--quick` smoke run of each, as a user would start it (a real process).

The numbers of these runs mean nothing (seconds of work, a few seeds); the full runs are documented in
docs/benchmarks.md. gpu_sketch.py is smoke-tested in test_sketch_device.py, publish_docs.py in
test_docs.py; ui_screenshots.py needs a browser and is run by hand.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# script -> a line its quick run must print
EXPECT = {
    "gmm.py": "n=48: skmm",
    "selection_speed.py": "== selection speed, large",
    "sketch_throughput.py": "ft1_throughput_ratio",
    "digits_transfer.py": "ft1_skmm_never_below_uniform",
    "digits_curation.py": "corrupted",
    "incremental.py": "sketch_work_ratio_k2",
    "scenarios.py": "Goals per scenario",
    "versions_list_speed.py": "list_seconds",
    "composable.py": "incremental_candidate_work_ratio",
    "composable_dagster.py": "dagster_to_in_process_wall_ratio",
    "class_probes.py": "## Selection, digits transfer",
}


@pytest.mark.parametrize("script", sorted(EXPECT))
def test_benchmark_quick_run(script, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert EXPECT[script] in proc.stdout, proc.stdout[-2000:]


def test_every_benchmark_script_is_covered():
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py")}
    assert scripts - set(EXPECT) == {"gpu_sketch.py", "publish_docs.py", "ui_screenshots.py"}
