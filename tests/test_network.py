"""The network across real processes: node daemons on 127.0.0.1 talking gRPC, against the HF reference."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch
from conftest import PROMPTS, hf_greedy, stage_sessions, wait_no_sessions

from dsd_node.engine.config import GenerationConfig
from dsd_node.engine.messages import Hop, RoundMsg
from dsd_node.engine.tree import TokenTree
from dsd_node.net.client import ClientError, DsdClient
from dsd_node.net.grpc_util import query_info, wait_healthy
from dsd_node.net.wire import round_to_pb
from dsd_node.ops.testnet import Testnet, plan
from dsd_node.proto import dsd_pb2 as pb
from dsd_node.proto import dsd_pb2_grpc as rpc

pytestmark = pytest.mark.slow  # starts node processes / network

EXTRA = ["--max-message-mb", "4", "--round-timeout", "20"]


def _net(stages: int, drafter: str | None = "embedded:drafter") -> Testnet:
    net = Testnet(plan(stages, drafter=drafter, extra=EXTRA))
    try:
        asyncio.run(net.up())
    except BaseException:
        net.down()
        raise
    return net


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda n: f"{n}stages")
def net(request):
    n = _net(request.param)
    yield n
    n.down()


@pytest.mark.parametrize("mode", ["ar", "si", "dsi"])
async def test_greedy_through_stage_processes_equals_hf_generate(net, reference, tokenizer, mode):
    async with DsdClient(net.gateway) as c:
        for i, prompt in enumerate(PROMPTS[:4]):
            ids = tokenizer(prompt)["input_ids"]
            inflight = [1, 2, 4, 0][i % 4]  # 0: one per stage
            r = await c.generate(prompt, GenerationConfig(mode=mode, max_new_tokens=32, max_inflight=inflight))
            assert r.tokens == hf_greedy(reference, ids, 32, tokenizer.eos_token_id), (mode, prompt)
            assert r.stats.new_tokens == len(r.tokens) and r.stats.rounds >= 1
            assert tokenizer.decode(r.tokens) == r.text


@pytest.fixture(scope="module")
def net2():
    n = _net(2)
    yield n
    n.down()


async def test_eight_concurrent_sessions(net2, reference, tokenizer):
    prompts = (PROMPTS * 2)[:8]
    modes = ["si", "dsi", "ar", "si", "dsi", "si", "ar", "dsi"]
    async with DsdClient(net2.gateway) as c:
        results = await asyncio.gather(*[c.generate(p, GenerationConfig(mode=m, max_new_tokens=24))
                                         for p, m in zip(prompts, modes, strict=True)])
    for p, r in zip(prompts, results, strict=True):
        assert r.tokens == hf_greedy(reference, tokenizer(p)["input_ids"], 24, tokenizer.eos_token_id)


async def _wait_no_sessions(stages: list[str], timeout: float = 10) -> None:
    await wait_no_sessions(stages, timeout)


async def test_cancel_frees_the_session_on_every_stage(net2):
    stages = [s.address for s in net2.specs if s.name.startswith("stage")]
    await _wait_no_sessions(stages)  # finished sessions of earlier tests are freed too
    async with DsdClient(net2.gateway) as c:
        stream = c.stream(PROMPTS[0], GenerationConfig(mode="ar", max_new_tokens=1000, ignore_eos=True))
        await stream.__anext__()
        assert sum(await stage_sessions(stages)) == len(stages)  # the session lives on every stage
        await stream.aclose()  # cancels the call
    await _wait_no_sessions(stages)


async def _forward_error(address: str, msgs: list[pb.Round]) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as ch:
        call = rpc.StageStub(ch).Forward()
        for m in msgs:
            await call.write(m)
        await call.done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in call:
                pass
        return e.value


async def test_bad_input_gets_clear_statuses_and_the_node_keeps_serving(net2, reference, tokenizer):
    s0, s1 = [s for s in net2.specs if s.name.startswith("stage")]
    route = [Hop(s0.address, 0, 4), Hop(s1.address, 4, 8)]
    tree = TokenTree([5, 6], [-1, 0], n_given=2)

    def second_stage_round(hidden: torch.Tensor, **kw) -> pb.Round:
        return round_to_pb(RoundMsg("bad", 0, 0, tree=tree, hidden=hidden, route=route, hop=1, **kw))

    good = torch.zeros(1, 2, 256)
    cases = {
        # another float dtype is converted to the stage's own, not refused (tests/test_precision.py)
        "wrong shape": (second_stage_round(torch.zeros(1, 3, 256)), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        "oversized": (second_stage_round(torch.zeros(1, 2, 3_000_000)), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    }
    m = second_stage_round(good)
    m.hidden.data = m.hidden.data[:-3]
    cases["malformed bytes"] = (m, grpc.StatusCode.INVALID_ARGUMENT, "do not match")
    m = second_stage_round(good)
    m.hidden.dtype = "int7"
    cases["unknown dtype"] = (m, grpc.StatusCode.INVALID_ARGUMENT, "unknown tensor dtype")
    m = second_stage_round(good)
    m.setup.hop = 0  # says layers 0:4 to the node hosting 4:8
    cases["layers not hosted"] = (m, grpc.StatusCode.INVALID_ARGUMENT, "this node hosts 4:8")
    for name, (msg, code, text) in cases.items():
        err = await _forward_error(s1.address, [msg])
        assert err.code() == code and text in (err.details() or ""), (name, err.code(), err.details())
    async with grpc.aio.insecure_channel(s1.address) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await rpc.StageStub(ch).EndSession(pb.SessionRef(session_id="no-such-session"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "unknown session" in e.value.details()
    async with grpc.aio.insecure_channel(net2.gateway) as ch:
        call = rpc.GatewayStub(ch).Verdicts()
        await call.write(pb.Verdict(session_id="no-such-session"))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    async with DsdClient(net2.gateway) as c:
        with pytest.raises(ClientError, match="INVALID_ARGUMENT"):
            await c.generate([999999], GenerationConfig())
        with pytest.raises(ClientError, match="INVALID_ARGUMENT.*exceed the model's context of 2048 positions"):
            await c.generate([5] * 2040, GenerationConfig(max_new_tokens=16))  # prompt + new tokens > 2048 positions
        r = await c.generate(PROMPTS[0], GenerationConfig(max_new_tokens=16))
    assert r.tokens == hf_greedy(reference, tokenizer(PROMPTS[0])["input_ids"], 16, tokenizer.eos_token_id)


async def test_a_stage_keeps_the_settings_of_a_sessions_first_round(net2):
    """The route, hop and sampling travel once, in a stream's first round. A stream that opens without them gets
    FAILED_PRECONDITION; a later round that changes them INVALID_ARGUMENT; a later round without them is run with
    the first round's hop (checked against the layers that hop names), and the stage keeps serving."""
    s0, s1 = [s for s in net2.specs if s.name.startswith("stage")]
    route = [Hop(s0.address, 0, 4), Hop(s1.address, 4, 8)]
    tree = TokenTree([5, 6], [-1, 0], n_given=2)
    first = round_to_pb(RoundMsg("settings", 0, 0, route=route, hop=1, reply_to=net2.gateway))  # commit-only
    later = round_to_pb(RoundMsg("settings", 1, 0, tree=tree, hidden=torch.zeros(1, 3, 256)), setup=False)
    assert not later.HasField("setup") and first.HasField("setup")
    err = await _forward_error(s1.address, [later])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
    assert "brings no session settings and this stage holds none" in err.details(), err.details()
    # the later round has no hop of its own: the stored hop 1 (layers 4:8) passes the layer check, so what
    # fails is its hidden states' shape (3 nodes' worth for a tree of 2), not "this node hosts 4:8"
    err = await _forward_error(s1.address, [first, later])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "hidden states have shape" in err.details(), err
    changed = round_to_pb(RoundMsg("settings", 1, 0, route=route, hop=0, reply_to=net2.gateway))
    err = await _forward_error(s1.address, [first, changed])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "changes the session's settings" in err.details(), err
    await _wait_no_sessions([s0.address, s1.address])


