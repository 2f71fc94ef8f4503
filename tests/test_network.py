"""The emulated-network model: parsing, the alpha-beta costs, padding with a fake clock,
and per-pair profiles. Pure: no process group, no real sleeping or timing."""

from __future__ import annotations

import json
import math
import threading

import pytest
from cli_util import no_workers, run_cli, tree

from accord.comm.network import (
    ALLGATHER,
    ALLREDUCE,
    BROADCAST,
    EXCHANGE,
    MULTI_EXCHANGE,
    OPS,
    RECV,
    SEND,
    FakeClock,
    Link,
    Network,
    load_network_profile,
    parse_network,
    parse_network_profile,
    wait_for,
)

GBIT_5MS = Link(1.25e8, 0.005)


# -- parsing -------------------------------------------------------------------------
@pytest.mark.parametrize("text, bandwidth, latency", [
    ("1gbit,5ms", 1.25e8, 0.005),
    ("100mbit", 1.25e7, 0.0),
    ("100mbit,50ms", 1.25e7, 0.05),
    ("10gbit", 1.25e9, 0.0),
    ("1Gbit/s, 5 ms", 1.25e8, 0.005),
    ("2.5gbit,0.5ms", 2.5e9 / 8, 0.0005),
    ("1tbit,200us", 1.25e11, 200e-6),
    ("1kbit,60s", 125.0, 60.0),
    ("100mbps,1s", 1.25e7, 1.0),
    ("1Gbps", 1.25e8, 0.0),
    ("100MB/s", 1e8, 0.0),
    ("1GB/s,10us", 1e9, 1e-5),
    ("20kB/s,0ms", 2e4, 0.0),
])
def test_parse_valid(text, bandwidth, latency):
    link = parse_network(text)
    assert link.bandwidth == pytest.approx(bandwidth, rel=1e-12)
    assert link.latency == pytest.approx(latency, rel=1e-12, abs=0.0)


@pytest.mark.parametrize("text", [
    "1gb", "1GB", "1Gb/s", "100", "100,5ms", "gbit", "1gbit,5", "1gbit,5min",
    "1gbit,5ms,3", "", ",5ms", "-1gbit", "1e9bit", "1 g bit", "1gbit;5ms", "1xbit",
    "1gbit,-5ms", "inf gbit",
])
def test_parse_invalid_form(text):
    with pytest.raises(ValueError) as err:
        parse_network(text)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"--network: got {text!r}; allowed: BANDWIDTH[,LATENCY]")
    assert "kbit|mbit|gbit|tbit" in msg and "us|ms|s" in msg


BANDWIDTH_BOUND = "bandwidth must be finite and at least 1kbit (125 B/s)"
LATENCY_BOUND = "latency must be between 0 and 60s"


@pytest.mark.parametrize("text, what", [
    ("0gbit", BANDWIDTH_BOUND),
    ("0.5kbit", BANDWIDTH_BOUND),
    ("0.1kB/s", BANDWIDTH_BOUND),
    ("1gbit,61s", LATENCY_BOUND),
    ("1gbit,60001ms", LATENCY_BOUND),
])
def test_parse_out_of_bounds(text, what):
    with pytest.raises(ValueError) as err:
        parse_network(text)
    assert str(err.value) == f"--network: got {text!r}; {what}"


def test_parse_names_its_source():
    with pytest.raises(ValueError, match=r"^profile default: got '1gb'; allowed"):
        parse_network("1gb", source="profile default")
    with pytest.raises(ValueError, match=r"^--network: got 5; allowed"):
        parse_network(5)  # type: ignore[arg-type]


def test_link_bounds():
    with pytest.raises(ValueError, match="Link bandwidth: got 0"):
        Link(0.0)
    with pytest.raises(ValueError, match="Link bandwidth: got inf"):
        Link(math.inf)
    with pytest.raises(ValueError, match="Link latency: got -0.1"):
        Link(1e6, -0.1)


