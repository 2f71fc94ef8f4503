"""Checkpoints that keep every rank's replica: ``accord.save`` / ``accord.load``.

A checkpoint is a directory::

    step-<S>/rank<r>.pt     one file per rank: its model, optimizer, aggregator, RNG states
    step-<S>/manifest.json  written last, by rank 0: step, world size, each file's size and
                            SHA-256, the run's config (``accord train``), format version

It counts only once ``manifest.json`` exists. Every rank writes its file under a temporary
name and renames it into place, hashes what is on disk, and hands the size and hash to rank
0; rank 0 checks each file's size on disk and commits the manifest by an atomic rename
(the files share one filesystem: one node, or a shared directory). A crash at any point
before the rename leaves a directory without a manifest, which :func:`verify` reports as
incomplete and :func:`find` skips.

Why not ``torch.distributed.checkpoint``: it saves one logical state, deduplicating tensors
that ranks hold under the same key on the assumption that they are replicas of one value,
and its strength is resharding to another world size. Here the replicas differ by design
(every model-phase algorithm) and the algorithms' state is tied to the world size (ACGA's
sorted momentum has N entries, EASGD's beta = N alpha, gossip schedules), so each rank's
state is its own file and the world size must match.

Every rank must call :func:`save` (collective: one ``all_gather_object`` and two
barriers). :func:`load` is local: each rank reads and checks its own file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

FORMAT = 1
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, corrupt, or from another run);
    the message is one line naming what is wrong."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    """Every random generator a training loop draws from on this process."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    aggregator: Any = None,
    step: int = 0,
    *,
    extra: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Write this rank's part of the checkpoint at ``path`` and, on rank 0, commit it.

    Collective over ``group`` (default: the default group; without an initialised process
    group the world is this process). ``optimizer`` may be an ``accord.wrap`` optimizer
    (its state holds the aggregator; leave ``aggregator`` None then). ``step``: the number
    of optimizer steps taken. ``extra``: anything else this rank must get back (picklable).
    ``config``: a JSON-able description of the run, stored in the manifest and compared by
    :func:`find` / :func:`verify`. Returns the checkpoint directory."""
    path = Path(path)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / MANIFEST).unlink(missing_ok=True)  # an older checkpoint here stops counting
    if distributed:
        dist.barrier(group)
    path.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "rank": rank, "world_size": world, "step": int(step),
             "model": model.state_dict(), "rng": rng_state(), "extra": dict(extra or {})}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if aggregator is not None:
        state["aggregator"] = aggregator.state_dict()
    counted = aggregator if aggregator is not None else getattr(optimizer, "aggregator", None)
    if counted is not None:  # the traffic counters continue in a resumed run
        state["comm"] = counted.comm.stats.as_dict()
    final = path / _rank_file(rank)
    tmp = final.with_name(final.name + ".tmp")
    torch.save(state, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    mine = {"file": final.name, "bytes": final.stat().st_size, "sha256": _sha256(final)}
    parts: list[Any] = [None] * world
    if distributed:
        dist.all_gather_object(parts, mine, group=group)
    else:
        parts = [mine]
    if rank == 0:
        for r, part in enumerate(parts):
            on_disk = path / part["file"]
            if not on_disk.exists() or on_disk.stat().st_size != part["bytes"]:
                raise CheckpointError(f"checkpoint {path}: rank {r}'s file is not where rank 0 "
                                      "can read it (checkpoints need one shared filesystem)")
        manifest = {"format": FORMAT, "step": int(step), "world_size": world,
                    "created": time.time(), "config": dict(config or {}),
                    "files": {p["file"]: {"bytes": p["bytes"], "sha256": p["sha256"]}
                              for p in parts}}
        tmp_manifest = path / (MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        os.replace(tmp_manifest, path / MANIFEST)
    if distributed:
        dist.barrier(group)  # returns once the checkpoint is committed
    return path


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: incomplete (no {MANIFEST}; it was being "
                              "written when the run stopped)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {manifest.get('format')!r}, this "
                              f"version reads format {FORMAT}")
    return manifest


def _check_file(path: Path, name: str, entry: Mapping[str, Any]) -> None:
    f = path / name
    if not f.exists():
        raise CheckpointError(f"checkpoint {path}: {name} is missing")
    size = f.stat().st_size
    if size != entry["bytes"]:
        raise CheckpointError(f"checkpoint {path}: {name} has {size} bytes, the manifest "
                              f"says {entry['bytes']} (truncated or replaced)")
    if _sha256(f) != entry["sha256"]:
        raise CheckpointError(f"checkpoint {path}: {name} does not match its SHA-256 in the "
                              "manifest (corrupt)")


def _compare(path: Path, manifest: Mapping[str, Any], world_size: int | None,
             config: Mapping[str, Any] | None) -> None:
    if world_size is not None and manifest["world_size"] != world_size:
        raise CheckpointError(f"checkpoint {path}: written by {manifest['world_size']} workers, "
                              f"this run has {world_size}; allowed: the same world size")
    if config is not None:
        from .config import TrainConfig

        saved = dict(manifest.get("config", {}))
        for key, value in TrainConfig.ADDED_DEFAULTS.items():  # written before key existed
            if key in config and key not in saved:
                saved[key] = value
        for key in sorted(set(saved) | set(config)):
            if saved.get(key) != config.get(key):
                raise CheckpointError(
                    f"checkpoint {path}: {key} was {saved.get(key)!r}, this run has "
                    f"{config.get(key)!r}; allowed: the checkpointed run's value")


def verify(path: str | os.PathLike, world_size: int | None = None,
           config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a complete, intact checkpoint matching ``world_size`` and ``config``
    (when given); :class:`CheckpointError` (one line) otherwise. Reads every file."""
    path = Path(path)
    manifest = read_manifest(path)
    _compare(path, manifest, world_size, config)
    files = manifest["files"]
    for r in range(manifest["world_size"]):
        if _rank_file(r) not in files:
            raise CheckpointError(f"checkpoint {path}: the manifest lists no file for rank {r}")
    for name, entry in sorted(files.items()):
        _check_file(path, name, entry)
    return manifest


