"""The installed package: a wheel carries every config and the LICENSE, and `backdoor-bench` works outside a
checkout (grid files and configs found in the installed configs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, source / name)
    for name in ("core", "lightning_modules", "datamodules", "callbacks", "experiments", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp / "site"),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return tmp


def test_wheel_carries_configs_license_and_entry_point(installed) -> None:
    names = zipfile.ZipFile(next((installed / "dist").glob("*.whl"))).namelist()
    shipped = {n for n in names if n.startswith("configs/") and n.endswith(".yaml")}
    assert shipped == {f"configs/{p.relative_to(CONFIGS).as_posix()}" for p in CONFIGS.rglob("*.yaml")}
    assert any(n.endswith("licenses/LICENSE") or n.endswith("/LICENSE") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "backdoor-bench = experiments.entry:main" in zipfile.ZipFile(
        next((installed / "dist").glob("*.whl"))).read(entry).decode()


@pytest.mark.parametrize("args, expected", [
    # 6 s each (a fresh interpreter): the CLI with the shipped configs in the fast suite, the other two -m slow
    pytest.param(["grid", "count", "configs/grids/quickstart.yaml"], "quickstart: 2 attacked models, 42 defense runs",
                 marks=pytest.mark.slow),
    (["fit", "--config", "configs/quickstart.yaml", "--print_config"], "class_path: datamodules.BackdoorDataModule"),
    pytest.param(["prepare", "--help"], "usage:", marks=pytest.mark.slow),
])
def test_backdoor_bench_outside_a_checkout(installed, tmp_path, args, expected) -> None:
    env = {**os.environ, "PYTHONPATH": str(installed / "site")}
    proc = subprocess.run([str(installed / "site" / "bin" / "backdoor-bench"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expected in proc.stdout
    assert "Traceback" not in proc.stderr and "LightningCLI's args parameter" not in proc.stderr
