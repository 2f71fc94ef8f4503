"""accord.save / accord.load: per-rank replicas, atomic commit, and every corruption case
detected with one line."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from cli_util import no_workers, run_cli, tree
from worlds import run_world

import accord
from accord import checkpoint as ck
from accord import cli
from accord.run.validation import validate

K = 3


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 10), torch.nn.BatchNorm1d(10),
                               torch.nn.Dropout(0.3), torch.nn.Tanh(), torch.nn.Linear(10, 1))


def _steps(model, opt, rank, steps):
    for step in steps:
        gen = torch.Generator().manual_seed(100 * rank + step)
        x, y = torch.randn(8, 5, generator=gen) + rank, torch.randn(8, 1, generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)  # dropout draws from torch's RNG
        loss.backward()
        opt.step(loss=loss.detach())


def _flat(model):
    return torch.cat([t.detach().reshape(-1) for t in model.state_dict().values()
                      if t.is_floating_point()])


def _world(rank: int, world: int, root: str) -> dict:
    out = {}
    for algo, hp in (("local_sgd", {"period": 2}), ("acga", {"momentum": 0.9}),
                     ("easgd", {"period": 2})):
        torch.manual_seed(50 + rank)
        model = _model(0)
        opt = accord.wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), algo,
                          buffers=model.buffers(), **hp)
        _steps(model, opt, rank, range(2 * K))
        straight, straight_bytes = _flat(model), opt.aggregator.comm.stats.bytes
        opt.aggregator.close()

        torch.manual_seed(50 + rank)
        model = _model(0)
        opt = accord.wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), algo,
                          buffers=model.buffers(), **hp)
        _steps(model, opt, rank, range(K))
        path = Path(root) / algo / f"step-{K}"
        accord.save(path, model, opt, step=K, extra={"note": f"rank {rank}"})
        at_save = _flat(model)
        opt.aggregator.close()
        torch.manual_seed(999)  # the checkpoint must bring the RNG back
        model = _model(7)
        opt = accord.wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), algo,
                          buffers=model.buffers(), broadcast=False, **hp)
        got = accord.load(path, model, opt)
        _steps(model, opt, rank, range(K, 2 * K))
        out[algo] = {"straight": straight, "resumed": _flat(model), "at_save": at_save,
                     "loaded": got, "bytes": (straight_bytes, opt.aggregator.comm.stats.bytes)}
        opt.aggregator.close()
    return out


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return root, run_world(_world, 3, str(root))


@pytest.mark.parametrize("algo", ["local_sgd", "acga", "easgd"])
def test_save_load_continues_bit_for_bit_with_each_ranks_replica(resumed, algo):
    root, per_rank = resumed
    assert not torch.equal(per_rank[0][algo]["at_save"], per_rank[1][algo]["at_save"])
    for r, out in enumerate(per_rank):
        got = out[algo]
        assert torch.equal(got["resumed"], got["straight"]), (algo, r)
        assert got["loaded"] == {"step": K, "extra": {"note": f"rank {r}"}}
        assert got["bytes"][0] == got["bytes"][1]  # traffic counters continue
    manifest = ck.verify(root / algo / f"step-{K}", world_size=3)
    assert sorted(manifest["files"]) == ["rank0.pt", "rank1.pt", "rank2.pt"]
    assert manifest["step"] == K


# -- corruption, in one process (a world of one) ------------------------------------------

def _save(root: Path, step: int, config=None) -> Path:
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return accord.save(root / f"step-{step}", model, opt, step=step,
                       config=config or {"algo": "allreduce"})


def _commit(path: Path, **changes) -> None:
    """Write the manifest of the rank files in ``path`` (sizes and hashes as they are now),
    with ``changes`` to its fields: a checkpoint made or edited by hand."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {f.name: {"bytes": f.stat().st_size,
                                  "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
                         for f in sorted(path.glob("rank*.pt"))}
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _fake_rank(path: Path, rank: int) -> None:
    """Make a world-of-one checkpoint a world of ``rank + 1``: rank 0's state saved again as
    every rank's, each with its own rank and the new world size."""
    state = torch.load(path / "rank0.pt", weights_only=False)
    for r in range(rank + 1):
        torch.save({**state, "rank": r, "world_size": rank + 1}, path / f"rank{r}.pt")
    _commit(path, world_size=rank + 1)


def test_complete_checkpoint_verifies(tmp_path):
    path = _save(tmp_path, 10)
    assert ck.verify(path, world_size=1, config={"algo": "allreduce"})["step"] == 10


