"""Emulated networks: the time a communication call would take on a given link.

``accord train --network 1gbit,5ms`` runs every worker as if it were on that link: each
communication call takes at least the emulated link's time for it, computation is not
slowed. This module is the pure model (no process group): :func:`parse_network` reads the
``--network`` text into a :class:`Link`, :meth:`Link.seconds` gives an operation's cost,
:func:`wait_for` pads a finished call to that cost (never shortens one), and
:class:`Network` / :func:`load_network_profile` give rank pairs their own links
(``--network-profile``, schema :data:`PROFILE_SCHEMA`). Everything here is immutable or
locked, so the background exchange thread may call it concurrently.

Cost model: alpha-beta (alpha the latency, beta = 1/bandwidth), per Communicator method,
N ranks, M payload bytes, R bytes received (0 when N == 1)::

    allreduce       all_reduce_(_async_)  2 (N-1) alpha + 2 (N-1)/N M beta     (ring)
    allgather       all_gather            (N-1) (alpha + m beta); alpha + 2 m beta at N = 2
    broadcast       broadcast_            ceil(log2 N) (alpha + M beta)        (binomial tree)
    send, recv      send, recv_           alpha + M beta
    exchange        exchange_             alpha + (M + R) beta
    multi_exchange  multi_exchange_       alpha + max(M, R) beta; alpha + (M + R) beta, 1 peer

A collective is as slow as the slowest link among its ranks; a point-to-point call uses
the link between the two ranks. Decisions (why one peer's two directions add up on gloo,
what is left out, the calibration against real shaped links): docs/guides/networks.md and
docs/results/networks.md."""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..schema import Custom, ListOf, Record, SchemaError, read_json, validate

__all__ = [
    "ALLGATHER", "ALLREDUCE", "BROADCAST", "EXCHANGE", "MULTI_EXCHANGE", "OPS",
    "RECV", "REAL_CLOCK", "SEND", "Clock", "FakeClock", "Link", "Network",
    "load_network_profile", "parse_network", "parse_network_profile", "wait_for",
]

ALLREDUCE = "allreduce"
ALLGATHER = "allgather"
BROADCAST = "broadcast"
SEND = "send"
RECV = "recv"
EXCHANGE = "exchange"
MULTI_EXCHANGE = "multi_exchange"
OPS = (ALLREDUCE, ALLGATHER, BROADCAST, SEND, RECV, EXCHANGE, MULTI_EXCHANGE)
_POINT_TO_POINT = (SEND, RECV, EXCHANGE, MULTI_EXCHANGE)

MIN_BANDWIDTH = 1e3 / 8  # bytes per second: 1 kbit/s
MAX_LATENCY = 60.0  # seconds

_FORM = ("BANDWIDTH[,LATENCY] such as 1gbit,5ms or 100mbit (bandwidth in "
         "kbit|mbit|gbit|tbit per second, also written kbps|mbps|gbps|tbps, all bits; "
         "or kB/s|MB/s|GB/s|TB/s in bytes; latency in us|ms|s, default 0)")
_ALLOWED = "allowed: " + _FORM
_PREFIX = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
# bits: kbit, Mbit/s, gbps (any case); bytes: the B must be upper case and /s written,
# so 'Mb/s', '1gb' and '1GB' (bits or bytes?) are refused rather than guessed
_BITS = re.compile(_NUMBER + r"\s*([kmgt])(?:bit(?:/s)?|bps)", re.IGNORECASE)
_BYTES = re.compile(_NUMBER + r"\s*([kKmMgGtT])B/s")
_LATENCY = re.compile(_NUMBER + r"\s*(us|µs|ms|s)", re.IGNORECASE)
_SECONDS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}


def _format(value: float) -> str:
    return f"{value:.4g}"


