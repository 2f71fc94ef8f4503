"""Zero-copy gradient buffers: after a gradient-phase step every ``.grad`` is a view of the
aggregator's flat buffer, the next backward accumulates into it in place, and the results
equal a plain average computed independently (zero_grad with and without set_to_none,
unused parameters, several steps)."""

from __future__ import annotations

import pytest
import torch
from worlds import run_world


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _grads_world(rank, world, set_to_none, algo):
    import accord

    model = _model()
    unused = torch.nn.Parameter(torch.ones(4))  # never in the graph: its grad counts as zero
    params = [*model.parameters(), unused]
    agg = accord.build(algo, params)
    flat = agg.flat
    out = []
    for step in range(3):
        for p in params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        x = torch.randn(4, 5, generator=torch.Generator().manual_seed(10 * step + rank))
        model(x).square().mean().backward()
        local = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        bound_before = [p.grad is not None and p.grad.data_ptr() == v.data_ptr()
                        for p, v in zip(params, flat.views, strict=True)]
        agg.after_backward(accord.StepContext(step=step))
        bound_after = [p.grad.data_ptr() == v.data_ptr()
                       for p, v in zip(params, flat.views, strict=True)]
        out.append((local, [p.grad.clone() for p in params], bound_before, bound_after))
        with torch.no_grad():
            for p in params:
                p.sub_(0.1 * p.grad)
    return out


@pytest.mark.parametrize("set_to_none", [False, True])
def test_averaging_is_zero_copy_and_exact(set_to_none):
    world = 3
    results = run_world(_grads_world, world, set_to_none, "allreduce")
    for step in range(3):
        locals_ = [r[step][0] for r in results]
        want = [sum(ls[i] for ls in locals_) / world for i in range(len(locals_[0]))]
        for r in results:
            _, got, before, after = r[step]
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
            assert all(after)  # every .grad is the buffer's memory after the step
            if step > 0 and not set_to_none:
                # the used parameters' gradients were accumulated into the buffer in place
                assert before[:-1] == [True] * (len(before) - 1)
            if set_to_none:
                assert not any(before)


def test_normalized_and_acga_bind_too():
    for algo in ("normalized", "acga"):
        results = run_world(_grads_world, 2, False, algo)
        for r in results:
            assert all(r[-1][3])
        # replicas agree: the written gradient is the same on every rank
        for a, b in zip(results[0][-1][1], results[1][-1][1], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