@pytest.mark.parametrize("damage,message", [
    ("truncate", "has .* bytes, the manifest says .* \\(truncated or replaced\\)"),
    ("flip", "does not match its SHA-256"),
    ("no_manifest", "incomplete \\(no manifest.json"),
    ("missing_rank", "rank1.pt is missing"),
    ("bad_manifest", "manifest.json is corrupt"),
])
def test_each_corruption_is_detected_and_find_falls_back(tmp_path, damage, message):
    older = _save(tmp_path, 10)
    newer = _save(tmp_path, 20)
    if damage == "missing_rank":
        _fake_rank(older, 1)
        _fake_rank(newer, 1)
        (newer / "rank1.pt").unlink()
    f = newer / "rank0.pt"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (newer / "manifest.json").unlink()
    elif damage == "bad_manifest":
        (newer / "manifest.json").write_text("{not json")
    with pytest.raises(ck.CheckpointError, match=message) as info:
        ck.verify(newer)
    assert "\n" not in str(info.value)
    found, skipped = ck.find(tmp_path)
    assert found == older
    assert len(skipped) == 1 and "step-20" in skipped[0]
    # a named checkpoint fails with the same one line (load checks this rank's file)
    if damage in ("truncate", "flip", "no_manifest", "bad_manifest"):
        with pytest.raises(ck.CheckpointError, match=message):
            accord.load(newer, _model(0), torch.optim.SGD(_model(0).parameters(), lr=0.1))


def test_checkpoint_of_another_config_or_world_is_skipped(tmp_path):
    older = _save(tmp_path, 10)
    _save(tmp_path, 20, config={"algo": "acga"})
    found, skipped = ck.find(tmp_path, world_size=1, config={"algo": "allreduce"})
    assert found == older
    assert skipped == [f"checkpoint {tmp_path / 'step-20'}: algo was 'acga', this run has "
                       "'allreduce'; allowed: the checkpointed run's value"]
    found, skipped = ck.find(tmp_path, world_size=2)
    assert found is None and all("written by 1 workers, this run has 2" in s for s in skipped)


def test_prune_keeps_the_newest_complete_ones(tmp_path):
    for step in (10, 20, 30, 40):
        _save(tmp_path, step)
    (tmp_path / "step-25").mkdir()  # an incomplete one older than the newest: garbage
    (tmp_path / "step-50").mkdir()  # an incomplete newer one: maybe being written, kept
    removed = ck.prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["step-10", "step-20", "step-25"]
    assert [p.name for p in ck.step_dirs(tmp_path)] == ["step-50", "step-40", "step-30"]


# -- hand-edited checkpoints: one line, through the API and `accord train --resume` --------

ARGS = ["--task", "linreg", "--workers", "1", "--steps", "30", "--no-progress"]


def _run_checkpoint(out: Path, step: int) -> Path:
    """A checkpoint of the run ``accord train --out OUT *ARGS`` would make, made by hand
    (a one-layer model: only the manifest and the rank file's own fields are read before
    workers start)."""
    cfg = cli._config_from_args(cli.build_parser().parse_args(
        ["train", "--out", str(out), *ARGS]))
    validate(cfg)
    return accord.save(out / "checkpoints" / f"step-{step}", torch.nn.Linear(2, 1),
                       step=step, config=cfg.fingerprint())


def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(edit(manifest)))


def _drop_bytes(m):
    del m["files"]["rank0.pt"]["bytes"]
    return m


HAND_EDITS = {
    "only_format": (lambda m: {"format": 1},
                    "field 'step': expected an integer >= 0, got nothing (missing)"),
    "a_list": (lambda m: [1],
               "expected a JSON object (a checkpoint manifest), got [1]"),
    "file_without_bytes": (_drop_bytes, "field 'files[\"rank0.pt\"].bytes': expected an "
                                        "integer >= 0, got nothing (missing)"),
    "step_edited": (lambda m: {**m, "step": 10},
                    "field 'step': expected 20 (the directory is step-20), got 10"),
    "world_size_a_string": (lambda m: {**m, "world_size": "1"},
                            "field 'world_size': expected an integer >= 1, got \"1\""),
    "unknown_field": (lambda m: {**m, "note": "x"},
                      "field 'note': expected no such field (known: format, step, "
                      "world_size, created, config, files), got \"x\""),
    "a_file_too_many": (lambda m: {**m, "files": {**m["files"], "rank1.pt":
                                                  m["files"]["rank0.pt"]}},
                        "field 'files': expected one entry per rank of world_size 1 "
                        "(rank0.pt), got rank0.pt, rank1.pt"),
}


