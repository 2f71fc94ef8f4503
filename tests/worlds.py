"""Run a function on every rank of a real gloo world of spawned processes.

Children come from a forkserver that has preloaded torch, so a world starts in a fraction
of a second; the process group gets a short timeout so a mismatched collective fails the
test instead of hanging it.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import socket
import traceback
from datetime import timedelta

import torch

PG_TIMEOUT_S = 30
WORLD_TIMEOUT_S = 120

_ctx = mp.get_context("forkserver")
# the first optimizer step imports torch._dynamo (seconds per process): do it once here
_ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "accord", "worlds"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, args, queue):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"})
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=timedelta(seconds=PG_TIMEOUT_S))
        result = fn(rank, world, *args)
        # serialise here: torch's queue pickling would share memory with an exiting process
        buf = io.BytesIO()
        torch.save(result, buf)
        queue.put((rank, True, buf.getvalue()))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(fn, world: int, *args):
    """``fn(rank, world, *args)`` on each rank; returns the per-rank results in rank order.
    ``fn`` must be a module-level function; results must be picklable."""
    queue = _ctx.Queue()
    port = free_port()
    procs = [_ctx.Process(target=_entry, args=(fn, r, world, port, args, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, ok, value = queue.get(timeout=WORLD_TIMEOUT_S)
            if ok:
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("world failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world)]