def test_cli_reports_a_gateway_that_does_not_answer():
    p = subprocess.run([sys.executable, "-m", "dsd_node.cli", "generate", "--gateway", "127.0.0.1:9", "hello"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "generation failed: UNAVAILABLE" in p.stderr and "Traceback" not in p.stderr


def _net_full() -> Testnet:
    net = Testnet(plan(2, drafter=None, extra=[*EXTRA, "--max-sessions", "1", "--queue-timeout", "1"]))
    asyncio.run(net.up())
    return net


async def test_full_node_says_so_and_killing_a_stage_fails_generation_quickly(reference):
    net = await asyncio.to_thread(_net_full)
    try:
        async with DsdClient(net.gateway) as c:
            stream = c.stream(PROMPTS[0], GenerationConfig(mode="ar", max_new_tokens=1500, ignore_eos=True))
            await stream.__anext__()
            with pytest.raises(ClientError) as full:  # stages take one session at a time here
                await c.generate(PROMPTS[1], GenerationConfig(mode="ar", max_new_tokens=4))
            assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "is full" in str(full.value)
            net.kill("stage1")
            t0 = time.monotonic()
            with pytest.raises(ClientError) as e:
                async for _ in stream:
                    pass
            assert time.monotonic() - t0 < 15
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
            assert "stage" in str(e.value) or "pipeline" in str(e.value)
    finally:
        net.down()
    # the survivors shut down cleanly on SIGTERM
    assert [p.returncode for n, p in net.procs.items() if n != "stage1"] == [0, 0]


@pytest.mark.slow
@pytest.mark.extended  # ~35 s of node start-ups; the precedence rules also have fast tests (test_fast_* / config)
def test_config_file_environment_and_flags(tmp_path):
    cfg = tmp_path / "node.yaml"
    cfg.write_text("model: embedded:target\nlayers: '0:2'\nmax_sessions: 5\n")
    from dsd_node.ops.testnet import free_port

    addr = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "DSD_LAYERS": "2:6"}  # environment beats the file; flags beat both
    p = subprocess.Popen([sys.executable, "-m", "dsd_node.node_cli", "--config", str(cfg), "--listen", addr,
                          "--max-sessions", "7", "--threads", "1", "--insecure"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        asyncio.run(wait_healthy(addr, 90))

        async def info():
            async with grpc.aio.insecure_channel(addr) as ch:
                return await query_info(ch)

        i = asyncio.run(info())
        assert (i.layer_start, i.layer_end, i.max_sessions, i.model, i.num_layers) == (2, 6, 7, "embedded:target", 8)
        assert i.tokens_per_s > 0 and i.model_hash
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 0
    finally:
        p.kill()
    key = tmp_path / "id" / "node.key"
    ids = [subprocess.run([sys.executable, "-m", "dsd_node.node_cli", "--print-peer-id", "--identity", str(key)],
                          capture_output=True, text=True, timeout=60).stdout.strip() for _ in range(2)]
    assert ids[0].startswith("12D3Koo") and ids[0] == ids[1]  # created once, then the same identity
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    bad = subprocess.run([sys.executable, "-m", "dsd_node.node_cli", "--role", "stage", "--layers", "6:2"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "bad layer range" in bad.stderr and "Traceback" not in bad.stderr