@pytest.mark.parametrize("edit", sorted(HAND_EDITS))
def test_a_hand_edited_manifest_is_refused_named_and_skipped_by_auto(tmp_path, monkeypatch,
                                                                     edit):
    """Valid JSON that is not a manifest raised KeyError / AttributeError from inside, and
    a manifest whose step was edited from 20 to 10 was trusted (the run resumed "at step
    10" from the weights of step 20)."""
    change, message = HAND_EDITS[edit]
    no_workers(monkeypatch)
    out = tmp_path / "run"
    good = _run_checkpoint(out, 10)
    bad = _run_checkpoint(out, 20)
    _edit_manifest(bad, change)
    line = f"checkpoint {bad}: manifest.json: {message}"
    with pytest.raises(ck.CheckpointError) as info:
        ck.verify(bad)
    assert str(info.value) == line
    before = tree(tmp_path)
    code, err, _ = run_cli(["train", "--out", str(out), *ARGS, "--resume", str(bad)])
    assert (code, err) == (2, [f"accord train: error: resume: {line}"])
    assert tree(tmp_path) == before  # nothing written
    code, err, _ = run_cli(["train", "--out", str(out), *ARGS, "--resume", "auto"])
    assert code == "launched"  # from the older, intact checkpoint
    assert err == [f"accord train: skipped {line}", f"resuming from {good}"]


def test_a_config_key_with_a_line_break_keeps_the_refusal_one_line(tmp_path, monkeypatch):
    """Found by the hostile tier: a manifest whose config gained the key "\\r" was refused
    in two lines (the key printed raw)."""
    no_workers(monkeypatch)
    out = tmp_path / "run"
    bad = _run_checkpoint(out, 20)
    _edit_manifest(bad, lambda m: {**m, "config": {**m["config"], "\r": []}})
    code, err, _ = run_cli(["train", "--out", str(out), *ARGS, "--resume", str(bad)])
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f'accord train: error: resume: checkpoint {bad}: "\\r" was [], '
                             "this run has None; allowed: the checkpointed run's value")


def test_a_rank_file_of_another_step_is_refused(tmp_path, monkeypatch):
    """A checkpoint renamed with its manifest edited to agree (step-20 made step-10): the
    rank file still says step 20. verify reads that from the file's pickle (no tensor is
    built); load checks what it loaded."""
    no_workers(monkeypatch)
    out = tmp_path / "run"
    good = _run_checkpoint(out, 5)
    saved = _run_checkpoint(out, 20)
    bad = saved.with_name("step-10")
    saved.rename(bad)
    _edit_manifest(bad, lambda m: {**m, "step": 10})
    line = (f"checkpoint {bad}: rank0.pt holds step 20, manifest.json says 10 (edited or "
            "mixed up by hand?)")
    for call in (ck.verify, ck.read):
        with pytest.raises(ck.CheckpointError) as info:
            call(bad)
        assert str(info.value) == line
    code, err, _ = run_cli(["train", "--out", str(out), *ARGS, "--resume", str(bad)])
    assert (code, err) == (2, [f"accord train: error: resume: {line}"])
    code, err, _ = run_cli(["train", "--out", str(out), *ARGS, "--resume", "auto"])
    assert code == "launched"
    assert err == [f"accord train: skipped {line}", f"resuming from {good}"]


def test_resume_naming_a_file_is_one_line(tmp_path, monkeypatch):
    """It raised NotADirectoryError from inside."""
    no_workers(monkeypatch)
    out = tmp_path / "run"
    path = _run_checkpoint(out, 10) / "rank0.pt"
    before = tree(tmp_path)
    code, err, _ = run_cli(["train", "--out", str(out), *ARGS, "--resume", str(path)])
    assert (code, err) == (2, [f"accord train: error: resume: checkpoint {path}: not a "
                               "directory; allowed: a checkpoint directory "
                               "(OUT/checkpoints/step-<S>)"])
    assert tree(tmp_path) == before


def test_the_peek_reads_a_real_rank_file(tmp_path):
    path = _save(tmp_path, 7)
    head = ck.peek(path / "rank0.pt")
    assert {k: head[k] for k in ("format", "rank", "world_size", "step")} == \
        {"format": ck.FORMAT, "rank": 0, "world_size": 1, "step": 7}
    (tmp_path / "x.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="^not a torch.save zip archive"):
        ck.peek(tmp_path / "x.pt")


def test_save_refuses_a_step_its_directory_name_contradicts(tmp_path):
    with pytest.raises(ValueError, match=r"^step: got 10 for the directory step-20, allowed: "
                                         r"20 \(a step-<S> directory holds step S\)$"):
        accord.save(tmp_path / "step-20", _model(0), step=10)
    assert list(tmp_path.iterdir()) == []


def test_loading_into_a_model_of_another_shape_is_one_line(tmp_path):
    """torch's RuntimeError was a block of lines."""
    path = _save(tmp_path, 3)
    other = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4),
                                torch.nn.Dropout(0.3), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    with pytest.raises(ck.CheckpointError) as info:
        accord.load(path, other)
    assert str(info.value).startswith(
        "checkpoint: the model is not the one saved (size mismatch for 0.weight: copying a "
        "param with shape torch.Size([10, 5]) from checkpoint, the shape in current model is "
        "torch.Size([4, 5]).; +")
    assert "\n" not in str(info.value)
