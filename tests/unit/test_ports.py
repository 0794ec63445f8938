"""Ports recorded under CHOLINE_HOME are reused at every `choline up`, so they are picked outside the
kernel's ephemeral range: a port in it can be taken at any moment by some process's outgoing connection
(it happened: weed's volume port, picked free, was held by a client socket at the next start)."""

from __future__ import annotations

import socket

from choline_core.embedded import GRPC_OFFSET, MAX_WEED_PORT, ephemeral_range, free_weed_port, port_free, stable_port


def test_stable_ports_are_free_and_outside_the_ephemeral_range() -> None:
    lo, hi = ephemeral_range()
    assert 1024 <= lo <= hi <= 65535
    taken: set[int] = set()
    for _ in range(50):
        p = stable_port(taken)
        assert not lo <= p <= hi and p not in taken and port_free(p)
        taken.add(p)


def test_weed_port_pairs_are_free_below_its_limit_and_outside_the_ephemeral_range() -> None:
    lo, hi = ephemeral_range()
    for _ in range(50):
        p = free_weed_port()
        assert p < MAX_WEED_PORT
        for q in (p, p + GRPC_OFFSET):
            assert not lo <= q <= hi and port_free(q)


def test_a_held_port_is_never_picked() -> None:
    held = []
    try:
        for _ in range(20):
            p = stable_port({s.getsockname()[1] for s in held})
            s = socket.socket()
            s.bind(("127.0.0.1", p))
            s.listen()
            held.append(s)
        ports = [s.getsockname()[1] for s in held]
        assert len(set(ports)) == 20 and not any(port_free(p) for p in ports)
    finally:
        for s in held:
            s.close()
