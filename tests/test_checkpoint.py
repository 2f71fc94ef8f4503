"""accord.save / accord.load: per-rank replicas, atomic commit, and every corruption case
detected with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from worlds import run_world

import accord
from accord import checkpoint as ck

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


def _fake_rank(path: Path, rank: int) -> None:
    """Add a second rank's file to a world-of-one checkpoint, as a 2-rank manifest."""
    manifest = json.loads((path / "manifest.json").read_text())
    data = (path / "rank0.pt").read_bytes()
    (path / f"rank{rank}.pt").write_bytes(data)
    manifest["files"][f"rank{rank}.pt"] = dict(manifest["files"]["rank0.pt"])
    manifest["world_size"] = rank + 1
    (path / "manifest.json").write_text(json.dumps(manifest))


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
