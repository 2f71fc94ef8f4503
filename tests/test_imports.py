"""The layers hold: the import-linter contract of pyproject.toml (the application -- cli,
bench, report, the run modules -- above the library -- algorithms, core, comm,
checkpoint), with no import circle across layers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_contract_is_kept():
    linter = Path(sys.executable).parent / "lint-imports"
    if not linter.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    res = subprocess.run([str(linter)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_a_broken_layer_is_caught(tmp_path):
    """The contract can fail: the same layers with the library placed above the
    application break it (checked so the test above cannot pass by reading nothing)."""
    linter = Path(sys.executable).parent / "lint-imports"
    if not linter.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    cfg = tmp_path / "inverted.toml"
    cfg.write_text('[tool.importlinter]\nroot_package = "accord"\n\n'
                   '[[tool.importlinter.contracts]]\nname = "inverted"\ntype = "layers"\n'
                   'layers = ["accord.core", "accord.cli"]\n')
    res = subprocess.run([str(linter), str(cfg)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode != 0 and "BROKEN" in res.stdout
