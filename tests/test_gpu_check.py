"""benchmarks/gpu_check.sh, the prepared GPU check, in its CPU dry run: every stage runs and its report is whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~40 s of worker pools and CLI runs on 2 cores: over the fast suite's budget
def test_gpu_check_dry_run(tmp_path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["machine"]["dry_run"] and report["training_speed"]["ratio"] > 0
    one, two = report["stages"]
    assert (one["jobs_per_device"], one["runs"], two["jobs_per_device"], two["runs"]) == (1, 4, 2, 8)
    for stage in (one, two):
        assert set(stage["per_defense_median_s"]) == {"FT", "ANP", "SAU", "NC"}
        assert all(v["total"] >= v["method"] > 0 for v in stage["per_defense_median_s"].values())
    # the first run on the attacked model measures "before", every later one reads it
    assert one["before_sources"] == ["cache", "measured"] and two["before_sources"] == ["cache"]
    p = report["projection"]
    assert (p["attacked_models"], p["defense_runs"]) == (288, 124_128)
    assert p["total_gpu_hours"] == p["attack_gpu_hours"] + p["defense_gpu_hours"] > 0
    assert "(c) survey grid: 288 attacked models" in done.stdout
