"""The layers import downward only: core <- datamodules <- lightning_modules / callbacks <- experiments. Every import
statement counts, those inside functions too (a lazy import is still an upward dependency)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the project packages it must never import
FORBIDDEN = {
    "core": {"datamodules", "lightning_modules", "callbacks", "experiments", "benchmarks"},
    "datamodules": {"lightning_modules", "callbacks", "experiments", "benchmarks"},
    "lightning_modules": {"experiments", "benchmarks"},
    "callbacks": {"experiments", "benchmarks"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every import in a file, wherever it stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.module.split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_import(package: str) -> None:
    upward = [f"{path.relative_to(ROOT)}:{line} imports {top}"
              for path in sorted((ROOT / package).rglob("*.py"))
              for top, line in sorted(imported_packages(path)) if top in FORBIDDEN[package]]
    assert not upward, "\n".join(upward)


def test_the_walk_sees_lazy_imports(tmp_path) -> None:
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from lightning_modules.backbones import SmallCNN\n    return SmallCNN\n")
    assert ("lightning_modules", 2) in imported_packages(source)


@pytest.mark.slow  # 6 s: a fresh interpreter; the static import-layer test stays fast
def test_data_layer_loads_without_systems() -> None:
    """Importing the data layer (and using it to build a backbone) leaves lightning_modules unimported."""
    code = ("import sys, datamodules, datamodules.checkpoint, datamodules.lf_pattern, core.backbones as b; "
            "b.build_backbone({'class_path': 'small_cnn'}, 10); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning_modules', 'experiments')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
