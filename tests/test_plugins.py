"""Algorithms from outside the package: what each class declares is all accord asks, a
plugin (``--plugin``, an entry point) runs in train, bench, report, ``--compress`` and
``--fault-tolerant`` as a built-in one does, and a bad one is one line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_util import no_workers, run_cli

import accord
from accord import algorithms
from accord.algorithms import REGISTRY, load_plugin, register
from accord.core import Aggregator

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "plugin_algorithm.py"
SRC = ROOT / "src"
RELAXED_DESCRIPTION = ("relaxed model averaging: move a fraction gamma toward the mean every "
                       "period")

# The capabilities of the built-in algorithms, written down from their papers and
# communication patterns (an oracle: a declaration that changes by accident fails here).
# name: (phase, compressible, low_rank, ddp_hook_form, fault-tolerant, reads_loss,
#        scale_invariant, linear)
BUILTIN = {
    "allreduce": ("gradient", True, True, "average", True, False, False, True),
    "normalized": ("gradient", True, True, "combine", True, False, True, False),
    "acga": ("gradient", True, True, "sum_then_combine", True, False, True, False),
    "adasum": ("gradient", False, False, "combine", False, False, False, False),
    "local_sgd": ("model", True, True, None, True, False, False, False),
    "easgd": ("model", True, False, None, True, False, False, False),
    "diloco": ("model", True, True, None, True, False, False, False),
    "streaming_diloco": ("model", True, True, None, False, False, False, False),
    "grawa": ("model", True, False, None, True, False, False, False),
    "wagma": ("model", True, False, None, False, False, False, False),
    "gossip": ("model", False, False, None, False, False, False, False),
    "dpsgd": ("model", False, False, None, False, False, False, False),
    "elastic_gossip": ("model", False, False, None, False, False, False, False),
    "lsgd": ("model", False, False, None, False, True, False, False),
}


def env() -> dict[str, str]:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "RUST_LOG": "warn",
           "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        out.pop(var, None)
    return out


def accord_cli(*args: str, timeout: float = 240, cwd: Path | None = None,
               extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "accord", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env={**env(), **(extra_env or {})})


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_built_in_algorithms_declare_what_they_do():
    for name, expected in BUILTIN.items():
        cls = REGISTRY[name]
        got = (cls.phase, cls.compressible, cls.low_rank, cls.ddp_hook_form,
               cls.fault_tolerant is not None, cls.reads_loss, cls.scale_invariant, cls.linear)
        assert got == expected, name
        assert cls.fault_tolerant or cls.ft_refusal
    # post-local SGD averages gradients during its warm-up, easgd's async mode is refused
    assert REGISTRY["local_sgd"].rewrites_gradients({"warmup_steps": 3})
    assert not REGISTRY["local_sgd"].rewrites_gradients({"warmup_steps": 0})
    with pytest.raises(ValueError, match="asynchronous=true is refused"):
        REGISTRY["easgd"].check_fault_tolerant({"asynchronous": True})


def test_no_module_outside_the_algorithms_names_one():
    """The facts live on the classes: no capability table elsewhere in the library lists
    algorithm names (the bench's presets and the report's baseline are matrices, not
    facts about an algorithm)."""
    names = [n for n in BUILTIN if n not in ("allreduce",)]
    exempt = {"bench", "report", "algorithms", "tasks"}
    offenders = []
    for path in (SRC / "accord").rglob("*.py"):
        rel = path.relative_to(SRC / "accord")
        if rel.parts[0] in exempt or rel.stem in exempt:
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if any(f'"{n}"' in code or f"'{n}'" in code for n in names):
                offenders.append(f"{rel}:{lineno}: {line.strip()}")
    # docstring examples ("acga" in a usage line) are text, not tables: allow `accord.` calls
    offenders = [o for o in offenders if "accord." not in o and "AccordStrategy(" not in o
                 and not o.startswith(("integrations/accelerate.py:7:", "bench/tuning.py:7:"))]
    assert offenders == []


def _declared(**attrs):
    base = {"name": "bad_algo", "description": "x", "hyperparameters": {}}
    return type("BadAlgo", (Aggregator,), {**base, **attrs})


@pytest.mark.parametrize("attrs, says", [
    ({"phase": "both"}, "phase 'both', allowed: gradient, model"),
    ({"phase": "model", "ddp_hook_form": "combine"}, "needs phase 'gradient'"),
    ({"phase": "gradient", "ddp_hook_form": "combine"}, "needs a combine_ method"),
    ({"phase": "gradient", "ddp_hook_form": "bucket"}, "ddp_hook_form 'bucket', allowed"),
    ({"low_rank": True}, "low_rank=True needs compressible=True"),
    ({"fault_tolerant": ""}, "fault_tolerant '', allowed: None"),
    ({"name": "has space"}, "name 'has space', allowed: a non-empty identifier"),
    ({"name": "acga"}, "'acga' is already registered by accord.algorithms.acga.ACGA"),
])
def test_a_wrong_declaration_is_one_line_at_registration(attrs, says):
    with pytest.raises(ValueError) as e:
        register(_declared(**attrs))
    assert says in str(e.value) and "\n" not in str(e.value)
    assert "bad_algo" not in REGISTRY


def test_a_plugin_that_cannot_load_is_one_line(tmp_path):
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('no GPU here')\n")
    cases = [
        (str(tmp_path / "missing.py"), "no file"),
        (str(empty), "registers no algorithm"),
        (f"{empty}:X", "'X' is int, allowed: a subclass of accord.core.Aggregator"),
        (str(broken), "failed: RuntimeError: no GPU here"),
        ("no_such_module_xyz", "cannot import 'no_such_module_xyz'"),
    ]
    for spec, says in cases:
        with pytest.raises(ValueError) as e:
            load_plugin(spec)
        assert says in str(e.value) and "\n" not in str(e.value), spec
    # and on the command line: exit 2, one line, nothing started
    code, err, _ = run_cli(["train", "--plugin", str(broken), "--algo", "allreduce",
                            "--out", str(tmp_path / "run")])
    assert code == 2 and len(err) == 1 and "no GPU here" in err[0]
    assert not (tmp_path / "run").exists()


def test_the_plugin_registers_once_and_refuses_what_it_does_not_declare(
        tmp_path, monkeypatch):
    load_plugin(str(EXAMPLE))
    assert load_plugin(str(EXAMPLE)) == []  # imported once: nothing registered twice
    cls = REGISTRY["relaxed_avg"]
    assert cls.__module__.startswith("accord_plugin_")
    # exactly the refusals of a built-in model-phase algorithm, in the same words
    no_workers(monkeypatch)
    base = ["train", "--plugin", str(EXAMPLE), "--out", str(tmp_path / "r")]
    code, err, _ = run_cli([*base, "--algo", "relaxed_avg", "--compress", "powersgd"])
    assert code == 2 and err[0].endswith(
        "compress: 'powersgd' approximates a sum of gradients by a low-rank matrix, not the "
        "parameters 'relaxed_avg' averages; allowed with it: acga, allreduce, diloco, "
        "local_sgd, normalized, streaming_diloco (else bf16 or fp16)")
    code, err, _ = run_cli([*base, "--algo", "relaxed_avg", "--set", "gamma=0"])
    assert code == 2 and "hyperparameter 'gamma': got '0', allowed: a number > 0" in err[0]
    for extra in (["--compress", "bf16"], ["--fault-tolerant"]):
        assert run_cli([*base, "--algo", "relaxed_avg", *extra])[0] == "launched"
    with pytest.raises(ValueError, match="'relaxed_avg' has no DDP communication hook"):
        accord.ddp_hook("relaxed_avg", [torch.nn.Parameter(torch.zeros(2))])
    # the wrong form of the name: the unknown-algorithm line lists it among the allowed
    code, err, _ = run_cli(["train", "--algo", "relaxed", "--out", str(tmp_path / "r")])
    assert code == 2 and "unknown algorithm 'relaxed'" in err[0] and "relaxed_avg" in err[0]


def test_gamma_one_is_local_sgd_in_every_worker(tmp_path):
    """The plugin reaches the workers of the local launcher: with gamma = 1 its records
    equal local SGD's (an identity between algorithms, bit for bit)."""
    common = ["--workers", "2", "--steps", "12", "--log-every", "4", "--no-progress",
              "--set", "period=3"]
    plugin = accord_cli("train", "--plugin", str(EXAMPLE.relative_to(ROOT)), "--algo",
                        "relaxed_avg", "--set", "gamma=1", "--out", str(tmp_path / "p"),
                        *common, cwd=ROOT)
    assert plugin.returncode == 0, plugin.stderr
    local = accord_cli("train", "--algo", "local_sgd", "--out", str(tmp_path / "l"), *common)
    assert local.returncode == 0, local.stderr

    def curve(out):
        return [(r["step"], r["eval_loss"], r["algo"]["syncs"]) for r in records(out)
                if r.get("type") == "step" and "eval_loss" in r]

    assert curve(tmp_path / "p") == curve(tmp_path / "l") and len(curve(tmp_path / "l")) >= 3
    header = records(tmp_path / "p")[0]
    # the header records the plugin by its absolute path, so a resume elsewhere finds it,
    # and the file that ran by its SHA-256 (bench reruns a run whose plugin was edited since)
    assert header["config"]["plugins"] == [str(EXAMPLE)]
    assert header["plugin_sources"] == [{"spec": str(EXAMPLE), "file": str(EXAMPLE),
                                         "sha256": hashlib.sha256(EXAMPLE.read_bytes()
                                                                  ).hexdigest()}]
    assert "plugin_sources" not in records(tmp_path / "l")[0]