@dataclass(frozen=True)
class Link:
    """One emulated link: ``bandwidth`` in bytes per second, ``latency`` in seconds."""

    bandwidth: float
    latency: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bandwidth) and self.bandwidth >= MIN_BANDWIDTH):
            raise ValueError(f"Link bandwidth: got {self.bandwidth!r} bytes/s; allowed: "
                             f"finite and at least {MIN_BANDWIDTH:g} bytes/s (1 kbit/s)")
        if not (0.0 <= self.latency <= MAX_LATENCY):
            raise ValueError(f"Link latency: got {self.latency!r} s; allowed: "
                             f"0 to {MAX_LATENCY:g} s")

    def describe(self) -> str:
        """Human text such as ``1 Gbit/s, 5 ms`` (which :func:`parse_network` reads back)."""
        bits = self.bandwidth * 8
        for unit, scale in (("Tbit/s", 1e12), ("Gbit/s", 1e9), ("Mbit/s", 1e6)):
            if bits >= scale:
                bandwidth = f"{_format(bits / scale)} {unit}"
                break
        else:
            bandwidth = f"{_format(bits / 1e3)} kbit/s"
        if self.latency >= 1.0:
            latency = f"{_format(self.latency)} s"
        elif self.latency >= 1e-3 or self.latency == 0.0:
            latency = f"{_format(self.latency * 1e3)} ms"
        else:
            latency = f"{_format(self.latency * 1e6)} us"
        return f"{bandwidth}, {latency}"

    def seconds(
        self, op: str, payload_bytes: int, world_size: int, *,
        received_bytes: int | None = None,
    ) -> float:
        """The emulated seconds of one ``op`` moving ``payload_bytes`` in a group of
        ``world_size`` ranks (formulas in the module docstring). ``received_bytes``, only
        for ``exchange`` and ``multi_exchange``, is what this rank receives (default: as
        many as it sends)."""
        _check_call(op, payload_bytes, received_bytes)
        if world_size < 1:
            raise ValueError(f"world_size: got {world_size!r}; allowed: at least 1")
        n = world_size
        if n == 1:
            return 0.0
        alpha, m = self.latency, payload_bytes
        if op == ALLREDUCE:
            return 2 * (n - 1) * alpha + 2 * (n - 1) / n * m / self.bandwidth
        if op == ALLGATHER:
            # at N = 2 the ring's next and previous rank are one peer: see _ONE_PEER
            wire = 2 * m if n == 2 else (n - 1) * m
            return (n - 1) * alpha + wire / self.bandwidth
        if op == BROADCAST:
            rounds = (n - 1).bit_length()  # ceil(log2 n)
            return rounds * (alpha + m / self.bandwidth)
        if op in (SEND, RECV):
            return alpha + m / self.bandwidth
        r = m if received_bytes is None else received_bytes
        if op == EXCHANGE or n == 2:  # one peer: the two directions follow each other
            return alpha + (m + r) / self.bandwidth
        return alpha + max(m, r) / self.bandwidth


def _check_call(op: str, payload_bytes: int, received_bytes: int | None) -> None:
    if op not in OPS:
        raise ValueError(f"op: got {op!r}; allowed: {', '.join(OPS)}")
    if payload_bytes < 0:
        raise ValueError(f"payload_bytes: got {payload_bytes!r}; allowed: 0 or more")
    if received_bytes is not None:
        if op not in (EXCHANGE, MULTI_EXCHANGE):
            raise ValueError(f"received_bytes: given for {op!r}; allowed only for "
                             f"{EXCHANGE!r} and {MULTI_EXCHANGE!r}")
        if received_bytes < 0:
            raise ValueError(f"received_bytes: got {received_bytes!r}; allowed: 0 or more")


class _BadLink(ValueError):
    """Link text that is not one: ``why`` for ``--network`` ("allowed: ..."), ``expected``
    for a profile's field."""

    def __init__(self, why: str, expected: str) -> None:
        super().__init__(why)
        self.why, self.expected = why, expected


def _parse_link(text: Any) -> Link:
    if not isinstance(text, str):
        raise _BadLink(_ALLOWED, _FORM)
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 2 or not parts[0]:
        raise _BadLink(_ALLOWED, _FORM)
    bits, octets = _BITS.fullmatch(parts[0]), _BYTES.fullmatch(parts[0])
    if bits:
        bandwidth = float(bits[1]) * _PREFIX[bits[2].lower()] / 8
    elif octets:
        bandwidth = float(octets[1]) * _PREFIX[octets[2].lower()]
    else:
        raise _BadLink(_ALLOWED, _FORM)
    latency = 0.0
    if len(parts) == 2:
        lat = _LATENCY.fullmatch(parts[1])
        if not lat:
            raise _BadLink(_ALLOWED, _FORM)
        latency = float(lat[1]) * _SECONDS[lat[2].lower()]
    if not (math.isfinite(bandwidth) and bandwidth >= MIN_BANDWIDTH):
        raise _BadLink("bandwidth must be finite and at least 1kbit (125 B/s)",
                       "a link of finite bandwidth, at least 1kbit (125 B/s)")
    if latency > MAX_LATENCY:
        raise _BadLink(f"latency must be between 0 and {MAX_LATENCY:g}s",
                       f"a link of latency 0 to {MAX_LATENCY:g}s")
    return Link(bandwidth, latency)


