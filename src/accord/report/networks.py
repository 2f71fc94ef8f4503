"""Emulated networks in the report: which runs share a network (:func:`_network_key`), where
a network stands among the others (:class:`NetworkInfo`, fastest first) and the cost model
the report states (``NETWORK_FORMULA``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..comm.network import Link, load_network_profile, parse_network
from .runs import Run

NetworkKey = tuple  # () for the real network; see _network_key


def _network_key(text: str | None) -> NetworkKey:
    """What makes two runs' networks the same: the parsed link (``100mbit,5ms`` and
    ``100Mbit/s,5ms`` are one link), a profile's path, else the text."""
    if text is None:
        return ()
    if text.startswith("profile "):
        return ("profile", text[len("profile "):])
    try:
        link = parse_network(text)
    except ValueError:
        return ("text", text)
    return ("link", link.bandwidth, link.latency)


@dataclass(frozen=True)
class NetworkInfo:
    """A section's network: its text as the runs gave it (None: the real network), the
    link that places it among the others (a profile's default link; None when unknown)
    and how it was placed, for a profile."""
    text: str | None = None
    link: Link | None = None
    note: str = ""

    @property
    def order(self) -> tuple:
        """Fastest first: the real network (nothing emulated), then by bandwidth (higher
        first) and latency (lower first), then the networks of unknown bandwidth."""
        if self.text is None:
            return (0, 0.0, 0.0, "")
        if self.link is None:
            return (2, 0.0, 0.0, self.text)
        return (1, -self.link.bandwidth, self.link.latency, self.text)

    @property
    def name(self) -> str:
        return self.text if self.text is not None else "real network"


def _network_info(run: Run, root: Path | None) -> NetworkInfo:
    text = run.network
    key = _network_key(text)
    if not key:
        return NetworkInfo()
    if key[0] == "link":
        return NetworkInfo(text, Link(key[1], key[2]))
    if key[0] == "text":
        return NetworkInfo(text, None, "not a link this report can read, so its bandwidth "
                                       "is unknown")
    path = Path(key[1])
    candidates = [path]
    if not path.is_absolute():  # as given (the working directory), then from the run up
        folder = run.path
        while True:
            candidates.append(folder / path)
            if folder == root or folder.parent == folder or root is None:
                break
            folder = folder.parent
    for candidate in candidates:
        if candidate.is_file():
            try:
                default = load_network_profile(candidate).default
            except ValueError as e:
                return NetworkInfo(text, None, f"its file cannot be read ({e}), so its "
                                               "bandwidth is unknown")
            return NetworkInfo(text, default, f"placed by its default link, "
                                              f"{default.describe()} (the pairs with a link "
                                              "of their own are not taken into account)")
    return NetworkInfo(text, None, "its file was not found, so its bandwidth is unknown")


def _network_slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-") or "x"


#: the emulated network's cost model, as the report states it (see accord.comm.network)
NETWORK_FORMULA = ("each communication call waits at least its alpha-beta time on the link "
                   "(alpha = latency, beta = 1/bandwidth; N ranks, payload M): allreduce "
                   "2(N-1) alpha + 2(N-1)/N M beta, all-gather (N-1)(alpha + m beta) for a "
                   "contribution m, broadcast ceil(log2 N)(alpha + M beta), send and exchange "
                   "alpha + M beta; computation is not slowed")
