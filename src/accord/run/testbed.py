"""Real links on one machine: several "hosts" as Linux network namespaces.

``python -m accord.run.testbed torchrun --hosts 2 --nproc 2 --link 10mbit --out runs/tb -- \\
--algo allreduce --task digits --steps 60`` runs ``accord train`` under ``torchrun --nnodes 2``
across two network namespaces joined by a shaped link, collects the hosts' run directories
into ``runs/tb`` and removes every namespace and process it made. ``ft`` does the same for
the fault-tolerant launcher (the Lighthouse on host 0, one launcher per host, then
``accord ft-merge``). Tests and ``benchmarks/`` use :class:`Testbed` directly.

Why a module run with ``python -m`` and not an ``accord testbed`` subcommand: it needs root
and Linux, it builds and tears down machine-wide state (namespaces, /etc/netns files), and
it exists to test and measure accord, not to train with it; keeping it out of the user CLI
keeps ``accord --help`` about training. It only imports the standard library and
:mod:`accord.comm.network` (for the link text and profile schema), so it is cheap to import.

The layout, for H hosts with prefix ``P`` (``acctb-<pid>-``, unique per testbed)::

    namespace P sw:  bridge br0, ports p0 .. p<H-1>       (the switch; nothing else)
    namespace P h<i>: tb0 (veth to p<i>), 10.77.0.<i+1>/24, lo; hostname host<i>

Nothing is created in the root namespace: every veth is created inside its namespaces, and
addresses exist only there (so several testbeds may use 10.77.0.0/24 at once). Each host
gets a UTS namespace of its own (``unshare --uts``) and hostname ``host<i>``, resolved by
``/etc/netns/P h<i>/hosts`` (which ``ip netns exec`` bind-mounts over /etc/hosts): accord and
torch see distinct hosts, as on a cluster. Not separated: the process id space and the file
system (a run directory is on the one disk every host sees; :func:`run_torchrun` gives each
host a directory of its own unless ``shared=True``, which stands for a shared filesystem
such as NFS) and, above all, the CPU: every process of every host shares this machine's
cores, so compute is slower than on H machines and communication competes with it.

Shaping: each host's egress (``tb0``) has an ``htb`` qdisc with one class per other host,
selected by destination address, at the bandwidth of that pair's link: the ordered pair
(i, j) has its own full-duplex link, as :class:`accord.comm.network.Network` prices a pair.
``--link BANDWIDTH`` sets every pair; ``--link-profile FILE`` is a ``--network-profile``
file whose ``ranks`` are *host* indices. Latency needs the ``netem`` qdisc; a link with
latency is refused in one line where the kernel has no netem (as on the machines this was
built on, so the testbed shows bandwidth, not latency). Traffic between the ranks of one
host stays on that host's loopback, unshaped, as it would on one machine of a cluster.

Teardown (:meth:`Testbed.down`) kills every process inside the hosts' namespaces (``ip netns
pids``, so a grandchild that left its process group goes too), deletes the namespaces
(which deletes their veths and bridge) and the /etc/netns files; it runs on ``with`` exit,
on failure, at interpreter exit (atexit) and, from the command line, on Ctrl-C and SIGTERM.
A testbed whose owner was SIGKILLed is swept by the next one (:func:`sweep_stale`: any
``acctb-<pid>-`` namespace whose pid is gone).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..comm.network import Link, Network, load_network_profile, parse_network

__all__ = ["Testbed", "TestbedError", "HostsRun", "available", "leftovers", "run_torchrun",
           "run_fault_tolerant", "sweep_stale", "main"]

SUBNET = "10.77.0"
IFACE = "tb0"
_NAME = re.compile(r"^acctb-(\d+)-")
NETNS_ETC = Path("/etc/netns")
#: torchrun's rendezvous port and the Lighthouse's, on host 0
RDZV_PORT = 29400
#: an Ethernet frame of a 1500-byte MTU as the qdisc counts it (IP packet + 14-byte header)
_FRAME = 1514
LIGHTHOUSE_PORT = 29510


class TestbedError(RuntimeError):
    """A testbed that cannot be built or a run on it that failed (one line)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise TestbedError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res