def parse_network(text: str, *, source: str = "--network") -> Link:
    """The :class:`Link` of ``BANDWIDTH[,LATENCY]`` text such as ``1gbit,5ms``,
    ``100mbit,50ms``, ``10gbit`` or ``100MB/s,200us``. Bandwidth units are decimal:
    ``1gbit`` is 1e9 bit/s = 1.25e8 bytes/s; ``kbps|mbps|gbps|tbps`` are bits too, and
    bytes are written ``kB/s|MB/s|GB/s|TB/s``. A bare number is refused. ``source``
    names the setting in errors."""
    try:
        return _parse_link(text)
    except _BadLink as e:
        raise ValueError(f"{source}: got {text!r}; {e.why}") from None


def _link_problem(value: Any) -> str | None:
    try:
        _parse_link(value)
    except _BadLink as e:
        return e.expected
    return None


def _pair_problem(value: Any) -> str | None:
    ok = isinstance(value, list) and len(value) == 2 and all(
        type(r) is int and r >= 0 for r in value) and value[0] != value[1]
    return None if ok else _PAIR


_PAIR = "two distinct ranks, integers >= 0, such as [0, 1]"
_LINK = Custom(_FORM, _link_problem)

#: ``--network-profile FILE``: ``{"default": "1gbit,5ms", "links": [{"ranks": [0, 3],
#: "link": "100mbit,50ms"}]}`` (``links`` optional; each pair once, see
#: :func:`parse_network_profile`)
PROFILE_SCHEMA = Record({
    "default": _LINK,
    "links": ListOf(Record({"ranks": Custom(_PAIR, _pair_problem), "link": _LINK},
                           required=("ranks", "link"),
                           expected='an object {"ranks": [a, b], "link": '
                                    '"BANDWIDTH[,LATENCY]"}'),
                    expected='a list of {"ranks": [a, b], "link": "BANDWIDTH[,LATENCY]"}'),
}, required=("default",), expected='an object {"default": "1gbit,5ms", "links": '
                                   '[{"ranks": [0, 1], "link": "100mbit,50ms"}, ...]}')


class Network:
    """A default :class:`Link` and links of their own for some pairs of (global) ranks.

    ``pairs`` maps a pair ``(a, b)`` of distinct ranks to its link (the pair is
    unordered). Immutable after construction."""

    def __init__(self, default: Link,
                 pairs: Mapping[tuple[int, int], Link] | None = None, *,
                 source: str = "network profile") -> None:
        self.default = default
        self.source = source  # names the profile in errors (its option and file)
        links: dict[frozenset[int], Link] = {}
        for pair, link in (pairs or {}).items():
            key = frozenset(pair)
            if len(pair) != 2 or len(key) != 2 or any(
                    not isinstance(r, int) or r < 0 for r in key):
                raise ValueError(f"Network pair: got {pair!r}; allowed: two distinct "
                                 "ranks, integers >= 0")
            if key in links:
                raise ValueError(f"Network pair: {sorted(key)} given twice; allowed: "
                                 "one link per pair")
            links[key] = link
        self._pairs = links

    @property
    def pairs(self) -> dict[tuple[int, int], Link]:
        """The pair links, keyed by ``(low rank, high rank)``."""
        return {(min(k), max(k)): v for k, v in self._pairs.items()}

    def check_ranks(self, world_size: int) -> None:
        """Refuse pairs naming a rank outside a world of ``world_size`` ranks."""
        for key in self._pairs:
            if max(key) >= world_size:
                raise ValueError(f"{self.source}: pair {sorted(key)} names a rank >= "
                                 f"the world size {world_size}; allowed: ranks 0 to "
                                 f"{world_size - 1}")

    def links(self, ranks: Iterable[int]) -> list[Link]:
        """The distinct links between any two of ``ranks`` (the default link included
        when some pair among them has no link of its own)."""
        group = set(ranks)
        own = [v for k, v in self._pairs.items() if k <= group]
        n = len(group)
        every = n * (n - 1) // 2
        found = list(dict.fromkeys(own))  # distinct, in a stable order
        if len(own) < every and self.default not in found:
            found.append(self.default)
        return found

    def seconds(
        self, op: str, payload_bytes: int, ranks: Sequence[int], *,
        received_bytes: int | None = None,
    ) -> float:
        """The emulated seconds of ``op`` among ``ranks``: for a collective the global
        ranks of its group (the slowest link among them decides); for ``send``, ``recv``
        and ``exchange`` this rank and its peer (their link); for ``multi_exchange`` this
        rank and all its peers (the slowest link from this rank to a peer)."""
        _check_call(op, payload_bytes, received_bytes)
        group = list(dict.fromkeys(ranks))
        if not group:
            raise ValueError("ranks: got none; allowed: the group's ranks (this rank "
                             "first for point-to-point ops)")
        if op in _POINT_TO_POINT:
            me, peers = group[0], group[1:]
            links = list(dict.fromkeys(
                self._pairs.get(frozenset((me, p)), self.default) for p in peers))
        else:
            links = self.links(group)
        return max((link.seconds(op, payload_bytes, len(group),
                                 received_bytes=received_bytes) for link in links),
                   default=0.0)

    def describe(self) -> str:
        """Human text: the default link, then each pair's, e.g.
        ``1 Gbit/s, 5 ms; ranks 0-3: 100 Mbit/s, 50 ms``."""
        parts = [self.default.describe()]
        parts += [f"ranks {a}-{b}: {link.describe()}"
                  for (a, b), link in sorted(self.pairs.items())]
        return "; ".join(parts)


