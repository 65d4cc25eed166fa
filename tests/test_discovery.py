"""Discovery over real libp2p: separate processes on 127.0.0.1 (tests/p2p_peer.py) plus in-process checks."""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dsd_node.ops.testnet import free_port as free_tcp_port
from dsd_node.p2p.discovery import Discovery, DiscoveryError
from dsd_node.p2p.identity import Identity
from dsd_node.p2p.records import NodeRecord

pytestmark = pytest.mark.slow  # starts node processes / network

ROOT = Path(__file__).resolve().parent.parent
TTL_S = 3.0


class Peer:
    """A tests/p2p_peer.py subprocess whose JSON stdout lines are collected by a reader thread."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "tests/p2p_peer.py", *args], cwd=ROOT, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.ready = self.expect(lambda d: d["event"] == "ready", 30)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def expect(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """The first (next) output line satisfying ``pred``, or fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                d = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if pred(d):
                return d
        raise AssertionError(
            f"no expected output from {self.proc.args[2:4]} within {timeout} s (rc={self.proc.poll()})"
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def net() -> Iterator[dict[str, Any]]:
    """1 bootstrap + 3 announcers (layers 0:4, 4:8, 8:12; TTL 3 s) + 1 garbage publisher + 1 finder."""
    peers: list[Peer] = []
    try:
        boot = Peer("bootstrap")
        peers.append(boot)
        addr = boot.ready["addr"]
        common = ["--bootstrap", addr, "--model", "org/model", "--num-layers", "12"]
        spans = ["0:4", "4:8", "8:12"]
        announcers = [Peer("announce", *common, "--layers", s, "--ttl", str(TTL_S)) for s in spans]
        garbage = Peer("garbage", *common)
        peers += [*announcers, garbage]
        for a in announcers:
            a.expect(lambda d: d["event"] == "announced", 30)
        junk = garbage.expect(lambda d: d["event"] == "garbage", 30)
        t0 = time.monotonic()
        finder = Peer("find", *common)
        peers.append(finder)
        yield {"boot": boot, "announcers": announcers, "garbage": garbage, "junk": junk, "finder": finder, "t0": t0}
    finally:
        for p in peers:
            p.close()


def test_finder_gets_all_records_and_ignores_garbage(net: dict[str, Any]) -> None:
    finder: Peer = net["finder"]
    full = finder.expect(lambda d: d["event"] == "found" and len(d["records"]) == 3, 20)
    conv = full["t"] - finder.ready["t"]
    print(
        f"\ndiscovery convergence: finder saw all 3 records {conv:.2f} s after its libp2p start "
        f"({time.monotonic() - net['t0']:.2f} s after process spawn); one find() = {full['find_ms']:.0f} ms"
    )
    ids = {a.ready["peer_id"]: a for a in net["announcers"]}
    assert set(full["records"]) == set(ids)
    assert sorted(v[:2] for v in full["records"].values()) == [[0, 4], [4, 8], [8, 12]]
    assert net["junk"]["accepted_by"] == 0  # remote DHT validators refused the garbage PUTs
    # the garbage (served by the garbage peer itself) is fetched, dropped, and never returned
    seen = finder.expect(lambda d: d["event"] == "found" and d["invalid"] >= 1, 10)
    assert net["garbage"].ready["peer_id"] not in seen["records"] and len(seen["records"]) == 3
    assert finder.proc.poll() is None


def test_record_expires_after_announcer_killed(net: dict[str, Any]) -> None:
    finder: Peer = net["finder"]
    victim: Peer = net["announcers"][2]
    finder.expect(lambda d: d["event"] == "found" and victim.ready["peer_id"] in d["records"], 20)
    victim.close()
    killed = time.monotonic()
    after = finder.expect(lambda d: d["event"] == "found" and victim.ready["peer_id"] not in d["records"], TTL_S + 8)
    gone_s = time.monotonic() - killed
    print(f"\nrecord of killed announcer vanished after {gone_s:.2f} s (TTL {TTL_S} s)")
    assert gone_s <= TTL_S + 8
    assert sorted(v[:2] for v in after["records"].values()) == [[0, 4], [4, 8]]


def test_finder_stops_cleanly(net: dict[str, Any]) -> None:
    finder: Peer = net["finder"]
    assert finder.proc.stdin is not None
    finder.proc.stdin.close()  # p2p_peer.py then cancels its tasks and awaits Discovery.stop()
    assert finder.proc.wait(timeout=10) == 0


async def test_unreachable_bootstrap_raises() -> None:
    missing = Identity.generate().peer_id
    disc = Discovery(Identity.generate(), bootstrap=[f"/ip4/127.0.0.1/tcp/9/p2p/{missing}"], connect_timeout_s=1.0)
    t = time.monotonic()
    with pytest.raises(DiscoveryError, match="no bootstrap peer reachable"):
        await disc.start()
    assert time.monotonic() - t < 5
    await disc.stop()


async def test_in_process_announce_find_withdraw() -> None:
    boot = Discovery(Identity.generate())
    await boot.start()
    # /dns4 names are resolved before dialing (docker-compose service names)
    node = Discovery(
        Identity.generate(), bootstrap=[boot.listen_addrs[0].replace("/ip4/127.0.0.1/", "/dns4/localhost/")]
    )
    try:
        await node.start()
        assert boot.listen_addrs[0].endswith(f"/p2p/{boot.peer_id}")
        rec = NodeRecord(
            peer_id=node.peer_id, role="stage", model_id="m", model_hash="h", layer_start=0, layer_end=2,
            num_layers=2, grpc_address="127.0.0.1:1", version="t", tokens_per_s=1.0, sessions=0,
            max_sessions=1, expires_at=time.time() + 30,
        )  # fmt: skip
        await node.announce(rec)
        assert await boot.find("m") == [rec]
        assert await node.find("m") == [rec]
        assert await boot.find("m", expected_model_hash="other") == []
        assert await boot.find("unknown-model") == []
        await node.withdraw()
        assert await boot.find("m") == []
    finally:
        t = time.monotonic()
        await node.stop()
        await boot.stop()
        assert time.monotonic() - t < 10


async def test_port_in_use_raises() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        disc = Discovery(Identity.generate(), listen_port=s.getsockname()[1])
        with pytest.raises(DiscoveryError, match="could not listen"):
            await disc.start()
        await disc.stop()


async def test_a_node_started_before_its_bootstrap_joins_once_the_bootstrap_listens() -> None:
    """py-libp2p blocks a peer for 60 s after one failed dial; the join loop must not be held up by it."""
    port = free_tcp_port()
    boot_id = Identity.generate()
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{boot_id.peer_id}"
    node = Discovery(Identity.generate(), bootstrap=[addr], require_bootstrap=False)
    boot = Discovery(boot_id, "127.0.0.1", port)
    rec = NodeRecord(
        peer_id=node.peer_id, role="stage", model_id="early", model_hash="h", layer_start=0, layer_end=2,
        num_layers=2, grpc_address="127.0.0.1:1", version="t", tokens_per_s=1.0, sessions=0,
        max_sessions=1, expires_at=time.time() + 60,
    )  # fmt: skip
    try:
        await node.start()  # the bootstrap is not listening yet: its first dials fail
        await asyncio.sleep(2.5)
        await boot.start()
        t0 = time.monotonic()
        while True:  # joined: its record reaches the bootstrap (well before the 60 s block would end)
            await node.announce(rec)
            if await boot.find("early") == [rec]:
                break
            assert time.monotonic() - t0 < 30, "the node did not join within 30 s of its bootstrap starting"
            await asyncio.sleep(1.0)
    finally:
        await node.stop()
        await boot.stop()
