"""Checkpoints that keep every rank's replica: ``accord.save`` / ``accord.load``.

A checkpoint is a directory::

    step-<S>/rank<r>.pt     one file per rank: its model, optimizer, aggregator, RNG states
    step-<S>/manifest.json  written last, by rank 0: step, world size, each file's size and
                            SHA-256, the run's config (``accord train``), format version

It counts only once ``manifest.json`` exists (committed by an atomic rename after rank 0
checked every file). The manifest's schema (:data:`MANIFEST_SCHEMA`) and each rank file's
(:data:`RANK_FILE_SCHEMA`) are declared once here and checked by :func:`save`,
:func:`read_manifest`, :func:`verify` and :func:`read`: a manifest that disagrees with its
directory or its rank files is refused (or skipped by :func:`find`) in one line naming the
file and the field. Replicas differ and the state is tied to the world size, so each rank
keeps its own file (not ``torch.distributed.checkpoint``). :func:`save` is collective;
:func:`load` is local. In full: docs/guides/checkpoints.md."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import numbers
import os
import pickle
import random
import re
import shutil
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .schema import AnyJSON, Int, MapOf, Number, Record, SchemaError, Text, parse_json, validate

FORMAT = 1
MANIFEST = "manifest.json"
#: a checkpoint directory written by ``accord train``: the step is in its name
STEP_DIR = re.compile(r"step-(0|[1-9][0-9]*)")

MANIFEST_SCHEMA = Record({
    "format": Int(),  # checked first, against FORMAT: another format may have other fields
    "step": Int(0),
    "world_size": Int(1),
    "created": Number(0),
    "config": MapOf(AnyJSON(), expected="an object (the run's settings)"),
    "files": MapOf(
        Record({"bytes": Int(0),
                "sha256": Text(pattern="[0-9a-f]{64}",
                               expected="a SHA-256 (64 lowercase hex digits)")},
               required=("bytes", "sha256"), expected='an object {"bytes", "sha256"}'),
        key=Text(pattern=r"rank(0|[1-9][0-9]*)\.pt", expected="rank<r>.pt"),
        nonempty=True, expected='an object {"rank<r>.pt": {"bytes", "sha256"}, ...}'),
}, required=("format", "step", "world_size", "created", "config", "files"),
    expected="a JSON object (a checkpoint manifest)")

#: the fields of a rank file (a ``torch.save``'d dict) that must agree with the manifest;
#: its other entries (model, optimizer, aggregator, rng, comm, extra) are not JSON
RANK_FILE_SCHEMA = Record({"format": Int(), "rank": Int(0), "world_size": Int(1),
                           "step": Int(0)},
                          required=("format", "rank", "world_size", "step"), extra=True,
                          expected="a dict (a rank file saved by accord.save)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (incomplete, corrupt, or from another run);
    the message is one line naming what is wrong (a line break in a name it quotes, such as
    a config key of a hand-edited manifest, is made a space)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).splitlines()))


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
    # checked before anything is written: a negative step would make a checkpoint that
    # resumes "before the start" (and step-<S> names that sort wrong)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step: got {step!r} ({type(step).__name__}), allowed: an integer "
                        ">= 0 (the optimizer steps taken)")
    if step < 0:
        raise ValueError(f"step: got {step!r}, allowed: an integer >= 0 (the optimizer steps "
                         "taken)")
    path = Path(path)
    step = _check_step(path, step)
    config = dict(config or {})
    try:  # before anything is written: the manifest must be able to hold it
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config: not JSON ({e}); allowed: a JSON-able mapping") from None
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / MANIFEST).unlink(missing_ok=True)  # an older checkpoint here stops counting
    if distributed:
        dist.barrier(group)
    path.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "rank": rank, "world_size": world, "step": step,
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
    # through a Python file, not a path: a refused write (a full disk, a file-size limit)
    # then keeps its errno (torch's own writer says only "unexpected pos")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
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
        manifest = {"format": FORMAT, "step": step, "world_size": world,
                    "created": time.time(), "config": config,
                    "files": {p["file"]: {"bytes": p["bytes"], "sha256": p["sha256"]}
                              for p in parts}}
        _check_manifest(path, manifest)  # what the reader will demand, before committing
        tmp_manifest = path / (MANIFEST + ".tmp")
        tmp_manifest.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        os.replace(tmp_manifest, path / MANIFEST)
    if distributed:
        dist.barrier(group)  # returns once the checkpoint is committed
    return path


def _check_step(path: Path, step: int) -> int:
    """``step`` as an int, refused (ValueError, one line) when a ``step-<S>`` directory's
    name says another step: the reader would refuse the checkpoint."""
    value = int(step)
    named = STEP_DIR.fullmatch(path.name)
    if named is not None and int(named[1]) != value:
        raise ValueError(f"step: got {value} for the directory {path.name}, allowed: "
                         f"{named[1]} (a step-<S> directory holds step S)")
    return value


def _check_manifest(path: Path, manifest: Any) -> dict[str, Any]:
    """``manifest`` when it matches :data:`MANIFEST_SCHEMA` and its directory; else one
    :class:`CheckpointError` line naming the field and what was expected."""
    where = f"checkpoint {path}: {MANIFEST}"
    if isinstance(manifest, dict) and manifest.get("format") != FORMAT:
        raise CheckpointError(f"{where}: format {manifest.get('format')!r}, this version "
                              f"reads format {FORMAT}")
    try:
        validate(MANIFEST_SCHEMA, manifest)
    except SchemaError as e:
        raise CheckpointError(f"{where}: {e}") from None
    world, files = manifest["world_size"], manifest["files"]
    wanted = [_rank_file(r) for r in range(world)]
    if sorted(files) != sorted(wanted):
        listed = ", ".join(sorted(files, key=lambda n: int(n[4:-3]))[:6]) + \
            (", ..." if len(files) > 6 else "")
        raise CheckpointError(
            f"{where}: field 'files': expected one entry per rank of world_size {world} "
            f"({wanted[0]}" + (f" to {wanted[-1]}" if world > 1 else "") + f"), got {listed}")
    named = STEP_DIR.fullmatch(path.name)
    if named is not None and int(named[1]) != manifest["step"]:
        raise CheckpointError(f"{where}: field 'step': expected {named[1]} (the directory "
                              f"is {path.name}), got {manifest['step']}")
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the checkpoint directory ``path``, checked against
    :data:`MANIFEST_SCHEMA` and the directory's name; :class:`CheckpointError` (one line)
    otherwise. Reads no rank file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a directory; allowed: a checkpoint "
                              "directory (OUT/checkpoints/step-<S>)")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such directory; allowed: a checkpoint "
                              "directory (OUT/checkpoints/step-<S>)")
    try:
        data = (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: incomplete (no {MANIFEST}; it was being "
                              "written when the run stopped)") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} cannot be read "
                              f"({e.strerror or e})") from None
    try:
        manifest = parse_json(data)
    except SchemaError as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupt ({e})") from None
    return _check_manifest(path, manifest)


class _Stub:
    """Whatever a pickle builds, built as nothing: :func:`peek` reads a rank file's plain
    fields without constructing its tensors or running any class of the file."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _PeekUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict  # a state_dict's container, harmless
        return _Stub

    def persistent_load(self, pid: Any) -> Any:  # a tensor's storage: not read
        return None