def _tc(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise TestbedError(f"tc {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res


_AVAILABLE: list[str | None] = []


def available() -> str | None:
    """None when this process can build a testbed, else the reason in one line (not Linux,
    not root, a tool missing, network namespaces refused by the kernel or a container)."""
    if _AVAILABLE:
        return _AVAILABLE[0]
    reason: str | None = None
    if not sys.platform.startswith("linux"):
        reason = "network namespaces need Linux"
    elif os.geteuid() != 0:
        reason = "network namespaces need root (run as root, e.g. with sudo)"
    else:
        missing = [t for t in ("ip", "tc", "unshare") if shutil.which(t) is None]
        if missing:
            reason = f"{', '.join(missing)} not found (install iproute2 and util-linux)"
    if reason is None:
        probe = f"acctb-{os.getpid()}-probe"
        res = _ip("netns", "add", probe, check=False)
        if res.returncode != 0:
            reason = f"network namespaces unavailable here: {res.stderr.strip()}"
        else:
            _ip("netns", "del", probe, check=False)
    _AVAILABLE.append(reason)
    return reason


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _namespaces() -> list[str]:
    res = _ip("netns", "list", check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def leftovers(prefix: str = "acctb-") -> list[str]:
    """What a testbed whose names start with ``prefix`` left behind: namespaces, /etc/netns
    directories and root-namespace links (there should never be any of the last), and
    processes in those namespaces. Empty when everything was torn down."""
    found = [f"namespace {n}" for n in _namespaces() if n.startswith(prefix)]
    for n in found:
        name = n.split()[1]
        pids = _ip("netns", "pids", name, check=False).stdout.split()
        found += [f"process {p} in {name}" for p in pids]
    if NETNS_ETC.is_dir():
        found += [f"/etc/netns/{d.name}" for d in NETNS_ETC.iterdir()
                  if d.name.startswith(prefix)]
    links = _ip("-o", "link", check=False).stdout
    found += [f"link {m}" for m in re.findall(r"^\d+: ([^:@]+)", links, re.M)
              if m.startswith((prefix, IFACE, "br0")) or re.fullmatch(r"p\d+", m)]
    return found


def _kill_namespace(ns: str) -> None:
    """SIGKILL every process inside ``ns``, until none is left (a dying parent may fork)."""
    for _ in range(50):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            return
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        time.sleep(0.05)


def _delete(ns: str) -> None:
    _kill_namespace(ns)
    _ip("netns", "del", ns, check=False)
    shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)


def sweep_stale() -> list[str]:
    """Delete the namespaces (and their processes, /etc/netns files) of testbeds whose
    owning process is gone (SIGKILLed: no teardown ran); returns their names."""
    names = set(_namespaces())
    if NETNS_ETC.is_dir():
        names |= {d.name for d in NETNS_ETC.iterdir()}
    swept = []
    for ns in sorted(names):
        m = _NAME.match(ns)
        if m and not _alive(int(m[1])):
            _delete(ns)
            swept.append(ns)
    return swept


def _rate(link: Link) -> str:
    return f"{max(1, round(link.bandwidth * 8))}bit"


class Testbed:
    """H hosts (network namespaces) on one switch, each pair of hosts on a link priced by
    ``network`` (a :class:`Network` whose "ranks" are host indices, a :class:`Link` for
    every pair, or None: unshaped veths). Use as a context manager; :meth:`down` is
    idempotent and also registered with atexit."""

    def __init__(self, hosts: int, network: Network | Link | None = None, *,
                 prefix: str | None = None) -> None:
        if not 1 <= hosts <= 250:
            raise TestbedError(f"hosts: got {hosts!r}; allowed: 1 to 250")
        if isinstance(network, Link):
            network = Network(network)
        if network is not None:
            network.check_ranks(hosts)
            links = [network.default, *network.pairs.values()]
            if any(link.latency > 0 for link in links) and not _netem_available():
                raise TestbedError("link latency needs the netem qdisc, which this kernel "
                                   "lacks; allowed: bandwidth only, such as 10mbit")
        reason = available()
        if reason is not None:
            raise TestbedError(f"testbed: {reason}")
        self.hosts = hosts
        self.network = network
        self.prefix = prefix or f"acctb-{os.getpid()}-"
        self.switch = f"{self.prefix}sw"
        self.procs: list[subprocess.Popen] = []
        self._up = False

    def ns(self, i: int) -> str:
        return f"{self.prefix}h{i}"

    @staticmethod
    def addr(i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    @staticmethod
    def hostname(i: int) -> str:
        return f"host{i}"

    def link(self, i: int, j: int) -> Link | None:
        if self.network is None:
            return None
        return self.network.pairs.get((min(i, j), max(i, j)), self.network.default)

    # -- build and tear down ----------------------------------------------------------
    def up(self) -> Testbed:
        sweep_stale()
        atexit.register(self.down)
        self._up = True
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        sw = self.switch
        _ip("netns", "add", sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(
            f"{self.addr(i)} {self.hostname(i)}\n" for i in range(self.hosts))
        for i in range(self.hosts):
            ns = self.ns(i)
            _ip("netns", "add", ns)
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / ns / "hosts").write_text(hosts_file)
            _ip("link", "add", IFACE, "netns", ns, "type", "veth",
                "peer", "name", f"p{i}", "netns", sw)
            _ip("-n", sw, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", sw, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", IFACE)
            # frames of one MTU: veths otherwise hand the qdisc 64 KiB TSO/GSO segments,
            # which a shaper must let through whole (bursts a real link never sends)
            _ip("-n", ns, "link", "set", IFACE, "gso_max_size", str(_FRAME))
            _ip("-n", ns, "link", "set", IFACE, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if self.network is not None:
                self._shape(i)

    def _shape(self, i: int) -> None:
        """htb on host i's egress: for each host j a class at link(i, j) (1:1jj) with two
        children, one for small packets (TCP ACKs, prio 0) and one for the rest, so ACKs
        do not queue behind the other direction's data (a modern host's fq_codel keeps
        them apart; this kernel has none). Measured: it did not change the two-way
        exchange's halved speed, which is gloo's own (accord.comm.network: one peer); two raw
        TCP streams in opposite directions each run at the full rate either way."""
        ns = self.ns(i)
        _tc(ns, "qdisc", "add", "dev", IFACE, "root", "handle", "1:", "htb", "default", "1")
        # unclassified traffic (ARP) at the default link, so it cannot bypass the shaping
        _tc(ns, "class", "add", "dev", IFACE, "parent", "1:", "classid", "1:1", "htb",
            "rate", _rate(self.network.default))
        for j in range(self.hosts):
            if j == i:
                continue
            link = self.link(i, j)
            pair, acks, data = (f"1:{k + j:x}" for k in (0x100, 0x200, 0x300))
            # a bucket of two frames (or 200 us at the link's rate): a larger one lets a
            # small message through at memory speed, which no real link does
            burst = ["burst", str(max(2 * _FRAME, int(link.bandwidth * 2e-4)))]
            rate = link.bandwidth
            _tc(ns, "class", "add", "dev", IFACE, "parent", "1:", "classid", pair, "htb",
                "rate", _rate(link), *burst)
            for cls, share, prio in ((acks, 0.1, "0"), (data, 0.9, "1")):
                _tc(ns, "class", "add", "dev", IFACE, "parent", pair, "classid", cls, "htb",
                    "rate", _rate(Link(rate * share)), "ceil", _rate(link), "prio", prio,
                    *burst)
                if link.latency > 0:
                    _tc(ns, "qdisc", "add", "dev", IFACE, "parent", cls, "netem",
                        "delay", f"{link.latency * 1e6:.0f}us", "limit", "100000")
                else:
                    _tc(ns, "qdisc", "add", "dev", IFACE, "parent", cls, "pfifo",
                        "limit", "10000")
            dst = ["match", "ip", "dst", f"{self.addr(j)}/32"]
            # IP total length below 64 bytes: a bare ACK (52 bytes with TCP timestamps)
            _tc(ns, "filter", "add", "dev", IFACE, "parent", "1:", "protocol", "ip", "prio",
                "1", "u32", *dst, "match", "u16", "0x0000", "0xffc0", "at", "2",
                "flowid", acks)
            _tc(ns, "filter", "add", "dev", IFACE, "parent", "1:", "protocol", "ip", "prio",
                "2", "u32", *dst, "flowid", data)

    def down(self) -> None:
        """Kill every process in the hosts, delete the namespaces and /etc/netns files."""
        if not self._up:
            return
        self._up = False
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        for i in range(self.hosts):
            _delete(self.ns(i))
        _delete(self.switch)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        with contextlib.suppress(Exception):
            atexit.unregister(self.down)

    def __enter__(self) -> Testbed:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- processes --------------------------------------------------------------------
    def argv(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run on host i: in its network namespace and a UTS namespace named
        host<i>."""
        return ["ip", "netns", "exec", self.ns(i), "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostname(i), *argv]

    def start(self, i: int, argv: Sequence[str], *, env: dict[str, str] | None = None,
              **popen: object) -> subprocess.Popen:
        """Start ``argv`` on host i in a session of its own (so it is killed as a group);
        gloo binds to the host's interface (GLOO_SOCKET_IFNAME), as on a cluster with
        several interfaces."""
        full = dict(os.environ if env is None else env)
        full.setdefault("GLOO_SOCKET_IFNAME", IFACE)
        full.setdefault("OMP_NUM_THREADS", "1")
        p = subprocess.Popen(self.argv(i, argv), env=full, start_new_session=True,
                             **popen)  # type: ignore[call-overload]
        self.procs.append(p)
        return p

    def kill_host(self, i: int) -> None:
        """The loss of host i: every process on it SIGKILLed, its link taken down."""
        _kill_namespace(self.ns(i))
        _ip("-n", self.switch, "link", "set", f"p{i}", "down", check=False)


def _netem_available() -> bool:
    if available() is not None:
        return True  # the root/namespace reason is the one to report
    probe = f"acctb-{os.getpid()}-netem"
    try:
        _ip("netns", "add", probe)
        res = subprocess.run(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root",
                              "netem", "delay", "1ms"], capture_output=True)
        return res.returncode == 0
    finally:
        _ip("netns", "del", probe, check=False)


# -- runs across hosts -----------------------------------------------------------------
@dataclass
class HostsRun:
    """What a run across hosts left: each host's exit status and output, the wall time."""

    out: Path
    returncodes: list[int | None]
    outputs: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)


def _accord_train() -> list[str]:
    return [sys.executable, "-m", "accord", "train"]


def _wait(tb: Testbed, procs: list[subprocess.Popen], timeout: float, what: str,
          logs: list[Path]) -> list[int | None]:
    deadline = time.monotonic() + timeout
    for p in procs:
        left = deadline - time.monotonic()
        try:
            p.wait(timeout=max(0.1, left))
        except subprocess.TimeoutExpired:
            tb.down()
            tails = " | ".join(log.read_text(errors="replace").strip().splitlines()[-1]
                               for log in logs if log.exists() and log.stat().st_size)
            raise TestbedError(f"{what}: not finished after {timeout:g} s (killed); "
                               f"last lines: {tails}") from None
    return [p.returncode for p in procs]


def host_dirs(out: Path, hosts: int) -> list[Path]:
    return [out / "hosts" / f"host{i}" for i in range(hosts)]


def run_torchrun(tb: Testbed, nproc: int, train_args: Sequence[str], out: str | Path, *,
                 shared: bool = False, timeout: float = 600.0,
                 env: dict[str, str] | None = None) -> HostsRun:
    """``accord train TRAIN_ARGS`` under ``torchrun --nnodes H --nproc_per_node nproc``, one
    agent per host, c10d rendezvous on host 0. ``shared``: every host writes to ``out`` (a
    shared filesystem); else host i writes ``out/hosts/host<i>`` and :func:`collect_torchrun`
    gathers them into ``out``. Each host's output is in ``out/hosts/host<i>.log``."""
    out = Path(out)
    (out / "hosts").mkdir(parents=True, exist_ok=True)
    dirs = [out] * tb.hosts if shared else host_dirs(out, tb.hosts)
    logs = [out / "hosts" / f"host{i}.log" for i in range(tb.hosts)]
    procs = []
    start = time.monotonic()
    for i in range(tb.hosts):
        argv = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={tb.hosts}",
                f"--nproc_per_node={nproc}", f"--node_rank={i}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={tb.addr(0)}:{RDZV_PORT}", "--rdzv_id=accord-testbed",
                f"--rdzv_conf=is_host={'true' if i == 0 else 'false'}",
                f"--local_addr={tb.addr(i)}", "--max_restarts=0",
                "-m", "accord", "train", *train_args, "--out", str(dirs[i])]
        with open(logs[i], "wb") as log:
            procs.append(tb.start(i, argv, env=env, stdout=log, stderr=subprocess.STDOUT))
    rcs = _wait(tb, procs, timeout, "torchrun", logs)
    run = HostsRun(out, rcs, [log.read_text(errors="replace") for log in logs],
                   time.monotonic() - start)
    if not shared:
        collect_torchrun(out, dirs)
    return run


def collect_torchrun(out: Path, dirs: Sequence[Path]) -> None:
    """One run directory from the hosts' of a torchrun run: global rank 0's host (host 0)
    gives every file it wrote (metrics.jsonl, its logs, figures); every other host adds
    its ranks' files under logs/ (heartbeats, errors, tracebacks: one name per rank, so
    none collide). A file already in ``out`` is kept."""
    for src in dirs:
        if not src.is_dir():
            continue
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if path.is_dir() or rel.parts[0] == ".accord.lock":
                continue
            if src != dirs[0] and rel.parts[0] != "logs":
                continue
            dest = out / rel
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)


def _span(lo: int, hi: int) -> str:
    return f"{lo}-{hi - 1}" if hi - lo > 1 else f"{lo}"


def run_fault_tolerant(tb: Testbed, per_host: int, train_args: Sequence[str],
                       out: str | Path, *, min_workers: int = 1, timeout: float = 600.0,
                       env: dict[str, str] | None = None, lose_host: int | None = None,
                       lose_at_step: int = 0) -> HostsRun:
    """``accord train --fault-tolerant TRAIN_ARGS`` with ``per_host`` workers on each host:
    ``accord ft-lighthouse`` on host 0, one launcher per host (``--replicas``, ``--ft-host``
    its address, ``--out out/hosts/host<i>``), then ``accord ft-merge out ...``.
    ``lose_host``: that host is killed whole (:meth:`Testbed.kill_host`) once one of its
    workers has reached step ``lose_at_step`` (read from its heartbeat)."""
    out = Path(out)
    (out / "hosts").mkdir(parents=True, exist_ok=True)
    dirs = host_dirs(out, tb.hosts)
    workers = per_host * tb.hosts
    lighthouse_log = out / "hosts" / "lighthouse.log"
    with open(lighthouse_log, "wb") as log:
        lighthouse = tb.start(0, [sys.executable, "-m", "accord", "ft-lighthouse",
                                  "--min-workers", str(min_workers),
                                  "--bind", f"{tb.addr(0)}:{LIGHTHOUSE_PORT}"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    logs = [out / "hosts" / f"host{i}.log" for i in range(tb.hosts)]
    procs = []
    start = time.monotonic()
    try:
        for i in range(tb.hosts):
            argv = [*_accord_train(), *train_args, "--fault-tolerant",
                    "--workers", str(workers), "--min-workers", str(min_workers),
                    "--lighthouse", f"http://{tb.addr(0)}:{LIGHTHOUSE_PORT}",
                    "--replicas", _span(i * per_host, (i + 1) * per_host),
                    "--ft-host", tb.addr(i), "--out", str(dirs[i])]
            with open(logs[i], "wb") as log:
                procs.append(tb.start(i, argv, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
        if lose_host is not None:
            _lose_when(tb, procs, dirs[lose_host], lose_host, lose_at_step, timeout)
        alive = [p for i, p in enumerate(procs) if i != lose_host]
        rcs = _wait(tb, alive, timeout, "fault-tolerant launchers", logs)
        if lose_host is not None:
            rcs.insert(lose_host, procs[lose_host].wait())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(lighthouse.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            lighthouse.wait(timeout=5)
    run = HostsRun(out, rcs, [log.read_text(errors="replace") for log in logs],
                   time.monotonic() - start)
    merged = [d for d in dirs if (d / "metrics.jsonl").is_file()]
    res = subprocess.run([*_accord_train()[:-1], "ft-merge", str(out), *map(str, merged)],
                         capture_output=True, text=True, env=env)
    if res.returncode not in (0, 1):
        raise TestbedError(f"ft-merge: {(res.stderr or res.stdout).strip()}")
    return run


def _lose_when(tb: Testbed, procs: list[subprocess.Popen], out: Path, host: int,
               step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for beat in (out / "logs").glob("*.heartbeat") if (out / "logs").is_dir() else ():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(beat.read_text().split()[2]) >= step:
                    tb.kill_host(host)
                    return
        if any(p.poll() is not None for p in procs):
            raise TestbedError(f"a launcher ended before host {host} reached step {step}")
        time.sleep(0.05)
    raise TestbedError(f"host {host} did not reach step {step} in {timeout:g} s")


# -- command line ----------------------------------------------------------------------
def _network(args: argparse.Namespace) -> Network | None:
    if args.link and args.link_profile:
        raise TestbedError("--link and --link-profile: give one")
    if args.link_profile:
        try:
            return load_network_profile(args.link_profile)
        except ValueError as e:
            raise TestbedError(str(e).replace("--network-profile", "--link-profile")) from None
    if args.link:
        try:
            return Network(parse_network(args.link, source="--link"))
        except ValueError as e:
            raise TestbedError(str(e)) from None
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m accord.run.testbed",
        description="Run accord across several hosts emulated by network namespaces "
                    "(root, Linux). Arguments after -- go to accord train.")
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode, what in (("torchrun", "accord train under torchrun --nnodes HOSTS"),
                       ("ft", "accord train --fault-tolerant, one launcher per host")):
        p = sub.add_parser(mode, help=what)
        p.add_argument("--hosts", type=int, default=2)
        p.add_argument("--link", default=None, metavar="BANDWIDTH",
                       help="every pair of hosts on this link, e.g. 10mbit (no latency "
                            "without netem)")
        p.add_argument("--link-profile", default=None, metavar="FILE",
                       help="a --network-profile file whose ranks are host indices")
        p.add_argument("--out", required=True)
        if mode == "torchrun":
            p.add_argument("--nproc", type=int, default=1, help="workers per host")
            p.add_argument("--shared", action="store_true",
                           help="every host writes --out (a shared filesystem); default: "
                                "one directory per host, collected at the end")
        else:
            p.add_argument("--per-host", type=int, default=1, help="workers per host")
            p.add_argument("--min-workers", type=int, default=1)
        p.add_argument("--timeout", type=float, default=3600.0)
    sub.add_parser("sweep", help="delete what testbeds killed without teardown left")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)
    prog = "accord.run.testbed"

    def _stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the teardown below

    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if args.mode == "sweep":
            reason = available()
            if reason is not None:
                raise TestbedError(reason)
            print(f"{prog}: swept {len(sweep_stale())} namespaces")
            return 0
        if "--out" in rest:
            raise TestbedError("--out goes before --, to the testbed (each host gets a "
                               "directory in it)")
        network = _network(args)
        with Testbed(args.hosts, network) as tb:
            if args.mode == "torchrun":
                run = run_torchrun(tb, args.nproc, rest, args.out, shared=args.shared,
                                   timeout=args.timeout)
            else:
                run = run_fault_tolerant(tb, args.per_host, rest, args.out,
                                         min_workers=args.min_workers, timeout=args.timeout)
        link = network.describe() if network else "unshaped"
        print(f"{prog}: {args.hosts} hosts ({link}): exit {run.returncodes}, "
              f"{run.seconds:.1f} s; run in {args.out}")
        (Path(args.out) / "hosts" / "testbed.json").write_text(json.dumps(
            {"hosts": args.hosts, "link": link, "returncodes": run.returncodes,
             "seconds": run.seconds}) + "\n")
        return 0 if run.ok else 1
    except TestbedError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