def step_dirs(root: str | os.PathLike) -> list[Path]:
    """The ``step-<S>`` directories under ``root``, newest (largest S) first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-") and d.name[5:].isdigit():
            found.append((int(d.name[5:]), d))
    return [d for _, d in sorted(found, reverse=True)]


def find(root: str | os.PathLike, world_size: int | None = None,
         config: Mapping[str, Any] | None = None) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under ``root`` that matches, and one line for every
    newer one that was skipped (incomplete, corrupt, or from another config)."""
    skipped = []
    for d in step_dirs(root):
        try:
            verify(d, world_size, config)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        return d, skipped
    return None, skipped


def prune(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints (and any incomplete one older
    than the newest complete); returns what was deleted. Rank 0 only."""
    dirs = step_dirs(root)
    complete = [d for d in dirs if (d / MANIFEST).exists()]
    keep_set = set(complete[:keep])
    newest = complete[0] if complete else None
    removed = []
    for d in dirs:
        if d in keep_set:
            continue
        if d in complete or (newest is not None and int(d.name[5:]) < int(newest.name[5:])):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def read(path: str | os.PathLike, *, group: dist.ProcessGroup | None = None,
         map_location: Any = "cpu") -> dict[str, Any]:
    """This rank's part of the checkpoint at ``path``, checked against the manifest (size and
    SHA-256) and the world size; :class:`CheckpointError` (one line) otherwise."""
    path = Path(path)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1
    manifest = read_manifest(path)
    _compare(path, manifest, world, None)
    name = _rank_file(rank)
    if name not in manifest["files"]:
        raise CheckpointError(f"checkpoint {path}: the manifest lists no file for rank {rank}")
    _check_file(path, name, manifest["files"][name])
    return torch.load(path / name, map_location=map_location, weights_only=False)


def restore(state: Mapping[str, Any], model: torch.nn.Module | None = None,
            optimizer: torch.optim.Optimizer | None = None, aggregator: Any = None, *,
            rng: bool = True) -> None:
    """Put a state from :func:`read` back into the objects given (any subset: a loop may
    restore the model and optimizer before it builds the aggregator)."""
    if model is not None:
        model.load_state_dict(state["model"])
    if optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError("checkpoint: saved without an optimizer state")
        optimizer.load_state_dict(state["optimizer"])
    if aggregator is not None:
        if "aggregator" not in state:
            raise CheckpointError("checkpoint: saved without an aggregator state")
        aggregator.load_state_dict(state["aggregator"])
    counted = aggregator if aggregator is not None else getattr(optimizer, "aggregator", None)
    if counted is not None and "comm" in state:
        counted.comm.stats.load(state["comm"])
    if rng:
        set_rng_state(state["rng"])


def load(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    aggregator: Any = None,
    *,
    restore_rng: bool = True,
    group: dist.ProcessGroup | None = None,
) -> dict[str, Any]:
    """Load this rank's part of the checkpoint at ``path`` into ``model``, ``optimizer`` and
    ``aggregator`` (the same objects :func:`save` was given, built again; build the
    aggregator with ``broadcast=False``, since each rank gets its own replica back) and, by
    default, its random generators. Local (no collective). Returns ``{"step", "extra"}``.
    Raises :class:`CheckpointError` (one line) for an incomplete or corrupt checkpoint, or one
    from another world size."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    state = read(path, group=group, map_location=device)
    restore(state, model, optimizer, aggregator, rng=restore_rng)
    return {"step": int(state["step"]), "extra": state.get("extra", {})}
