"""Streaming DiLoCo (accord.algorithms.streaming_diloco) on real gloo worlds.

* one fragment, no delay, alpha 0 equals ``diloco`` bit for bit, step by step (with
  BatchNorm buffers, and under ``--compress bf16``);
* oracle: torchft 0.2.0's own ``torchft.local_sgd.DiLoCo`` with fragments, delay and alpha,
  run on the same gloo world through a minimal stand-in for its Manager (synchronous
  quorum, every step committed, average allreduce = SUM then divide by N as
  ``Manager.allreduce`` does); equal to float rounding;
* the schedule: which fragment starts and merges at which step, the bytes sent;
* the checks of the hyperparameters, without a process group.

Resume bit for bit (an exchange in flight at the checkpoint) is in tests/test_state.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from worlds import run_world

import accord
from accord.algorithms.streaming_diloco import StreamingDiLoCo, fragment_offsets, layers_of
from accord.comm import compress_payloads
from accord.comm.compress import Compressor

STEPS = 13
WORLD = 3

#: label -> (streaming_diloco hyperparameters) run against torchft's DiLoCo
ORACLE = {
    "p2_tau1_a05": {"period": 4, "fragments": 2, "delay": 1, "alpha": 0.5},
    "p3_tau1_a025": {"period": 6, "fragments": 3, "delay": 1, "alpha": 0.25},
    "p2_tau0_a0": {"period": 4, "fragments": 2, "delay": 0, "alpha": 0.0},
    "p1_tau2_a075": {"period": 3, "fragments": 1, "delay": 2, "alpha": 0.75},
}


def _bn_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 2))


def _mlp() -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(),
                         nn.Linear(8, 2))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * rank + step)
    return torch.randn(8, 6, generator=gen) + 0.5 * rank, torch.randn(8, 2, generator=gen)


def _state(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).clone() for t in
                      [*model.parameters(), *model.buffers()] if t.is_floating_point()])


def _run_accord(rank, algo, hp, model, steps=STEPS):
    agg = accord.build(algo, model.parameters(), buffers=model.buffers(), **hp)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trace = []
    for step in range(steps):
        x, y = _batch(rank, step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        ctx = accord.StepContext(step=step)
        agg.after_backward(ctx)
        opt.step()
        agg.after_step(ctx)
        trace.append(_state(model))
    stats = agg.comm.stats.as_dict()
    torch.distributed.barrier()
    agg.close()
    return trace, stats


class _Manager:
    """What torchft's DiLoCo asks of its Manager, on the default gloo group: a synchronous
    quorum, every step committed (``should_commit`` advances ``current_step``), and an
    average allreduce as ``Manager.allreduce`` computes it (a SUM, then a division by the
    number of participants)."""

    _use_async_quorum = False

    def __init__(self) -> None:
        self.step = 0

    def start_quorum(self) -> None:
        pass

    def current_step(self) -> int:
        return self.step

    def should_commit(self) -> bool:
        self.step += 1
        return True

    def allreduce(self, tensor, should_quantize=False):
        from torchft.work import _DummyWork

        assert not should_quantize
        torch.distributed.all_reduce(tensor)
        tensor /= torch.distributed.get_world_size()
        return _DummyWork(tensor)

    def register_state_dict_fn(self, *args) -> None:
        pass

    def allow_state_dict_read(self) -> None:
        pass

    def disallow_state_dict_read(self) -> None:
        pass


def _run_torchft(rank, hp):
    from torchft.local_sgd import DiLoCo

    model = _mlp()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    # accord's fragments: layer l (a Linear: weight and bias) in fragment l mod P
    fragments = [nn.ModuleList(linears[p::hp["fragments"]]) for p in range(hp["fragments"])]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    outer = [torch.optim.SGD(f.parameters(), lr=0.7, momentum=0.9, nesterov=True)
             for f in fragments]
    trace = []
    with DiLoCo(_Manager(), fragments, opt, outer, sync_every=hp["period"],
                fragment_sync_delay=hp["delay"], fragment_update_alpha=hp["alpha"]):
        for step in range(STEPS):
            x, y = _batch(rank, step)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()  # torchft's post-step hook does its part here
            trace.append(_state(model))
    return trace


def _world(rank: int, world: int) -> dict:
    out: dict = {}
    for compress in (None, "bf16"):
        compress_payloads(None if compress is None else Compressor(compress))
        hp = {"period": 3, "outer_lr": 0.7, "outer_momentum": 0.9}
        out[("diloco", compress)] = _run_accord(rank, "diloco", hp, _bn_model())
        out[("streaming", compress)] = _run_accord(
            rank, "streaming_diloco", {**hp, "fragments": 1, "delay": 0, "alpha": 0.0},
            _bn_model())
    # two fragments of one size (88 numbers each) under a compressor with error feedback
    compressor = Compressor("int8")
    compress_payloads(compressor)
    out["int8"] = _run_accord(rank, "streaming_diloco", ORACLE["p2_tau1_a05"], _mlp())
    out["int8_sites"] = sorted(compressor.state_dict()["sites"])
    compress_payloads(None)
    for label, hp in ORACLE.items():
        out[("accord", label)] = _run_accord(rank, "streaming_diloco", hp, _mlp())
        out[("torchft", label)] = _run_torchft(rank, hp)
    return out


@pytest.fixture(scope="module")
def results():
    return run_world(_world, WORLD)


@pytest.mark.parametrize("compress", [None, "bf16"])
def test_one_fragment_no_delay_equals_diloco_bit_for_bit(results, compress):
    for r, out in enumerate(results):
        ref, ref_stats = out[("diloco", compress)]
        got, stats = out[("streaming", compress)]
        for step, (a, b) in enumerate(zip(ref, got, strict=True)):
            assert torch.equal(a, b), f"rank {r} step {step}: max diff {(a - b).abs().max()}"
        assert stats["allreduce"]["calls"] == ref_stats["allreduce"]["calls"] == STEPS // 3
        assert stats["allreduce"]["bytes"] == ref_stats["allreduce"]["bytes"]


@pytest.mark.parametrize("label", list(ORACLE))
def test_equals_torchft_diloco_with_fragments(results, label):
    for r, out in enumerate(results):
        got, _ = out[("accord", label)]
        ref = out[("torchft", label)]
        for step, (a, b) in enumerate(zip(got, ref, strict=True)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, r=r, s=step: f"rank {r} step {s}: {m}")
        assert not torch.equal(got[-1], _mlp_start()), "the run must have moved"


def _mlp_start() -> torch.Tensor:
    return _state(_mlp())


def test_fragments_are_synchronised_in_turn(results):
    """P = 2, tau = 1, H = 4 on [Linear(6,10), Linear(10,8), Linear(8,2)]: fragment 0 =
    layers 0 and 2 (70 + 18 numbers), fragment 1 = layer 1 (88); offsets 2 and 4, so the
    starts are at steps 0 (p0), 2 (p1), 4 (p0), ... one allreduce per start."""
    _, stats = results[0][("accord", "p2_tau1_a05")]
    starts = [s for s in range(STEPS) if (s + 2 - 2) % 4 == 0 or (s + 2 - 4) % 4 == 0]
    assert starts == [0, 2, 4, 6, 8, 10, 12]
    p0, p1 = (60 + 10 + 16 + 2) * 4, (80 + 8) * 4
    assert stats["allreduce_fragment0"] == {"calls": 4, "bytes": 4 * p0,
                                            "seconds": stats["allreduce_fragment0"]["seconds"]}
    assert stats["allreduce_fragment1"]["calls"] == 3
    assert stats["allreduce_fragment1"]["bytes"] == 3 * p1
    assert "allreduce" not in stats and len(starts) == 7
    # alpha = 0, tau = 0: fragment 1 (numbers 70:158) merges at step 11 and is then the
    # same on every rank; fragment 0 merged at step 9 and trained two local steps since
    after = [out[("accord", "p2_tau0_a0")][0][11] for out in results]
    assert all(torch.equal(a[70:158], after[0][70:158]) for a in after)
    assert not torch.equal(after[0][:70], after[1][:70])


def test_schedule_and_layers_without_a_process_group():
    assert fragment_offsets(4, 2) == [2, 4]
    assert fragment_offsets(10, 3) == [3, 6, 10]
    assert fragment_offsets(5, 1) == [5]
    shapes = [torch.Size(s) for s in [(4,), (3, 4), (3,), (3,), (2, 3), (2, 3, 1, 1), (2,)]]
    assert layers_of(shapes) == [0, 1, 1, 1, 2, 3, 3]
    hp = {"period": 8, "fragments": 4, "delay": 1}
    StreamingDiLoCo.check(hp, 2)
    with pytest.raises(ValueError, match="'delay': got 2 .* below period // fragments = 2"):
        StreamingDiLoCo.check({**hp, "delay": 2}, 2)
    with pytest.raises(ValueError, match="'fragments': got 9 with period 8"):
        StreamingDiLoCo.check({**hp, "fragments": 9, "delay": 0}, 2)
    with pytest.raises(ValueError, match="--fault-tolerant: algorithm 'streaming_diloco' is "
                                         "refused: an outer exchange stays in flight"):
        StreamingDiLoCo.check_fault_tolerant({})


def test_each_fragment_has_its_own_error_memory_under_a_compressor(results):
    """The two fragments have the same size: keyed by kind, the int8 compressor keeps one
    error memory each, and the run stays close to the uncompressed one."""
    for out in results:
        assert [k.split(":")[:2] for k in out["int8_sites"]] == [
            ["allreduce_fragment0", "88"], ["allreduce_fragment1", "88"]]
        got, stats = out["int8"]
        plain = out[("accord", "p2_tau1_a05")][0]
        assert stats["allreduce_fragment0"]["calls"] == 4
        torch.testing.assert_close(got[-1], plain[-1], rtol=0, atol=0.05)
