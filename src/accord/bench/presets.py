"""The named presets (``PRESETS``; ``TUNED_PRESETS`` with their default grid): each a list
of :class:`.specs.RunSpec` built in code, and the fault patterns and settings they share
(what each preset measures: docs/guides/benchmarking.md, Presets)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from ..run.config import ConfigError
from .specs import RunSpec, _matrix


def _quick() -> list[RunSpec]:
    arms = [("allreduce", "allreduce", {}, {}), ("normalized", "normalized", {}, {}),
            ("acga", "acga", {}, {}), ("local_sgd", "local_sgd", {"period": 4}, {}),
            ("easgd", "easgd", {"period": 4}, {}), ("wagma", "wagma", {}, {})]
    return _matrix(arms, [("digits", 300, {"optimizer": "adam", "lr": 3e-3})], [4], [0])


def _acga_ablation_arms() -> list[tuple[str, str, dict, dict]]:
    return [("allreduce", "allreduce", {}, {}), ("normalized", "normalized", {}, {}),
            ("acga-b0", "acga", {"momentum": 0.0}, {}),
            ("acga-b0.9", "acga", {"momentum": 0.9}, {}),
            ("acga-b0.99", "acga", {"momentum": 0.99}, {}),
            ("acga-layer", "acga", {"momentum": 0.99, "per_layer": True}, {}),
            ("adasum", "adasum", {}, {})]


def _acga_ablation() -> list[RunSpec]:
    arms = _acga_ablation_arms()
    specs = []
    for n in (4, 8):
        toy = ("linreg", 500, {"oracle_lr": True, "accum_steps": 2, "batch_size": 128 // n})
        digits = ("digits", 400, {"optimizer": "adam", "lr": 1e-3, "batch_size": 4})
        specs += _matrix(arms, [toy, digits], [n], [0, 1, 2])
    return specs


def _elastic() -> list[RunSpec]:
    arms = [("allreduce", "allreduce", {}, {})]
    for p in (1, 4, 16):
        arms += [(f"local_sgd-p{p}", "local_sgd", {"period": p}, {}),
                 (f"easgd-p{p}", "easgd", {"period": p, "beta": 0.9}, {}),
                 (f"eamsgd-p{p}", "easgd", {"period": p, "beta": 0.9},
                  {"optimizer": "nesterov", "momentum": 0.9}),
                 (f"lsgd-p{p}", "lsgd", {"period": p}, {}),
                 (f"grawa-p{p}", "grawa", {"period": p}, {})]
    return _matrix(arms, [("digits", 400, {"lr": 0.05, "batch_size": 16})], [8], [0, 1, 2])


#: every worker's step compute is emulated by a sleep of this many seconds (on top of the
#: real, tiny digits step) so that 8 workers on 2 cores behave like 8 machines; a 4x
#: straggler sleeps 3 more of them
COMPUTE_S = 0.04
STRAGGLER_STEPS = 200
PATTERNS = {
    "transient": [f"delay:rank=random,seconds={3 * COMPUTE_S:g}"],
    "persistent": [f"delay:rank=3,seconds={3 * COMPUTE_S:g}"],
    # two slow ranks in one WAGMA group (ranks 2 and 3 pair up in phase 0 with 8 workers)
    "pair": [f"delay:rank={r},seconds={3 * COMPUTE_S:g}" for r in (2, 3)],
}
#: the ranks each pattern slows down throughout (the transient straggler moves)
SLOW_RANKS = {"transient": (), "persistent": (3,), "pair": (2, 3)}


def _decentralized_arms() -> list[tuple[str, str, dict, dict]]:
    return [("allreduce", "allreduce", {}, {}),
            ("wagma", "wagma", {"wait_avoiding": True}, {}),
            ("wagma-sync", "wagma", {"wait_avoiding": False}, {}),
            ("gossip", "gossip", {}, {}),
            ("elastic_gossip", "elastic_gossip", {}, {}),
            ("dpsgd", "dpsgd", {}, {}),
            ("local_sgd", "local_sgd", {"period": 4}, {}),
            ("easgd-async", "easgd", {"period": 4, "asynchronous": True}, {})]


def _pair_arms() -> list[tuple[str, str, dict, dict]]:
    """The arms of the two-slow-ranks pattern: WAGMA against allreduce, with and without
    its blocking global average (which waits for the slowest worker every period)."""
    return [("allreduce", "allreduce", {}, {}),
            ("wagma", "wagma", {"wait_avoiding": True}, {}),
            ("wagma-sync", "wagma", {"wait_avoiding": False}, {}),
            ("wagma-p1000", "wagma", {"wait_avoiding": True, "period": 1000}, {})]


def _stragglers() -> list[RunSpec]:
    """8 workers on digits under a transient (one random rank per step), a persistent
    (rank 3 throughout) 4x straggler, and two 4x slow ranks in one WAGMA group (ranks 2
    and 3); only the final record is logged, because a metrics record synchronises all
    workers."""
    specs = []
    for pattern, slow in PATTERNS.items():
        faults = [f"delay:rank=all,seconds={COMPUTE_S:g}", *slow]
        arms = [(f"{pattern}-{label}", algo, hp, {"faults": faults,
                                                  "log_every": STRAGGLER_STEPS})
                for label, algo, hp, _ in (_pair_arms() if pattern == "pair"
                                           else _decentralized_arms())]
        specs += _matrix(arms, [("digits", STRAGGLER_STEPS, {"lr": 0.05, "batch_size": 16})],
                         [8], [0])
    return specs


def _scaling() -> list[RunSpec]:
    """Bytes per worker per step at 2, 4 and 8 workers (no faults, short runs)."""
    arms = [(label, algo, hp, {"log_every": 24}) for label, algo, hp, _ in
            _decentralized_arms()]
    return _matrix(arms, [("digits", 24, {"lr": 0.05, "batch_size": 16})], [2, 4, 8], [0])


#: local optimizers of the failures preset: label suffix -> training settings
FAILURE_OPTIMIZERS = {"": {}, "-nesterov": {"optimizer": "nesterov", "momentum": 0.9},
                      "-adam": {"optimizer": "adam", "lr": 3e-3}}


def _failures() -> list[RunSpec]:
    """EASGD with uniform vs dynamic weighting, two of 8 workers frozen for the middle
    third of training, under SGD, Nesterov momentum 0.9 and Adam."""
    steps = 300
    third = steps // 3
    faults = [f"freeze:rank={r},start={third},end={2 * third}" for r in (2, 5)]
    arms = [(f"easgd-{weighting}{suffix}", "easgd", {"period": 4, "weighting": weighting},
             {"faults": faults, **settings})
            for suffix, settings in FAILURE_OPTIMIZERS.items()
            for weighting in ("uniform", "dynamic")]
    return _matrix(arms, [("digits", steps, {"lr": 0.05, "batch_size": 16})], [8],
                   [0, 1, 2])


#: the failures-ft preset: a run is this many steps; these ranks are SIGKILLed at a third
FT_STEPS = 240
FT_KILLED = (2, 5)
#: every worker's step compute is emulated by a sleep of this many seconds (so that a
#: replacement has steps left to join)
FT_COMPUTE_S = 0.04


def _failures_ft() -> list[RunSpec]:
    """Real deaths: two of 8 workers SIGKILLed at a third of the run. EASGD with uniform
    and dynamic weighting and local SGD, each four ways: the normal launcher without a
    death (``-plain``, what fault tolerance costs), fault-tolerant without a death
    (``-clean``), fault-tolerant with the two deaths, the first respawned and the second
    not (``-ft``: ``--respawn 1``), and the normal launcher restarting every worker from
    the newest checkpoint (``-restart``: ``--checkpoint-every 20 --max-restarts 2``; the
    second death may come after the first restart). Needs ``accord[ft]``."""
    compute = [f"delay:rank=all,seconds={FT_COMPUTE_S:g}"]
    kills = compute + [f"kill:rank={r},step={FT_STEPS // 3}" for r in FT_KILLED]
    ft = {"fault_tolerant": True, "min_workers": 4}
    arms = []
    for label, algo, hp in (("easgd-uniform", "easgd", {"period": 4}),
                            ("easgd-dynamic", "easgd", {"period": 4, "weighting": "dynamic"}),
                            ("local_sgd", "local_sgd", {"period": 4})):
        arms += [(f"{label}-plain", algo, hp, {"faults": compute}),
                 (f"{label}-clean", algo, hp, {**ft, "faults": compute}),
                 (f"{label}-ft", algo, hp, {**ft, "respawn": 1, "faults": kills}),
                 (f"{label}-restart", algo, hp, {"faults": kills, "checkpoint_every": 20,
                                                 "max_restarts": 2})]
    return _matrix(arms, [("digits", FT_STEPS, {"lr": 0.05, "batch_size": 16,
                                               "log_every": FT_STEPS // 12})], [8], [0, 1, 2])


#: the dynamic-weighting preset: every worker's step compute is emulated by a sleep of this
#: many seconds; the slow worker sleeps 2 more of them (3x); a run is this many steps, the
#: middle third of them frozen on the frozen ranks
DW_COMPUTE_S = 0.02
DW_STEPS = 240
#: workers -> (frozen ranks, slow rank)
DW_FAILURES = {4: ((2,), 3), 8: ((2, 5), 7)}
#: local optimizers: label prefix -> training settings (AdaHessian diverges at lr 0.05 on
#: digits, trains at 0.01)
DW_OPTIMIZERS = {"sgd": {"lr": 0.05}, "adahessian": {"optimizer": "adahessian", "lr": 0.01}}


def dw_faults(workers: int) -> list[str]:
    """The failure pattern of the dynamic-weighting preset at ``workers`` workers."""
    frozen, slow = DW_FAILURES[workers]
    third = DW_STEPS // 3
    return [f"delay:rank=all,seconds={DW_COMPUTE_S:g}",
            f"delay:rank={slow},seconds={2 * DW_COMPUTE_S:g}",
            *(f"freeze:rank={r},start={third},end={2 * third}" for r in frozen)]


def _dynamic_weighting() -> list[RunSpec]:
    """Asynchronous EASGD with uniform vs dynamic weighting under SGD and AdaHessian, 4 and
    8 workers, periods 1, 4 and 16, one or two frozen ranks and one 3x slow rank."""
    specs = []
    for n in DW_FAILURES:
        arms = [(f"{opt}-p{p}-{w}", "easgd",
                 {"period": p, "weighting": w, "asynchronous": True},
                 {"faults": dw_faults(n), "log_every": DW_STEPS // 6, **settings})
                for opt, settings in DW_OPTIMIZERS.items() for p in (1, 4, 16)
                for w in ("uniform", "dynamic")]
        specs += _matrix(arms, [("digits", DW_STEPS, {"batch_size": 16})], [n], [0, 1, 2])
    return specs


#: the network preset's emulated links: name -> --network (bandwidth of the issue's
#: three classes; latencies typical of a data-centre rack, a LAN and a slow WAN)
NETWORK_LINKS = {"10gbit": "10gbit,50us", "1gbit": "1gbit,500us", "100mbit": "100mbit,5ms"}
NETWORK_STEPS = 300


def _network() -> list[RunSpec]:
    """Communication-efficient algorithms on emulated links: 8 workers on shakespeare
    (Adam 3e-3), one group (directory) per link so that each link is a report section of
    its own with the same labels."""
    arms = [("allreduce", "allreduce", {}, {}),
            ("allreduce-bf16", "allreduce", {}, {"compress": "bf16"}),
            ("allreduce-powersgd", "allreduce", {}, {"compress": "powersgd"})]
    for p in (8, 32):
        arms += [(f"local_sgd-p{p}", "local_sgd", {"period": p}, {}),
                 (f"diloco-p{p}", "diloco", {"period": p}, {})]
    arms += [("wagma", "wagma", {}, {}), ("gossip", "gossip", {}, {}),
             ("easgd-p8", "easgd", {"period": 8}, {})]
    specs = []
    for name, link in NETWORK_LINKS.items():
        linked = [(label, algo, hp, {**train, "network": link}) for label, algo, hp, train
                  in arms]
        task = ("shakespeare", NETWORK_STEPS, {"optimizer": "adam", "lr": 3e-3,
                                               "batch_size": 16,
                                               "log_every": NETWORK_STEPS // 10})
        specs += [replace(s, group=f"network-{name}")
                  for s in _matrix(linked, [task], [8], [0, 1, 2])]
    return specs


#: the frontier preset's emulated networks: two hosts of two workers (ranks 0-1 and 2-3),
#: 10 Gbit/s inside a host and the named link, 5 ms, between them (network profiles shipped
#: in accord/bench/profiles/; a collective over both hosts is as slow as the slow link)
FRONTIER_LINKS = ("100mbit", "10mbit")
FRONTIER_STEPS = 300
FRONTIER_PERIOD = 32
#: the payload codecs each arm runs with: label suffix -> --compress
FRONTIER_CODECS = {"": "none", "-int8": "int8", "-int4": "int4", "-topk": "topk"}


def frontier_profile(link: str) -> str:
    """The path of the frontier preset's network profile for ``link``."""
    from pathlib import Path

    return str(Path(__file__).resolve().parent / "profiles" / f"two-hosts-{link}.json")


