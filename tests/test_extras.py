"""Optional integrations: ``import accord`` needs none of them, and a missing one fails
with one line naming the extra that installs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from accord._extras import MissingExtra, require


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_import_accord_imports_no_integration():
    proc = _python("import sys, accord; print(sorted(m for m in ('lightning', 'accelerate', "
                   "'ray') if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("module,extra", [("lightning", "lightning"),
                                          ("accelerate", "accelerate")])
def test_a_missing_integration_is_one_line_naming_the_extra(module, extra):
    # the package made unimportable, as if it were not installed
    proc = _python(f"import sys; sys.modules[{module!r}] = None\n"
                   f"import accord.integrations.{module}")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("accord._extras.MissingExtra: ")
    assert f"pip install 'accord[{extra}]'" in last


def test_require_names_the_extra():
    with pytest.raises(MissingExtra, match=r"pip install 'accord\[nothing\]'"):
        require("a_package_that_does_not_exist_here", "nothing")
