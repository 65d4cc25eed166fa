"""The network through libp2p discovery: bootstrap, announcing stages with replicas, a head that finds its
route, waits for missing layers, and fails over when a stage dies (separate processes, real libp2p)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc
import pytest
from conftest import PROMPTS, find_stages, hf_greedy

from dsd_node.engine.config import GenerationConfig
from dsd_node.net.client import DsdClient
from dsd_node.net.grpc_util import query_info, wait_healthy
from dsd_node.ops.testnet import Testnet, plan_discovery
from dsd_node.p2p.discovery import Discovery
from dsd_node.p2p.identity import Identity

pytestmark = pytest.mark.slow  # starts node processes / network

TTL = 6.0


async def _wait_for(pred, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)
    return time.monotonic() - t0


async def test_discovery_replicas_waiting_head_and_failover(reference, tokenizer, tmp_path):
    specs = plan_discovery(3, replicas=2, key_dir=tmp_path, announce_ttl=TTL,
                           extra=["--round-timeout", "20", "--route-wait", "120"])
    by_name = {s.name: s for s in specs}
    net = Testnet(specs, log_dir=tmp_path / "logs")
    try:
        # the head starts before any stage: it waits, and says so
        for name in ("bootstrap", "head"):
            net.start(by_name[name])
        await wait_healthy(by_name["bootstrap"].address, timeout=60)
        await _wait_for(lambda: "waiting for stages" in net.tail("head", 50), 60, "the head's waiting message")
        assert "no stage hosts layers 0" in net.tail("head", 50)
        t0 = time.monotonic()
        for s in specs:
            if s.name not in ("bootstrap", "head"):
                net.start(s)
        for s in specs:
            await wait_healthy(s.address, timeout=120)
        print(f"all nodes healthy and route found {time.monotonic() - t0:.1f} s after the stages started")

        # every stage's record is visible to a fresh peer that only knows the bootstrap
        boot = by_name["head"].args[by_name["head"].args.index("--bootstrap") + 1]
        d = Discovery(Identity.generate(), bootstrap=[boot])
        await d.start()
        try:
            records = await find_stages(d, 6, tries=5, every_s=1.0)  # (the head announces too: not a stage)
            assert sorted((r.layer_start, r.layer_end) for r in records) == [(0, 3), (0, 3), (3, 5), (3, 5), (5, 8), (5, 8)]

            async with grpc.aio.insecure_channel(by_name["head"].address) as ch:
                route = (await query_info(ch)).route  # the head says which route it uses
            assert [(h.layer_start, h.layer_end) for h in route] == [(0, 3), (3, 5), (5, 8)]
            victim = next(s for s in specs if s.address == route[1].address)
            victim_peer = next(r.peer_id for r in records if r.grpc_address == victim.address)

            # SIGKILL a stage of the route during a long greedy generation: the text is unchanged
            ids = tokenizer(PROMPTS[0])["input_ids"]
            async with DsdClient(by_name["head"].address) as c:
                got: list[int] = []
                stream = c.stream(PROMPTS[0], GenerationConfig(mode="si", max_new_tokens=200, ignore_eos=True))
                async for chunk in stream:
                    got += chunk.tokens
                    if len(got) >= 20 and net.procs[victim.name].poll() is None:
                        t_kill = time.monotonic()
                        net.kill(victim.name)
                print(f"generation finished {time.monotonic() - t_kill:.1f} s after the kill")
            assert got == hf_greedy(reference, ids, 200, None)
            assert "failover 1" in net.tail("head", 200)

            # the dead node's record disappears once it expires
            async def gone() -> bool:
                return victim_peer not in {r.peer_id for r in await d.find("embedded:target")}

            t0 = time.monotonic()
            while not await gone():
                assert time.monotonic() - t0 < 3 * TTL, "dead node's record did not expire"
                await asyncio.sleep(0.5)
        finally:
            await d.stop()

        # `dsd route` prints the table and a complete route
        p = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "dsd_node.cli", "route", "--bootstrap", boot],
                                    capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "LAYERS" in p.stdout and "route: " in p.stdout and victim.address not in p.stdout.split("route: ")[1]
    finally:
        net.down()
