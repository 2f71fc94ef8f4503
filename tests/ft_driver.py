"""One fault-tolerant worker (a torchft replica group of one process) for tests/test_ft.py.

Trains a tiny regression model with an accord algorithm whose communicator is
:class:`accord.ft.membership.FTCommunicator`, one :class:`accord.ft.membership.FTWorker` step
at a time, and
writes one JSON line per step to ``--out`` (flushed at once, so a test can watch the
progress): ``{"step", "committed", "n", "params", "loss"}``, plus the worker's membership
events and a final ``{"done": true}``.

    python tests/ft_driver.py --replica 0 --lighthouse http://host:port --min 2 \
        --workers 3 --steps 20 --out OUT.jsonl [--algorithm local_sgd --hp period=2]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

import torch

torch.set_num_threads(1)


def batch(replica: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + replica)
    x = torch.randn(16, 4, generator=gen)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(16, 1, generator=gen)
    return x, y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replica", type=int, required=True)
    ap.add_argument("--lighthouse", required=True)
    ap.add_argument("--min", type=int, required=True)
    ap.add_argument("--workers", type=int, required=True, help="workers at launch")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--algorithm", default="allreduce")
    ap.add_argument("--hp", action="append", default=[], help="name=value")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per step")
    ap.add_argument("--timeouts", default="{}", help="JSON of FTTimeouts fields")
    ap.add_argument("--die-at", type=int, default=None,
                    help="SIGKILL itself at this step, just before its first collective")
    ap.add_argument("--go", default=None,
                    help="after start-up, write a 'ready' record and wait for this file")
    ap.add_argument("--hold", default=None, metavar="STEP:FILE",
                    help="before step STEP, wait for FILE")
    ap.add_argument("--fail-recovery-once", action="store_true",
                    help="the first fetch of a peer's state fails (an injected error)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch.distributed as dist

    from accord.algorithms import build
    from accord.core import StepContext
    from accord.ft import membership as ft

    hp = dict(kv.split("=", 1) for kv in args.hp)
    ft.check_algorithm(args.algorithm, hp)
    # accord's aggregators are built in a world of one; the FT communicator replaces it
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch.manual_seed(args.replica)  # different on purpose: step 0 makes them equal
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    agg = build(args.algorithm, list(model.parameters()), **hp)

    def get_state():
        return {"model": model.state_dict(), "opt": opt.state_dict(), "agg": agg.state_dict()}

    def set_state(state):
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        agg.load_state_dict(state["agg"])

    timeouts = ft.FTTimeouts(**json.loads(args.timeouts))
    worker = ft.FTWorker(args.replica, args.lighthouse, args.min, get_state, set_state,
                         timeouts=timeouts,
                         on_quorum=lambda comm: ft.refresh(agg, comm, args.workers))
    if args.fail_recovery_once:
        transport = worker.manager._checkpoint_transport
        real_recv, failed = transport.recv_checkpoint, []

        def recv_once(*a, **kw):
            if not failed:
                failed.append(True)
                raise RuntimeError("injected recovery failure")
            return real_recv(*a, **kw)

        transport.recv_checkpoint = recv_once
    out = open(args.out, "a", buffering=1)

    def emit(record):
        out.write(json.dumps(record) + "\n")

    if args.go:  # a start barrier: the first quorum then has every launched worker
        emit({"ready": True})
        while not os.path.exists(args.go):
            time.sleep(0.02)

    hold_step, hold_file = (args.hold.split(":", 1) if args.hold else (None, None))
    while worker.step < args.steps:
        if hold_step is not None and worker.step == int(hold_step):
            while not os.path.exists(hold_file):
                time.sleep(0.02)
        step = worker.begin()
        for event in worker.drain_events():
            emit(event)
        if step >= args.steps:
            break
        if worker.step_lost:  # lost at the quorum (a failed recovery): no compute
            worker.end()
            continue
        x, y = batch(args.replica, step)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        ctx = StepContext(step, loss.detach())
        if step == args.die_at:
            out.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        agg.after_backward(ctx)
        opt.step()
        agg.after_step(ctx)
        if args.sleep:
            time.sleep(args.sleep)
        n = worker.comm.world_size
        committed = worker.end()
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        centre = agg.consensus_params()  # EASGD's centre; None: the model itself
        consensus = params if centre is None else torch.cat([c.reshape(-1) for c in centre])
        emit({"step": step, "committed": committed, "n": n, "time": time.time(),
              "params": params.tolist(),
              "consensus": consensus.tolist(), "loss": float(loss.detach())})
    emit({"done": True, "step": worker.step, "discarded": worker.discarded,
          "stats": worker.comm.stats.as_dict()})
    out.close()
    worker.shutdown()


if __name__ == "__main__":
    main()
