"""Importing a user's code by a name on the command line: a module path or a ``.py`` file.

Shared by user tasks (``--task my_pkg.mod:MyTask``) and plugin algorithms (``--plugin
my_pkg.algos``). A file is imported under a stable module name derived from its absolute
path, so the launcher, every worker and a pickle agree on it, and importing it twice runs
it once (a plugin's ``@register`` would otherwise see its own name taken).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from types import ModuleType


def is_file(target: str) -> bool:
    """True when ``target`` names a file (``dir/x.py``), False for a module path."""
    return target.endswith(".py") or "/" in target or "\\" in target


def file_module_name(path: str, prefix: str) -> str:
    """The module name a file at ``path`` is imported under."""
    return prefix + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]


def import_target(target: str, what: str, prefix: str = "accord_user_") -> ModuleType:
    """The module ``target`` names (a dotted module path, or a ``.py`` file); a one-line
    ValueError starting with ``what`` when it cannot be imported."""
    try:
        if is_file(target):
            path = os.path.abspath(target)
            if not os.path.isfile(path):
                raise ValueError(f"{what}: no file {path}")
            mod_name = file_module_name(path, prefix)
            module = sys.modules.get(mod_name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(mod_name, path)
                if loader_spec is None or loader_spec.loader is None:
                    raise ValueError(f"{what}: {path} is not a Python file")
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[mod_name] = module
                try:
                    loader_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[mod_name]
                    raise
            return module
        if not target or not all(part.isidentifier() for part in target.split(".")):
            raise ValueError(f"{what}: {target!r} is not a module path; allowed: "
                             "my_pkg.my_mod or path/to/file.py")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` would find it
        return importlib.import_module(target)
    except ValueError:
        raise
    except ModuleNotFoundError as e:
        raise ValueError(f"{what}: cannot import {target!r} ({e}); allowed: a module on "
                         "PYTHONPATH or in the current directory, or a .py file") from None
    except Exception as e:  # noqa: BLE001 - the user's module failed to import
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"{what}: importing {target!r} failed: "
                         f"{type(e).__name__}: {first}") from None


def file_sha256(path: str | None) -> str | None:
    """The SHA-256 of the file at ``path`` (None when there is no file or it cannot be read)."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def code_source(spec: str, path: str | None) -> dict[str, str | None]:
    """What a run records of user code named by ``spec``: the spec, the file it came from and
    that file's SHA-256 (a later run tells an edited file from the one that ran)."""
    return {"spec": spec, "file": path, "sha256": file_sha256(path)}
