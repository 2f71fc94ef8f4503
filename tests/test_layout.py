"""The package's layout (issue 22): no module under ``src/accord`` over ``MAX_LINES`` lines
(the aim is ~600; the margin lets a module grow by a docstring without failing), and the
site's layout page (docs/design/layout.md) names every package and module of the tree."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "accord"
MAX_LINES = 650


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_no_module_is_over_the_limit():
    over = {p.relative_to(SRC).as_posix(): n for p in sorted(SRC.rglob("*.py"))
            if (n := _lines(p)) > MAX_LINES}
    assert not over, (f"over {MAX_LINES} lines: {over}; split the module into cohesive "
                      "modules (e.g. a package, as src/accord/report/ and src/accord/bench/)")


def test_the_layout_page_names_every_package_and_module():
    section = (ROOT / "docs" / "design" / "layout.md").read_text(encoding="utf-8")
    named = set(re.findall(r"[\w/]+\.py|[\w]+/", section))
    tree = {p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
            if p.parent == SRC or p.name != "__init__.py"}
    packages = {p.relative_to(SRC).as_posix() + "/" for p in SRC.iterdir()
                if p.is_dir() and (p / "__init__.py").exists()}
    # a module is named by its file name under its package's line (or its full path); the
    # algorithms, one file each, are named by the site's algorithm pages instead
    missing = sorted(m for m in tree | packages
                     if m not in named and m.rsplit("/", 1)[-1] not in named
                     and not m.rsplit("/", 1)[-1].startswith("_")
                     and not m.startswith("algorithms/"))
    assert not missing, f"docs/design/layout.md does not name: {missing}"


def test_every_algorithm_module_has_its_page():
    pages = {p.stem for p in (ROOT / "docs" / "algorithms").glob("*.md")}
    modules = {p.stem for p in (SRC / "algorithms").glob("*.py") if not p.name.startswith("_")}
    assert not modules - pages, f"algorithms without a page in docs/algorithms/: {modules - pages}"
