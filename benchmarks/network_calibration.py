"""`--network` against real shaped links: emulated vs measured time of every operation kind.

    .venv/bin/python benchmarks/network_calibration.py [--worlds 2,3,4] [--links 10mbit,100mbit]
        [--sizes 40000,1000000] [--repeats 5]

Needs root (network namespaces: :mod:`accord.run.testbed`). For each world size N and link, N
hosts each run one rank (so every pair of ranks talks over a real link of that bandwidth,
as ``--network`` assumes), and every rank times accord's Communicator calls on the real
network, no emulation: ``allreduce`` (``all_reduce_``), ``allgather`` (``all_gather``,
per-rank contribution M/N), ``broadcast`` (``broadcast_``), ``send``/``recv`` (rank 0 to
rank 1, the others idle), ``exchange`` (ranks 0 and 1 swap), ``multi_exchange`` (each
rank sends to the next rank of a ring and receives from the previous one) and ``round``
(one round of the background exchange engine: its 16-byte all-gather of progress metadata, then the
allreduce of the weighted models). A call's time is the slowest rank's, from a barrier,
the median of ``--repeats``. ``emulated`` is what :mod:`accord.comm.network` charges for the
same call on a ``Link`` of that bandwidth (latency 0: the testbed cannot add any, netem is
missing). Payloads: 40 kB (the digits model's gradient, 38.4 kB) and 1 MB.

What it cannot show: latency (no netem: the measured alpha is the veth's and the
processes' own, tens of microseconds); and every rank of every host shares this machine's
2 cores, so at 1 Gbit/s and above the measurement is of the CPU, not the link (hence the
default links stop at 100 Mbit/s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

OPS = ("allreduce", "allgather", "broadcast", "send", "exchange", "multi_exchange", "round")
PORT = 29600


def worker(sizes: list[int], repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from accord.comm import Communicator

    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    comm = Communicator()
    results = []
    for size in sizes:
        for op in OPS:
            times = []
            for _ in range(repeats + 1):  # the first call sets up connections: dropped
                buf = torch.ones(size // 4)
                dist.barrier()
                t0 = time.perf_counter()
                if op == "allreduce":
                    comm.all_reduce_(buf)
                elif op == "allgather":
                    comm.all_gather(torch.ones(max(1, size // 4 // n)))
                elif op == "broadcast":
                    comm.broadcast_(buf, src=0)
                elif op == "send":
                    if rank == 0:
                        comm.send(buf, 1)
                    elif rank == 1:
                        comm.recv_(buf, 0)
                elif op == "exchange":
                    if rank in (0, 1):
                        comm.exchange_(buf, torch.empty_like(buf), 1 - rank)
                elif op == "multi_exchange":  # a ring: send to the next, receive from the last
                    comm.multi_exchange_([(buf, (rank + 1) % n)],
                                         [(torch.empty_like(buf), (rank - 1) % n)])
                else:  # the engine's round: metadata all-gather, then the weighted mean
                    comm.all_gather(torch.ones(4))
                    comm.all_reduce_(buf)
                took = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(took, op=dist.ReduceOp.MAX)
                times.append(float(took))
            results.append({"op": op, "bytes": size, "seconds": statistics.median(times[1:])})
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def emulated(op: str, size: int, n: int, link) -> float:
    from accord.comm import network as net

    if op == "allgather":
        return link.seconds(net.ALLGATHER, max(1, size // 4 // n) * 4, n)
    if op == "send":
        return link.seconds(net.SEND, size, 2)
    if op == "exchange":
        return link.seconds(net.EXCHANGE, size, 2)
    if op == "multi_exchange":
        return link.seconds(net.MULTI_EXCHANGE, size, n)
    if op == "round":
        return link.seconds(net.ALLGATHER, 16, n) + link.seconds(net.ALLREDUCE, size, n)
    return link.seconds({"allreduce": net.ALLREDUCE, "broadcast": net.BROADCAST}[op], size, n)


def measure(n: int, link_text: str, sizes: list[int], repeats: int, tmp: Path) -> list[dict]:
    from accord.comm.network import parse_network
    from accord.run.testbed import Testbed

    link = parse_network(link_text)
    out = tmp / f"calib-{n}-{link_text}.json"
    with Testbed(n, link) as tb:
        procs = []
        for i in range(n):
            env = {**os.environ, "RANK": str(i), "WORLD_SIZE": str(n),
                   "MASTER_ADDR": tb.addr(0), "MASTER_PORT": str(PORT)}
            procs.append(tb.start(i, [sys.executable, __file__, "--worker",
                                      "--sizes", ",".join(map(str, sizes)),
                                      "--repeats", str(repeats), "--result", str(out)],
                                  env=env))
        for p in procs:
            if p.wait(timeout=1800) != 0:
                raise SystemExit(f"a worker failed (exit {p.returncode})")
    rows = json.loads(out.read_text())
    for r in rows:
        r.update(n=n, link=link_text, emulated=emulated(r["op"], r["bytes"], n, link))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", default="2,3,4")
    ap.add_argument("--links", default="10mbit,100mbit")
    ap.add_argument("--sizes", default="40000,1000000")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        worker(sizes, args.repeats, args.result)
        return 0
    from accord.run.testbed import available

    reason = available()
    if reason is not None:
        print(f"network_calibration: {reason}", file=sys.stderr)
        return 2
    tmp = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True).stdout.strip())
    rows = []
    for link in args.links.split(","):
        for n in (int(w) for w in args.worlds.split(",")):
            rows += measure(n, link, sizes, args.repeats, tmp)
            print(f"  measured N={n} at {link}", file=sys.stderr, flush=True)
    print(f"{'op':<10} {'N':>2} {'link':>8} {'bytes':>8} {'measured s':>11} "
          f"{'emulated s':>11} {'meas/emu':>9}")
    for r in rows:
        ratio = r["seconds"] / r["emulated"] if r["emulated"] > 0 else float("inf")
        print(f"{r['op']:<10} {r['n']:>2} {r['link']:>8} {r['bytes']:>8} "
              f"{r['seconds']:>11.4f} {r['emulated']:>11.4f} {ratio:>9.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