def parse_network_profile(profile: object, *, source: str = "--network-profile") -> Network:
    """The :class:`Network` of a profile object
    ``{"default": "1gbit,5ms", "links": [{"ranks": [0, 3], "link": "100mbit,50ms"}]}``
    (``links`` optional), checked against :data:`PROFILE_SCHEMA`: ``ValueError`` (a
    :class:`accord.schema.SchemaError`), one line starting with ``source`` and naming the
    field, otherwise."""
    try:
        validate(PROFILE_SCHEMA, profile)
        pairs: dict[tuple[int, int], Link] = {}
        for i, entry in enumerate(profile.get("links", [])):
            key = (min(entry["ranks"]), max(entry["ranks"]))
            if key in pairs:
                raise SchemaError(f"links[{i}].ranks", "a pair not given before (one link "
                                  "per pair)", f"{list(key)} again")
            pairs[key] = _parse_link(entry["link"])
    except SchemaError as e:
        raise e.in_file(source) from None
    return Network(_parse_link(profile["default"]), pairs, source=source)


def load_network_profile(path: str | Path) -> Network:
    """The :class:`Network` of a JSON profile file (see :func:`parse_network_profile`);
    ``ValueError`` (one line naming ``--network-profile``, the file and the field) for a
    file that cannot be read, is not UTF-8 JSON, or is not a profile."""
    source = f"--network-profile {str(path)!r}"
    try:
        profile = read_json(path, source)
    except OSError as e:
        raise ValueError(f"--network-profile: cannot read {str(path)!r}: "
                         f"{e.strerror or e}") from None
    return parse_network_profile(profile, source=source)


# -- clocks and waiting --------------------------------------------------------------
class Clock(Protocol):
    """Where :func:`wait_for` reads the time and sleeps."""

    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class _RealClock:
    """``time.perf_counter`` and ``time.sleep``."""

    def now(self) -> float:
        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


REAL_CLOCK: Clock = _RealClock()


class FakeClock:
    """A clock for tests: ``now()`` advances only by ``sleep`` and :meth:`advance`
    (standing in for the real call's duration); ``sleeps`` records every sleep."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self.sleeps: list[float] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.sleeps.append(seconds)
            self._now += seconds

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass without recording a sleep (the real call working)."""
        with self._lock:
            self._now += seconds


def wait_for(
    model: Link | Network, op: str, payload_bytes: int, group: int | Sequence[int],
    started: float, clock: Clock = REAL_CLOCK, *, received_bytes: int | None = None,
) -> float:
    """Sleep until ``started`` (a ``clock.now()`` taken when the call was issued) plus the
    emulated cost of ``op`` on ``model``, if the real call returned earlier; returns the
    seconds slept (0 when the real call already took at least as long: the real time is
    never subtracted). ``group`` is the group's size, or its global ranks (a
    :class:`Network` needs ranks, see :meth:`Network.seconds`; a :class:`Link` uses only
    their number)."""
    if isinstance(model, Network):
        if isinstance(group, int):
            raise ValueError("group: got a size for a Network; allowed: the ranks "
                             "involved (a network profile prices links between ranks)")
        cost = model.seconds(op, payload_bytes, group, received_bytes=received_bytes)
    else:
        size = group if isinstance(group, int) else len(set(group))
        cost = model.seconds(op, payload_bytes, size, received_bytes=received_bytes)
    remaining = started + cost - clock.now()
    if remaining <= 0.0:
        return 0.0
    clock.sleep(remaining)
    return remaining