@pytest.mark.parametrize("link, text", [
    (Link(1.25e8, 0.005), "1 Gbit/s, 5 ms"),
    (Link(1.25e7, 0.0), "100 Mbit/s, 0 ms"),
    (Link(1.25e9, 0.05), "10 Gbit/s, 50 ms"),
    (Link(1.25e11, 2e-4), "1 Tbit/s, 200 us"),
    (Link(125.0, 60.0), "1 kbit/s, 60 s"),
    (Link(1e8, 1.5), "800 Mbit/s, 1.5 s"),
    (Link(2.5e9 / 8, 0.0005), "2.5 Gbit/s, 500 us"),
])
def test_describe_and_read_back(link, text):
    assert link.describe() == text
    again = parse_network(text)
    assert again.bandwidth == pytest.approx(link.bandwidth, rel=1e-12)
    assert again.latency == pytest.approx(link.latency, rel=1e-12)


# -- costs ---------------------------------------------------------------------------
def expected(op, m, n, alpha, bandwidth, received=None):
    """The formulas of the issue, written out independently of the module."""
    if n == 1:
        return 0.0
    beta = 1.0 / bandwidth
    if op == ALLREDUCE:
        return 2 * (n - 1) * alpha + 2 * (n - 1) / n * m * beta
    if op == ALLGATHER:  # one peer at N = 2: its send and receive do not overlap
        return (n - 1) * alpha + (2 if n == 2 else n - 1) * m * beta
    if op == BROADCAST:
        return math.ceil(math.log2(n)) * (alpha + m * beta)
    if op in (SEND, RECV):
        return alpha + m * beta
    r = m if received is None else received
    if op == EXCHANGE or n == 2:  # one peer: the two directions add up
        return alpha + (m + r) * beta
    return alpha + max(m, r) * beta


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("alpha, bandwidth", [(0.005, 1.25e8), (0.0, 1.25e7), (0.05, 1e6)])
def test_formulas(op, n, alpha, bandwidth):
    link = Link(bandwidth, alpha)
    for m in (0, 1, 4_000_000):
        assert link.seconds(op, m, n) == pytest.approx(expected(op, m, n, alpha, bandwidth),
                                                       rel=1e-12, abs=1e-15)


def test_worked_examples():
    m = 4_000_000
    assert GBIT_5MS.seconds(ALLREDUCE, m, 8) == pytest.approx(14 * 0.005 + 1.75 * m / 1.25e8)
    assert GBIT_5MS.seconds(ALLGATHER, m, 4) == pytest.approx(3 * 0.005 + 3 * m / 1.25e8)
    assert GBIT_5MS.seconds(BROADCAST, m, 3) == pytest.approx(2 * (0.005 + m / 1.25e8))
    assert GBIT_5MS.seconds(BROADCAST, m, 8) == pytest.approx(3 * (0.005 + m / 1.25e8))
    assert GBIT_5MS.seconds(SEND, m, 2) == pytest.approx(0.005 + 0.032)
    assert GBIT_5MS.seconds(ALLREDUCE, m, 1) == 0.0


def test_a_multi_exchange_with_several_peers_takes_the_larger_direction():
    # three sends of 1 MB out, one receive of 2 MB in: the outgoing side decides
    assert GBIT_5MS.seconds(MULTI_EXCHANGE, 3_000_000, 4, received_bytes=2_000_000) == \
        pytest.approx(0.005 + 3_000_000 / 1.25e8)
    assert GBIT_5MS.seconds(MULTI_EXCHANGE, 1_000_000, 4, received_bytes=5_000_000) == \
        pytest.approx(0.005 + 5_000_000 / 1.25e8)
    assert GBIT_5MS.seconds(MULTI_EXCHANGE, 1_000_000, 1, received_bytes=5_000_000) == 0.0


@pytest.mark.parametrize("op", [EXCHANGE, MULTI_EXCHANGE])
def test_both_directions_with_one_peer_add_up(op):
    # measured on gloo over a shaped full-duplex link: 1.94-2.09x one direction
    assert GBIT_5MS.seconds(op, 1_000_000, 2, received_bytes=2_000_000) == \
        pytest.approx(0.005 + 3_000_000 / 1.25e8)
    assert GBIT_5MS.seconds(EXCHANGE, 1_000_000, 4, received_bytes=2_000_000) == \
        pytest.approx(0.005 + 3_000_000 / 1.25e8)
    assert GBIT_5MS.seconds(op, 1_000_000, 2) == pytest.approx(0.005 + 2_000_000 / 1.25e8)
    assert GBIT_5MS.seconds(ALLGATHER, 1_000_000, 2) == \
        pytest.approx(0.005 + 2_000_000 / 1.25e8)