def _frontier() -> list[RunSpec]:
    """Communication-efficient training between two hosts of two workers on shakespeare
    (Adam 3e-3): allreduce, DiLoCo and streaming DiLoCo (4 fragments, an overlap of 1 and 5
    steps, mixing 0.5), each in fp32 and with the int8, 4-bit and top-k codecs, and two
    islands (allreduce inside a host, DiLoCo between the hosts); one group per link."""
    h = FRONTIER_PERIOD
    families = [("allreduce", "allreduce", {}), (f"diloco-p{h}", "diloco", {"period": h})]
    families += [(f"sdiloco-p{h}-f4-d{d}", "streaming_diloco",
                  {"period": h, "fragments": 4, "delay": d, "alpha": 0.5}) for d in (1, 5)]
    arms = [(label + suffix, algo, hp, {} if codec == "none" else {"compress": codec})
            for label, algo, hp in families for suffix, codec in FRONTIER_CODECS.items()]
    arms.append(("islands-diloco", "hierarchical",
                 {"island_size": 2, "outer": "diloco", "outer_hp": f"period={h}"}, {}))
    task = ("shakespeare", FRONTIER_STEPS, {"optimizer": "adam", "lr": 3e-3, "batch_size": 16,
                                            "log_every": FRONTIER_STEPS // 10})
    specs = []
    for link in FRONTIER_LINKS:
        linked = [(label, algo, hp, {**train, "network_profile": frontier_profile(link)})
                  for label, algo, hp, train in arms]
        specs += [replace(s, group=f"frontier-{link}")
                  for s in _matrix(linked, [task], [4], [0, 1, 2])]
    return specs


PRESETS: dict[str, Callable[[], list[RunSpec]]] = {
    "quick": _quick,
    "acga-ablation": _acga_ablation,
    "elastic": _elastic,
    "stragglers": _stragglers,
    "scaling": _scaling,
    "failures": _failures,
    "failures-ft": _failures_ft,
    "dynamic-weighting": _dynamic_weighting,
    "network": _network,
    "frontier": _frontier,
}


def _acga_ablation_tuned() -> list[RunSpec]:
    """The acga-ablation arms on digits and Fashion-MNIST at 8 workers (Adam, 4 samples per
    worker), each arm at its own learning rate (the toy is left out: its step size is the
    oracle's)."""
    arms = _acga_ablation_arms()
    tasks = [("digits", 400, {"optimizer": "adam", "lr": 1e-3, "batch_size": 4}),
             ("fashion", 400, {"optimizer": "adam", "lr": 1e-3, "batch_size": 4})]
    return _matrix(arms, tasks, [8], [0, 1, 2])


#: presets tuned by default: name -> (runs, grid); ``--tune`` replaces the grid
TUNED_PRESETS: dict[str, tuple[Callable[[], list[RunSpec]], dict[str, list[str]]]] = {
    # (1e-2 was the best of 3e-4..1e-2 for five of the seven arms on digits: 3e-2 added)
    "acga-ablation-tuned": (_acga_ablation_tuned,
                            {"lr": ["3e-4", "1e-3", "3e-3", "1e-2", "3e-2"]}),
    "elastic-tuned": (_elastic, {"lr": ["0.01", "0.03", "0.1", "0.3"]}),
}


def preset_names() -> list[str]:
    return [*PRESETS, *TUNED_PRESETS, "all"]


def preset(name: str) -> list[RunSpec]:
    """The runs of a preset; each preset's runs live under ``OUT/<preset>/``. ``all`` is
    every untuned preset (the tuned ones run many times more)."""
    if name in TUNED_PRESETS:
        return [replace(s, group=name) for s in TUNED_PRESETS[name][0]()]
    names = list(PRESETS) if name == "all" else [name]
    if any(n not in PRESETS for n in names):
        raise ConfigError(f"preset: unknown {name!r}; allowed: {', '.join(preset_names())}")
    # a preset may split its runs into several directories (network: one per link)
    return [s if s.group != "custom" else replace(s, group=n)
            for n in names for s in PRESETS[n]()]
