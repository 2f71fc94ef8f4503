"""``--links real``: a run's ``--network`` or ``--network-profile`` as real shaped links.

With ``links=real`` (``accord train --links real``, or ``--set links=real`` on every run of a
bench) the run is not emulated: :func:`launch_real` builds a :class:`~.testbed.Testbed` of
network namespaces from the run's network, runs ``torchrun --nnodes H`` across it, and the
workers do not sleep for any modelled time (``accord.run.train`` leaves emulation off), so
every byte crosses a link that ``tc`` shapes. The metrics header records ``links: real``
and the network it stood for, so a report can put the same run emulated and real side by
side (two ``--out`` directories: the bench decides reuse by config, and the two configs
differ only in ``links``).

Hosts (:func:`real_hosts`):

* ``--network LINK``: every rank is a host of its own; every pair of ranks has its own
  full-duplex link, as the emulation prices it.
* ``--network-profile FILE``: the hosts are the groups of ranks joined by links faster
  than the profile's default (``two-hosts-10mbit.json``: ranks 0-1 and 2-3 on 10 Gbit/s, so
  two hosts of two); they must be equal blocks of consecutive ranks (torchrun gives each
  host a block), and every pair of ranks on different hosts must have the default link
  (the testbed shapes one link per pair of hosts). The ranks of one host talk over its
  loopback, unshaped: the profile's fast link stands for that.

Decisions: the run directory is shared by the hosts (a shared filesystem), so it is one run
directory with checkpoints, as the emulated run's. Latency needs ``netem``; where the kernel
has none (as on the machines this was built on) the links get the bandwidth only, and the
launcher says so before the run starts (refused instead would make every profile with a
latency unusable here; the latency's share of a run is small where it matters, in runs
that exchange rarely). Refused in one line before anything starts: no network given, the
testbed unavailable (not root, not Linux, no namespaces), hosts that cannot be formed,
``--fault-tolerant`` or ``--max-restarts`` (the testbed runs plain torchrun once).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..comm.network import Link, Network
from ..errors import ConfigError
from .config import TrainConfig
from .launch import LaunchResult
from .validation import emulated_network

__all__ = ["RealHosts", "real_hosts", "check_real_links", "launch_real"]

@dataclass(frozen=True)
class RealHosts:
    """How a run's network becomes hosts: ``hosts`` hosts of ``per_host`` consecutive ranks,
    each pair of hosts on ``link``; ``latency_applied`` is False where the wanted latency
    could not be given to the links (no netem)."""

    hosts: int
    per_host: int
    link: Link
    latency_applied: bool = True

    def describe(self) -> str:
        lat = "" if self.latency_applied else " (latency not applied: no netem)"
        return (f"{self.hosts} hosts of {self.per_host} rank{'s' if self.per_host > 1 else ''}"
                f", {self.link.describe()} between hosts{lat}")


def _components(world: int, network: Network) -> list[list[int]]:
    parent = list(range(world))

    def root(r: int) -> int:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for (a, b), link in network.pairs.items():
        if link.bandwidth > network.default.bandwidth:
            parent[root(a)] = root(b)
    groups: dict[int, list[int]] = {}
    for r in range(world):
        groups.setdefault(root(r), []).append(r)
    return sorted(groups.values())


def real_hosts(cfg: TrainConfig, *, netem: bool | None = None) -> RealHosts:
    """The hosts and the link between them for ``cfg``'s network (ConfigError, one line,
    when it cannot be made of hosts). ``netem``: whether latency can be applied (default:
    ask the kernel)."""
    net = emulated_network(cfg)
    if net is None:
        raise ConfigError("links: got real without --network or --network-profile; allowed: "
                          "real with a network to shape, or emulated")
    if isinstance(net, Link):
        hosts, per_host, link = cfg.workers, 1, net
    else:
        groups = _components(cfg.workers, net)
        per_host = len(groups[0])
        blocks = [list(range(k * per_host, (k + 1) * per_host))
                  for k in range(cfg.workers // per_host)]
        if groups != blocks:
            raise ConfigError(
                f"links: the profile's fast links make hosts {groups}; allowed with real "
                "links: equal blocks of consecutive ranks, such as [[0, 1], [2, 3]]")
        host = {r: k for k, block in enumerate(blocks) for r in block}
        for (a, b), pair_link in net.pairs.items():
            if host[a] != host[b] and pair_link != net.default:
                raise ConfigError(
                    f"links: ranks {a} and {b} are on different hosts with a link of their "
                    f"own ({pair_link.describe()}); allowed with real links: the default "
                    f"link ({net.default.describe()}) between every pair of hosts")
        hosts, link = len(blocks), net.default
    if netem is None:
        from .testbed import _netem_available

        netem = link.latency == 0 or _netem_available()
    if link.latency > 0 and not netem:
        return RealHosts(hosts, per_host, Link(link.bandwidth), latency_applied=False)
    return RealHosts(hosts, per_host, link)


def check_real_links(cfg: TrainConfig) -> RealHosts | None:
    """None for an emulated run; for ``links=real`` the hosts it will run on, or
    ConfigError (one line) for what keeps it from running on real links here."""
    if cfg.links != "real":  # (validate refuses any value outside LINKS)
        return None
    if cfg.fault_tolerant:
        raise ConfigError("links: got real with --fault-tolerant; allowed: real links with "
                          "the plain launcher (python -m accord.run.testbed ft runs the "
                          "fault-tolerant launcher across hosts)")
    if cfg.max_restarts:
        raise ConfigError(f"links: got real with --max-restarts {cfg.max_restarts}; allowed: "
                          "real links with --max-restarts 0 (torchrun runs once)")
    from .testbed import available

    reason = available()
    if reason is not None:
        raise ConfigError(f"links: real links need the testbed: {reason}")
    return real_hosts(cfg)


def launch_real(cfg: TrainConfig, *, quiet: bool = False, timeout: float = 7200.0
                ) -> LaunchResult:
    """Run ``cfg`` under torchrun across the hosts of :func:`real_hosts`, on one shared run
    directory; every namespace and process is gone when it returns. The hosts' output goes
    to ``OUT/hosts/host<i>.log`` (``quiet`` is accepted for the launchers' signature)."""
    from .testbed import Testbed, TestbedError, run_torchrun

    try:
        plan = check_real_links(cfg)
        assert plan is not None
        argv = cfg.to_argv()
        with Testbed(plan.hosts, plan.link) as tb:
            run = run_torchrun(tb, plan.per_host, argv, cfg.out, shared=True, timeout=timeout)
    except (ConfigError, TestbedError) as e:
        return LaunchResult(2 if isinstance(e, ConfigError) else 1, None, str(e))
    if run.ok:
        return LaunchResult(0)
    codes = [rc for rc in run.returncodes if rc not in (0, None)]
    bad = next(i for i, rc in enumerate(run.returncodes) if rc != 0)
    tail = run.outputs[bad].strip().splitlines()[-1:] if run.outputs[bad].strip() else []
    log = Path(cfg.out) / "hosts" / f"host{bad}.log"
    return LaunchResult(codes[0] if codes else 1, None,
                        f"host{bad} exited {run.returncodes[bad]}: "
                        f"{tail[0] if tail else 'no output'} (log: {log})")