def test_the_plugin_runs_fault_tolerant(tmp_path):
    out = tmp_path / "ft"
    res = accord_cli("train", "--plugin", str(EXAMPLE), "--algo", "relaxed_avg",
                     "--workers", "2", "--steps", "8", "--fault-tolerant", "--no-progress",
                     "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = records(out)[-1]
    assert summary["status"] == "ok" and summary["finished_workers"] == [0, 1]


def test_bench_and_report_with_a_plugin_and_a_straggler(tmp_path):
    out = tmp_path / "b"
    res = accord_cli("bench", "--plugin", str(EXAMPLE), "--algos", "relaxed_avg,allreduce",
                     "--tasks", "digits", "--workers", "2", "--seeds", "0", "--steps", "10",
                     "--fault", "slow:rank=1,factor=3", "--out", str(out), "--no-progress")
    assert res.returncode == 0, res.stderr
    outcomes = [json.loads(x) for x in (out / "bench.jsonl").read_text().splitlines()]
    assert sorted(o["label"] for o in outcomes) == [
        "allreduce_slow-rank1-factor3", "relaxed_avg_slow-rank1-factor3"]
    assert all(o["status"] == "ok" for o in outcomes)
    report = accord_cli("report", str(out / "custom"), "--out", str(tmp_path / "rep"))
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "relaxed_avg_slow-rank1-factor3" in text


def test_an_installed_entry_point_is_found_and_a_broken_one_named(tmp_path):
    """A package installed with an ``accord.algorithms`` entry point: its algorithm is
    listed with no flag; a broken entry point does not stop accord and is named when its
    algorithm is asked for."""
    site = tmp_path / "site"
    pkg = site / "relaxed_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(EXAMPLE.read_text())
    dist = site / "relaxed_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: relaxed-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[accord.algorithms]\nrelaxed = relaxed_pkg:RelaxedAveraging\n"
        "broken = no_such_pkg_xyz.algos\n")
    extra = {"PYTHONPATH": f"{SRC}{os.pathsep}{site}"}
    listed = accord_cli("list", "-v", extra_env=extra, timeout=120)
    assert listed.returncode == 0, listed.stderr
    [row] = [x for x in listed.stdout.splitlines() if x.startswith("relaxed_avg ")]
    assert row.split(None, 1)[1] == RELAXED_DESCRIPTION
    assert "--fault-tolerant the mean over the participants" in listed.stdout
    res = accord_cli("train", "--algo", "nope", "--out", str(tmp_path / "r"),
                     extra_env=extra, timeout=120)
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert "unknown algorithm 'nope'" in line and "relaxed_avg" in line
    assert "entry point 'broken' (no_such_pkg_xyz.algos) failed to load" in line


def test_the_registry_is_the_one_name_space(monkeypatch):
    """``accord.register`` and ``accord.load_plugin`` are the public entry; ``get`` of an
    unknown name loads the entry points before it refuses."""
    assert accord.register is register and accord.load_plugin is load_plugin
    calls = []
    monkeypatch.setattr(algorithms, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(algorithms, "load_plugins",
                        lambda specs=(): calls.append(tuple(specs)))
    with pytest.raises(ValueError, match="unknown algorithm 'zzz'"):
        algorithms.get("zzz")
    assert calls == [()]
