"""``--optimizer muon``: torch's Muon on the weight matrices and AdamW on the rest, as one
optimizer that steps, zeroes, saves and resumes like one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from accord.optim import MuonAdamW

SRC = Path(__file__).resolve().parent.parent / "src"


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3))


def _loss(model, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
    return torch.nn.functional.mse_loss(model(x), y)


def _run(model, opt, steps) -> None:
    for step in steps:
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()


def test_it_is_muon_on_matrices_and_adamw_on_the_rest_exactly():
    """The oracle: torch's two optimizers built separately on the same split."""
    a, b = _model(), _model()
    ours = MuonAdamW(a.parameters(), lr=0.02, weight_decay=0.01, momentum=0.9)
    mats = [p for p in b.parameters() if p.ndim == 2]
    rest = [p for p in b.parameters() if p.ndim != 2]
    assert len(mats) == 2 and len(rest) == 4
    muon = torch.optim.Muon(mats, lr=0.02, weight_decay=0.01, momentum=0.9, nesterov=True,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(rest, lr=0.02, weight_decay=0.01)
    for step in range(5):
        ours.zero_grad()
        _loss(a, step).backward()
        ours.step()
        muon.zero_grad()
        adamw.zero_grad()
        _loss(b, step).backward()
        muon.step()
        adamw.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(a[0].weight, _model()[0].weight)  # it moved


def test_a_learning_rate_change_reaches_both_parts():
    opt = MuonAdamW(_model().parameters(), lr=0.1)
    assert len(opt.param_groups) == 2
    for group in opt.param_groups:
        group["lr"] = 0.5
    assert opt.muon.param_groups[0]["lr"] == opt.adamw.param_groups[0]["lr"] == 0.5


def test_resume_from_its_state_dict_is_bit_for_bit():
    model = _model()
    opt = MuonAdamW(model.parameters(), lr=0.02)
    _run(model, opt, range(6))
    straight = [p.detach().clone() for p in model.parameters()]
    model = _model()
    opt = MuonAdamW(model.parameters(), lr=0.02)
    _run(model, opt, range(3))
    saved = {"model": model.state_dict(), "opt": opt.state_dict()}
    model = _model()
    model.load_state_dict(saved["model"])
    opt = MuonAdamW(model.parameters(), lr=0.02)
    opt.load_state_dict(saved["opt"])
    _run(model, opt, range(3, 6))
    for p, q in zip(model.parameters(), straight, strict=True):
        assert torch.equal(p, q)


def test_a_state_of_another_model_is_one_line():
    opt = MuonAdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.1)  # no matrix
    with pytest.raises(ValueError) as e:
        opt.load_state_dict(MuonAdamW(_model().parameters(), lr=0.1).state_dict())
    assert "muon: the saved state has muon state, this model has no such parameters" == \
        str(e.value)


def test_accord_train_with_muon_under_diloco(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "accord", "train", "--algo", "diloco",
                          "--set", "period=3", "--optimizer", "muon", "--lr", "0.02",
                          "--steps", "9", "--log-every", "3", "--out", str(out),
                          "--no-progress"], env=env, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stderr
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["config"]["optimizer"] == "muon"
    steps = [r for r in records if r["type"] == "step"]
    assert [r["step"] for r in steps] == [3, 6, 9]
    assert steps[-1]["eval_loss"] < steps[0]["eval_loss"]  # it learns
    assert records[-1]["status"] == "ok"