def test_bad_calls():
    with pytest.raises(ValueError, match=r"^op: got 'reduce'; allowed: allreduce, "):
        GBIT_5MS.seconds("reduce", 1, 2)
    with pytest.raises(ValueError, match=r"^payload_bytes: got -1; allowed: 0 or more$"):
        GBIT_5MS.seconds(SEND, -1, 2)
    with pytest.raises(ValueError, match=r"^world_size: got 0; allowed: at least 1$"):
        GBIT_5MS.seconds(SEND, 1, 0)
    with pytest.raises(ValueError, match=r"^received_bytes: given for 'allreduce'"):
        GBIT_5MS.seconds(ALLREDUCE, 1, 2, received_bytes=1)
    with pytest.raises(ValueError, match=r"^received_bytes: got -2"):
        GBIT_5MS.seconds(EXCHANGE, 1, 2, received_bytes=-2)


# -- waiting -------------------------------------------------------------------------
def test_wait_for_sleeps_the_remainder():
    clock = FakeClock(start=100.0)
    started = clock.now()
    clock.advance(0.01)  # the real call took 10 ms
    cost = 14 * 0.005 + 1.75 * 4e6 / 1.25e8
    slept = wait_for(GBIT_5MS, ALLREDUCE, 4_000_000, 8, started, clock)
    assert slept == pytest.approx(cost - 0.01)
    assert clock.sleeps == [slept]
    assert clock.now() == pytest.approx(started + cost)


def test_wait_for_never_subtracts_real_time():
    clock = FakeClock()
    started = clock.now()
    clock.advance(1.0)  # slower than the 37 ms the link needs
    assert wait_for(GBIT_5MS, SEND, 4_000_000, 2, started, clock) == 0.0
    clock.advance(-1.0 + 0.037)  # exactly the cost: nothing left either
    assert wait_for(GBIT_5MS, SEND, 4_000_000, 2, started, clock) == 0.0
    assert clock.sleeps == []


def test_wait_for_alone_sleeps_nothing():
    clock = FakeClock()
    for op in OPS:
        assert wait_for(GBIT_5MS, op, 4_000_000, 1, clock.now(), clock) == 0.0
        assert wait_for(GBIT_5MS, op, 4_000_000, [3], clock.now(), clock) == 0.0
    assert clock.sleeps == []


def test_wait_for_takes_ranks_and_received_bytes():
    clock = FakeClock()
    slept = wait_for(GBIT_5MS, MULTI_EXCHANGE, 1_000_000, [0, 1, 2], clock.now(), clock,
                     received_bytes=2_500_000)
    assert slept == pytest.approx(0.005 + 2_500_000 / 1.25e8)
    slept = wait_for(GBIT_5MS, ALLGATHER, 1000, [0, 2, 4, 6], clock.now(), clock)
    assert slept == pytest.approx(3 * (0.005 + 1000 / 1.25e8))