def peek(file: str | os.PathLike) -> Any:
    """The top-level object of a ``torch.save`` file with every tensor, array and class
    instance replaced by a stub: its plain fields (ints, strings, lists, dicts) as saved.
    Reads only the archive's pickle (kilobytes), not the tensors' bytes. Raises
    ``ValueError`` for a file that is not a ``torch.save`` zip archive."""
    try:
        with zipfile.ZipFile(file) as archive:
            pickles = [n for n in archive.namelist()
                       if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pickles) != 1:
                raise ValueError("no data.pkl in the archive")
            data = archive.read(pickles[0])
    except (zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"not a torch.save zip archive ({e})") from None
    try:
        return _PeekUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001 - any damage to the pickle is one line
        raise ValueError(f"its pickle cannot be read ({type(e).__name__}: {e})") from None


def _check_rank_state(path: Path, name: str, state: Any, manifest: Mapping[str, Any],
                      rank: int) -> None:
    """A rank file's own fields agree with the manifest (the step above all: a manifest
    edited from step 20 to 10 would resume "at step 10" from the weights of step 20)."""
    try:
        validate(RANK_FILE_SCHEMA, state)
    except SchemaError as e:
        raise CheckpointError(f"checkpoint {path}: {name}: {e}") from None
    for field, want in (("format", FORMAT), ("rank", rank),
                        ("world_size", manifest["world_size"]), ("step", manifest["step"])):
        if state[field] != want:
            said = "this version reads" if field == "format" else f"{MANIFEST} says"
            raise CheckpointError(f"checkpoint {path}: {name} holds {field} {state[field]}, "
                                  f"{said} {want} (edited or mixed up by hand?)")


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
             config: Mapping[str, Any] | None,
             defaults: Mapping[str, Any] | None = None) -> None:
    if world_size is not None and manifest["world_size"] != world_size:
        raise CheckpointError(f"checkpoint {path}: written by {manifest['world_size']} workers, "
                              f"this run has {world_size}; allowed: the same world size")
    if config is not None:
        saved = dict(manifest.get("config", {}))
        for key, value in (defaults or {}).items():  # written before the key existed
            if key in config and key not in saved:
                saved[key] = value
        for key in sorted(set(saved) | set(config)):
            if saved.get(key) != config.get(key):
                # a hand-made key may hold a line break: quoted, the line stays one
                name = key if isinstance(key, str) and key.isidentifier() else json.dumps(key)
                raise CheckpointError(
                    f"checkpoint {path}: {name} was {saved.get(key)!r}, this run has "
                    f"{config.get(key)!r}; allowed: the checkpointed run's value")


