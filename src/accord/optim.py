"""Optimizers the command line offers beyond torch's one-class ones.

``muon``: torch's ``torch.optim.Muon`` (momentum, then the update orthogonalised by
Newton-Schulz iterations; Jordan et al. 2024) for every 2-D parameter (weight matrices),
and AdamW for the rest (biases, norms' scales), the split Muon is designed for. Both take
the run's learning rate and weight decay: Muon's ``adjust_lr_fn="match_rms_adamw"`` scales
its update to AdamW's typical RMS (0.2 sqrt(max(A, B)) for an A x B matrix; Liu et al.,
"Muon is Scalable for LLM Training", arXiv 2502.16982), so one learning rate suits both.
Muon's momentum is ``--momentum`` (default 0.95, torch's), Nesterov.

Decision: an embedding or an output head that is 2-D goes to Muon too (torch cannot tell
them from hidden matrices); a task that wants them on AdamW builds its own optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

#: Muon's momentum when --momentum is not given (torch's default)
MUON_MOMENTUM = 0.95


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the 2-D parameters, AdamW on the others, as one optimizer: one
    ``step``/``zero_grad``, ``param_groups`` (Muon's groups first, so a learning-rate
    change reaches both) and one ``state_dict``."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, weight_decay: float = 0.0,
                 momentum: float = MUON_MOMENTUM) -> None:
        params = [p for p in params if p.requires_grad]
        matrices = [p for p in params if p.ndim == 2]
        others = [p for p in params if p.ndim != 2]
        if not params:
            raise ValueError("muon: no parameters that require gradients")
        super().__init__(params, {"lr": lr})  # hooks and bookkeeping of torch's base class
        self.muon = (torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay,
                                      momentum=momentum, nesterov=True,
                                      adjust_lr_fn="match_rms_adamw") if matrices else None)
        self.adamw = (torch.optim.AdamW(others, lr=lr, weight_decay=weight_decay)
                      if others else None)
        self.parts = [o for o in (self.muon, self.adamw) if o is not None]
        # the same group dicts as the inner optimizers': setting a group's lr here sets it
        self.param_groups = [g for o in self.parts for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.parts:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict() if self.muon else None,
                "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for name, opt in (("muon", self.muon), ("adamw", self.adamw)):
            if (opt is None) != (state_dict.get(name) is None):
                raise ValueError(f"muon: the saved state has {name} "
                                 f"{'state' if state_dict.get(name) else 'none'}, this "
                                 f"model {'has' if opt else 'has no'} such parameters")
            if opt is not None:
                opt.load_state_dict(state_dict[name])
        self.param_groups = [g for o in self.parts for g in o.param_groups]