def test_fake_clock_is_thread_safe():
    clock = FakeClock()
    threads = [threading.Thread(target=lambda: [clock.sleep(0.5) for _ in range(200)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(clock.sleeps) == 800
    assert clock.now() == 400.0


# -- per-pair profiles ---------------------------------------------------------------
SLOW = Link(1.25e7, 0.05)  # 100 Mbit/s, 50 ms
FAST = Link(1.25e9, 0.0)  # 10 Gbit/s


def test_profile_slowest_pair_decides_a_collective():
    net = Network(GBIT_5MS, {(3, 1): SLOW})
    m = 4_000_000
    with_pair = net.seconds(ALLREDUCE, m, [0, 1, 2, 3])
    assert with_pair == pytest.approx(6 * 0.05 + 1.5 * m / 1.25e7)
    without = net.seconds(ALLREDUCE, m, [0, 1, 2])
    assert without == pytest.approx(4 * 0.005 + 4 / 3 * m / 1.25e8)
    assert net.seconds(ALLREDUCE, m, [1]) == 0.0


def test_profile_faster_pairs_do_not_hide_the_default():
    # every pair of {0, 1} is fast; adding 2 brings default links in
    net = Network(GBIT_5MS, {(0, 1): FAST})
    assert net.seconds(BROADCAST, 1000, [0, 1]) == pytest.approx(1000 / 1.25e9)
    assert net.seconds(BROADCAST, 1000, [0, 1, 2]) == pytest.approx(2 * (0.005 + 1000 / 1.25e8))
    # all three pairs overridden: the default plays no part
    net = Network(SLOW, {(0, 1): FAST, (1, 2): FAST, (0, 2): GBIT_5MS})
    assert net.seconds(ALLGATHER, 1000, [2, 0, 1]) == pytest.approx(2 * (0.005 + 1000 / 1.25e8))


def test_profile_pair_decides_point_to_point():
    net = Network(GBIT_5MS, {(0, 1): SLOW})
    m = 1_000_000
    assert net.seconds(SEND, m, [1, 0]) == pytest.approx(0.05 + m / 1.25e7)
    assert net.seconds(RECV, m, [0, 1]) == pytest.approx(0.05 + m / 1.25e7)
    assert net.seconds(SEND, m, [0, 2]) == pytest.approx(0.005 + m / 1.25e8)
    assert net.seconds(EXCHANGE, m, [2, 3]) == pytest.approx(0.005 + 2 * m / 1.25e8)
    # a pair not involving this rank (1-0 is slow, but rank 2 talks to 0 and 3)
    assert net.seconds(MULTI_EXCHANGE, m, [2, 0, 3], received_bytes=2 * m) == \
        pytest.approx(0.005 + 2 * m / 1.25e8)
    assert net.seconds(MULTI_EXCHANGE, m, [0, 2, 1]) == pytest.approx(0.05 + m / 1.25e7)


def test_profile_wait_for_needs_ranks():
    net = Network(GBIT_5MS, {(0, 1): SLOW})
    clock = FakeClock()
    assert wait_for(net, SEND, 1000, [0, 1], clock.now(), clock) == \
        pytest.approx(0.05 + 1000 / 1.25e7)
    with pytest.raises(ValueError, match=r"^group: got a size for a Network"):
        wait_for(net, SEND, 1000, 2, clock.now(), clock)


def test_profile_file(tmp_path):
    path = tmp_path / "net.json"
    path.write_text(json.dumps({"default": "1gbit,5ms",
                                "links": [{"ranks": [2, 0], "link": "100mbit,50ms"}]}))
    net = load_network_profile(path)
    assert net.default == GBIT_5MS
    assert net.pairs == {(0, 2): SLOW}
    assert net.describe() == "1 Gbit/s, 5 ms; ranks 0-2: 100 Mbit/s, 50 ms"
    net.check_ranks(3)
    with pytest.raises(ValueError, match=r"^--network-profile '.*net.json': pair \[0, 2\] names "
                                         r"a rank >= the world size 2; allowed: ranks 0 to 1$"):
        net.check_ranks(2)
    assert parse_network_profile({"default": "10gbit"}).pairs == {}


LINK_FORM = r"BANDWIDTH\[,LATENCY\] such as 1gbit,5ms"


@pytest.mark.parametrize("profile, message", [
    ([], r'^P: expected an object \{"default": "1gbit,5ms", "links": \[.*\]\}, got \[\]$'),
    ({"links": []}, rf"^P: field 'default': expected {LINK_FORM} .*, got nothing \(missing\)$"),
    ({"default": "1gbit", "extra": 1},
     r"^P: field 'extra': expected no such field \(known: default, links\), got 1$"),
    ({"default": "1gb"}, rf"^P: field 'default': expected {LINK_FORM} .*, got \"1gb\"$"),
    ({"default": "1gbit", "links": {}},
     r"^P: field 'links': expected a list of \{\"ranks\": \[a, b\], .*, got \{\}$"),
    ({"default": "1gbit", "links": [{"ranks": [0, 1]}]},
     rf"^P: field 'links\[0\].link': expected {LINK_FORM}.*, got nothing \(missing\)$"),
    ({"default": "1gbit", "links": [{"ranks": [1, 1], "link": "1gbit"}]},
     r"^P: field 'links\[0\].ranks': expected two distinct ranks, integers >= 0, such as "
     r"\[0, 1\], got \[1, 1\]$"),
    ({"default": "1gbit", "links": [{"ranks": [0, -1], "link": "1gbit"}]},
     r"^P: field 'links\[0\].ranks': expected two distinct ranks.*, got \[0, -1\]$"),
    ({"default": "1gbit", "links": [{"ranks": [{}, 1], "link": "1gbit"}]},
     r"^P: field 'links\[0\].ranks': expected two distinct ranks.*, got \[\{\}, 1\]$"),
    ({"default": "1gbit", "links": [{"ranks": [0, 1], "link": "1gbit"},
                                    {"ranks": [1, 0], "link": "1mbit"}]},
     r"^P: field 'links\[1\].ranks': expected a pair not given before \(one link per "
     r"pair\), got \[0, 1\] again$"),
    ({"default": "1gbit", "links": [{"ranks": [0, 1], "link": "fast"}]},
     rf"^P: field 'links\[0\].link': expected {LINK_FORM}.*, got \"fast\"$"),
    ({"default": "0.1kbit"}, r"^P: field 'default': expected a link of finite bandwidth, "
                             r"at least 1kbit \(125 B/s\), got \"0.1kbit\"$"),
])
def test_profile_errors(profile, message):
    """One schema (network.PROFILE_SCHEMA): the field and what was expected. ranks [{}, 1]
    raised TypeError (unhashable) from inside."""
    with pytest.raises(ValueError, match=message):
        parse_network_profile(profile, source="P")


def test_profile_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^--network-profile: cannot read '.*missing.json'"):
        load_network_profile(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match=r"^--network-profile '.*bad.json': expected JSON, "
                                         r"got Expecting property name enclosed in double "
                                         r"quotes at line 1 column 2$"):
        load_network_profile(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"default": "1gbit", "links": [{"ranks": [0, 0], "link": "1gbit"}]}')
    with pytest.raises(ValueError, match=r"^--network-profile '.*wrong.json': field "
                                         r"'links\[0\].ranks': expected two distinct"):
        load_network_profile(wrong)


PROFILE = '{"default": "1gbit,5ms", "links": [{"ranks": [0, 1], "link": "100mbit"}]}'


@pytest.mark.parametrize("content, message", [
    (PROFILE.encode("utf-16"), "expected UTF-8 text, got UTF-16 text (it starts with a "
                               "UTF-16 byte order mark)"),
    (b"\x00\x01\xfe\xfa" * 64, "expected UTF-8 text, got the byte 0xfe at offset 2, which "
                               "is not UTF-8 (a binary file?)"),
    ("[" * 100_000 + "]" * 100_000, "expected JSON nested at most 64 deep, got deeper "
                                    "nesting"),
    ('{"default": "1gbit", "links": ' + "[" * 70 + "]" * 70 + "}",
     "expected JSON nested at most 64 deep, got deeper nesting"),
    ("1" * 5000, "expected JSON, got Exceeds the limit (4300 digits) for integer string "
                 "conversion: value has 5000 digits; use sys.set_int_max_str_digits() to "
                 "increase the limit"),
])
def test_a_profile_that_is_not_utf8_json_names_the_option_and_the_file(tmp_path, monkeypatch,
                                                                        content, message):
    """UTF-16 and binary files said only "'utf-8' codec can't decode byte 0xff", naming
    neither the option nor the file; nesting 100,000 deep raised RecursionError."""
    path = tmp_path / "links.json"
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    line = f"--network-profile {str(path)!r}: {message}"
    with pytest.raises(ValueError) as info:
        load_network_profile(path)
    assert str(info.value) == line
    no_workers(monkeypatch)
    out = tmp_path / "run"
    before = tree(tmp_path)
    code, err, _ = run_cli(["train", "--out", str(out), "--network-profile", str(path)])
    assert (code, err) == (2, [f"accord train: error: {line}"])
    assert tree(tmp_path) == before  # nothing written


def test_a_utf8_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "links.json"
    path.write_bytes(PROFILE.encode("utf-8-sig"))
    assert load_network_profile(path).pairs == {(0, 1): Link(1.25e7, 0.0)}


def test_network_pairs_checked():
    with pytest.raises(ValueError, match=r"^Network pair: got \(1, 1\)"):
        Network(GBIT_5MS, {(1, 1): SLOW})
    with pytest.raises(ValueError, match=r"^Network pair: \[0, 1\] given twice"):
        Network(GBIT_5MS, {(0, 1): SLOW, (1, 0): FAST})