def verify(path: str | os.PathLike, world_size: int | None = None,
           config: Mapping[str, Any] | None = None, *,
           defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a complete, intact checkpoint matching ``world_size`` and ``config``
    (when given; ``defaults`` holds the value of each key a manifest written before the key
    existed ran with); :class:`CheckpointError` (one line) otherwise. Reads every file (its
    SHA-256, and the fields of its pickle that must agree with the manifest)."""
    path = Path(path)
    manifest = read_manifest(path)
    _compare(path, manifest, world_size, config, defaults)
    files = manifest["files"]
    for r in range(manifest["world_size"]):
        if _rank_file(r) not in files:
            raise CheckpointError(f"checkpoint {path}: the manifest lists no file for rank {r}")
    for name, entry in sorted(files.items()):
        _check_file(path, name, entry)
    for r in range(manifest["world_size"]):
        name = _rank_file(r)
        try:
            head = peek(path / name)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {path}: {name} is not a rank file ({e})") \
                from None
        _check_rank_state(path, name, head, manifest, r)
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
         config: Mapping[str, Any] | None = None, *,
         defaults: Mapping[str, Any] | None = None) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under ``root`` that matches, and one line for every
    newer one that was skipped (incomplete, corrupt, or from another config)."""
    skipped = []
    for d in step_dirs(root):
        try:
            verify(d, world_size, config, defaults=defaults)
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
    """This rank's part of the checkpoint at ``path``, checked against the manifest (size,
    SHA-256, and the file's own rank, world size and step) and the world size;
    :class:`CheckpointError` (one line) otherwise."""
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
    try:
        state = torch.load(path / name, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - its hash matched: say what torch says, once
        first = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"checkpoint {path}: {name} cannot be loaded "
                              f"({type(e).__name__}: {first})") from e
    _check_rank_state(path, name, state, manifest, rank)
    for key in ("model", "rng"):
        if not isinstance(state.get(key), Mapping):
            raise CheckpointError(f"checkpoint {path}: {name}: field '{key}': expected a "
                                  f"dict, got {type(state.get(key)).__name__}")
    return state


def restore(state: Mapping[str, Any], model: torch.nn.Module | None = None,
            optimizer: torch.optim.Optimizer | None = None, aggregator: Any = None, *,
            rng: bool = True) -> None:
    """Put a state from :func:`read` back into the objects given (any subset: a loop may
    restore the model and optimizer before it builds the aggregator)."""
    if model is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:  # torch's message is a block: its first difference
            lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
            more = f"; +{len(lines) - 1} more" if len(lines) > 1 else ""
            raise CheckpointError(f"checkpoint: the model is not the one saved "
                                  f"({lines[0] if lines else e}{more}); allowed: a model "
                                  "of the same parameter names and shapes") from None
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
