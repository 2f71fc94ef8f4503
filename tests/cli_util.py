"""Calling ``accord`` in-process, with no worker started: what the command line does with
an input before any run begins (spawning a process per case would be far too slow for
the hostile-input tier)."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from accord import bench, cli


class Launched(Exception):  # noqa: N818 - a signal, not an error
    """Raised in place of starting workers: the input was accepted."""

    def __init__(self, what: object) -> None:
        super().__init__("launched")
        self.what = what


def _launch(cfg, *args, **kwargs):
    raise Launched(cfg)


def no_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every route that would start workers raises :class:`Launched` instead."""
    import accord.ft.launcher

    monkeypatch.setattr(cli, "launch", _launch)
    monkeypatch.setattr(accord.ft.launcher, "ft_launch", _launch)
    monkeypatch.setattr(bench, "run_bench", _launch)
    monkeypatch.setattr(bench, "run_tuned", _launch)


def run_cli(argv: list[str]) -> tuple[int | str, list[str], str]:
    """``accord ARGV`` in this process: its exit status (``"launched"`` when it got as far
    as starting workers), its stderr lines and its stdout. A traceback (any other
    exception) propagates: that is a failure of the test."""
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            code: int | str = cli.main(argv)
        except SystemExit as e:  # argparse's own refusals
            code = e.code if isinstance(e.code, int) else 1
        except Launched:
            code = "launched"
    return code, err.getvalue().splitlines(), out.getvalue()


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``root`` with its size and modification time: what
    "nothing written" compares."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.stat()
            found[str(p.relative_to(root))] = (st.st_size if p.is_file() else -1,
                                               st.st_mtime_ns)
    return found
