"""Abuse through real processes on 127.0.0.1: bad bytes, oversized requests, hijacked session ids, abandoned
streams holding every slot, and more clients than slots. Every refusal is a precise gRPC status with one log
line and no traceback; the nodes keep serving, and what completes equals Hugging Face greedy output."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest
import torch
from conftest import PROMPTS, hf_greedy, running, stage_sessions, wait_no_sessions

from dsd_node.engine.config import GenerationConfig, TreeShape
from dsd_node.engine.messages import Hop, RoundMsg
from dsd_node.engine.tree import SparseDist, TokenTree
from dsd_node.engine.verify import Rule, SamplingParams
from dsd_node.net.client import ClientError, DsdClient
from dsd_node.net.wire import generate_request_to_pb, round_to_pb
from dsd_node.ops.testnet import Testnet, plan
from dsd_node.proto import dsd_pb2 as pb
from dsd_node.proto import dsd_pb2_grpc as rpc

pytestmark = pytest.mark.slow  # starts node processes

SLOTS, TTL = 4, 4.0
EXTRA = [
    "--round-timeout",
    "20",
    "--max-sessions",
    str(SLOTS),
    "--session-ttl",
    str(TTL),
    "--queue-size",
    "6",
    "--queue-timeout",
    "25",
]
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def net():
    with running(plan(2, extra=EXTRA)) as n:
        yield n


def _addr(net: Testnet, prefix: str) -> list[str]:
    return [s.address for s in net.specs if s.name.startswith(prefix)]


def _route(net: Testnet) -> list[Hop]:
    s0, s1 = _addr(net, "stage")
    return [Hop(s0, 0, 4), Hop(s1, 4, 8)]


async def _wait_no_sessions(addresses: list[str], timeout: float = 3 * TTL) -> None:
    await wait_no_sessions(addresses, timeout)


async def _call_error(call) -> grpc.aio.AioRpcError | None:
    """The status a call ended with; None if it ended OK."""
    try:
        async for _ in call:  # a status other than OK raises here
            pass
    except grpc.aio.AioRpcError as e:
        return e
    return None


async def _forward(address: str, msgs: list[bytes | pb.Round]) -> grpc.aio.AioRpcError | None:
    """Send messages (raw bytes as they are) on one Forward stream; the status it ends with."""
    async with grpc.aio.insecure_channel(address) as ch:
        call = ch.stream_stream("/dsd.v1.Stage/Forward")()  # no serializer: bytes travel as given
        for m in msgs:
            await call.write(m if isinstance(m, bytes) else m.SerializeToString())
        await call.done_writing()
        return await asyncio.wait_for(_call_error(call), 30)


def _last_stage_round(net: Testnet, sid: str = "bad", tree: TokenTree | None = None, **kw) -> pb.Round:
    tree = tree or TokenTree([5, 6], [-1, 0], n_given=2)
    return round_to_pb(
        RoundMsg(sid, 0, 0, tree=tree, hidden=torch.zeros(1, len(tree), 256), route=_route(net), hop=1, **kw)
    )


def _first_stage_round(net: Testnet, tree: TokenTree) -> pb.Round:
    return round_to_pb(RoundMsg("big", 0, 0, tree=tree, route=_route(net), hop=0))


async def test_malformed_and_oversized_inputs_get_precise_statuses(net):
    s0, s1 = _addr(net, "stage")
    huge = _last_stage_round(net)
    huge.hidden.ClearField("shape")
    huge.hidden.shape.extend([2**40, 2**40, 0])
    huge.hidden.data = b""
    sample = SamplingParams(Rule.SAMPLE, 1.0)
    dist_tree = TokenTree([5, 6, 7], [-1, 0, 1], n_given=2, draft_dists=[None, None, SparseDist([99999], [1.0])])
    cases = {  # name: (stage, messages, status, words in the details)
        "junk bytes": (s1, [b"\xff\xff\xff\xff junk"], INVALID, "malformed Forward message"),
        "shape [2^40, 2^40, 0]": (s1, [huge], INVALID, "out of bounds"),
        "NaN temperature": (
            s1,
            [_last_stage_round(net, sampling=SamplingParams(Rule.SAMPLE, math.nan))],
            INVALID,
            "temperature",
        ),
        "negative temperature": (
            s1,
            [_last_stage_round(net, sampling=SamplingParams(Rule.SAMPLE, -1.0))],
            INVALID,
            "temperature",
        ),
        "draft distribution id 99999": (
            s1,
            [_last_stage_round(net, tree=dist_tree, sampling=sample)],
            INVALID,
            "outside the vocabulary",
        ),
        "draft distribution id -5": (
            s1,
            [
                _last_stage_round(
                    net,
                    tree=TokenTree([5, 6, 7], [-1, 0, 1], n_given=2, draft_dists=[None, None, SparseDist([-5], [1.0])]),
                    sampling=sample,
                )
            ],
            INVALID,
            "outside the vocabulary",
        ),
        # 3,000 roots: a 3000 x 3000 ancestor matrix and mask (and 35,000 would ask for 4.9 GB): refused first
        "huge tree": (s0, [_first_stage_round(net, TokenTree([5] * 3000, [-1] * 3000))], INVALID, "tree nodes"),
        "prompt beyond the context": (
            s0,
            [_first_stage_round(net, TokenTree.chain([5] * 3000, n_given=3000))],
            INVALID,
            "context of 2048",
        ),
    }
    wrong = []
    for name, (address, msgs, code, words) in cases.items():
        err = await _forward(address, msgs)
        if err is None or err.code() != code or words not in (err.details() or ""):
            wrong.append((name, "OK" if err is None else f"{err.code().name}: {err.details()}"))

    async with grpc.aio.insecure_channel(net.gateway) as ch:
        junk = ch.unary_stream("/dsd.v1.Gateway/Generate")(b"\xff\xff\xff\xff junk")
        err = await _call_error(junk)
        if err is None or err.code() != INVALID or "malformed Generate" not in err.details():
            wrong.append(("Generate: junk bytes", "OK" if err is None else f"{err.code().name}: {err.details()}"))
        stub = rpc.GatewayStub(ch)
        bad_requests = {
            "NaN temperature": pb.GenerateRequest(prompt="x", sampling=pb.Sampling(rule=1, temperature=math.nan)),
            "negative temperature": pb.GenerateRequest(prompt="x", sampling=pb.Sampling(rule=1, temperature=-2)),
            "branch 5000": generate_request_to_pb("x", GenerationConfig(tree=TreeShape(branch=5000))),
            "draft_k 10000": pb.GenerateRequest(prompt="x", draft_k=10000),
            "min_valid_prob NaN": pb.GenerateRequest(prompt="x", min_valid_prob=math.nan),
            "prompt + tokens beyond the context": pb.GenerateRequest(prompt_tokens=[5] * 2000, max_new_tokens=100),
        }
        for name, req in bad_requests.items():
            err = await _call_error(stub.Generate(req))
            if err is None or err.code() != INVALID:
                wrong.append((f"Generate: {name}", "OK" if err is None else f"{err.code().name}: {err.details()}"))
    assert not wrong, "\n".join(f"{n}: {e}" for n, e in wrong)
    drafter = _addr(net, "drafter")[0]
    async with grpc.aio.insecure_channel(drafter) as ch:
        req = pb.DraftRequest(session_id="d", context=[5, 6], depth=4, tree=pb.TreeShape(branch=5000, branch_depth=1))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await rpc.DrafterStub(ch).Draft(req)
        assert e.value.code() == INVALID and "branch 5000" in e.value.details()
    for name in ("stage0", "stage1", "drafter", "head"):
        log = net.tail(name, 100_000)
        assert "Traceback" not in log, f"{name} logged a traceback:\n{log}"
    assert net.tail("stage1", 100_000).count("malformed Forward message") == 1  # one line per refusal
    await _wait_no_sessions(_addr(net, "stage"))


async def test_a_reused_session_id_is_refused_and_the_victim_lives_on(net):
    s1 = _addr(net, "stage")[1]
    commit_only = round_to_pb(RoundMsg("victim", 0, 0, route=_route(net), hop=1))
    async with grpc.aio.insecure_channel(s1) as ch:
        victim = rpc.StageStub(ch).Forward()
        await victim.write(commit_only)
        deadline = time.monotonic() + TTL / 2
        while (await stage_sessions([s1]))[0] != 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        err = await _forward(s1, [commit_only])
        assert err is not None and err.code() == grpc.StatusCode.ALREADY_EXISTS, err
        assert (await stage_sessions([s1]))[0] == 1  # still held, by the victim
        await victim.write(commit_only)  # on main this fails: the intruder's stream ended the victim's session
        await victim.done_writing()
        assert await asyncio.wait_for(_call_error(victim), 10) is None


async def test_abandoned_streams_expire_and_full_stages_are_back_pressure(net, reference, tokenizer):
    """Every slot of the last stage held by streams that only send commit-only messages: they expire after the
    TTL anyway, and the generation queued meanwhile (the stage's RESOURCE_EXHAUSTED is back-pressure, not a
    failure) completes, equal to HF."""
    stages = _addr(net, "stage")
    await _wait_no_sessions(stages)
    channel = grpc.aio.insecure_channel(stages[1])
    streams = []
    for i in range(SLOTS):
        call = rpc.StageStub(channel).Forward()
        await call.write(round_to_pb(RoundMsg(f"abandoned{i}", 0, 0, route=_route(net), hop=1)))
        streams.append(call)

    async def keep_alive(call, sid: str) -> grpc.aio.AioRpcError | None:
        """Commit-only messages every 0.5 s: they must not renew the session."""
        ended = asyncio.ensure_future(_call_error(call))
        for _ in range(int(6 * TTL)):
            if ended.done():
                break
            try:
                await call.write(round_to_pb(RoundMsg(sid, 0, 0, route=_route(net), hop=1)))
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                break
            await asyncio.sleep(0.5)
        return await asyncio.wait_for(ended, 10)

    try:
        deadline = time.monotonic() + TTL / 2
        while (await stage_sessions(stages))[1] < SLOTS and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert (await stage_sessions(stages))[1] == SLOTS
        keepers = [asyncio.ensure_future(keep_alive(c, f"abandoned{i}")) for i, c in enumerate(streams)]
        t0 = time.monotonic()
        async with DsdClient(net.gateway) as c:
            r = await c.generate(PROMPTS[0], GenerationConfig(mode="si", max_new_tokens=16))
        waited = time.monotonic() - t0
        ends = await asyncio.gather(*keepers)
    finally:
        await channel.close()
    assert r.tokens == hf_greedy(reference, tokenizer(PROMPTS[0])["input_ids"], 16, tokenizer.eos_token_id)
    assert r.stats.failovers == 0  # a full stage is not a failed one
    assert waited < 5 * TTL
    for e in ends:
        assert e is not None and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "expired" in e.details(), e
    print(f"generation queued behind {SLOTS} abandoned sessions completed after {waited:.1f} s (TTL {TTL:g} s)")


async def test_more_clients_than_slots_complete_or_get_a_clear_resource_exhausted(net, reference, tokenizer):
    clients = 3 * SLOTS
    await _wait_no_sessions(_addr(net, "stage"))
    modes = ["ar", "si", "dsi"]

    async def one(i: int):
        prompt = PROMPTS[i % len(PROMPTS)]
        t0 = time.monotonic()
        async with DsdClient(net.gateway) as c:
            try:
                r = await c.generate(prompt, GenerationConfig(mode=modes[i % 3], max_new_tokens=16))
                print(f"client {i}: done in {time.monotonic() - t0:.1f} s")
                return prompt, r
            except ClientError as e:
                print(f"client {i}: {e} after {time.monotonic() - t0:.1f} s")
                return prompt, e

    results = await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(clients)]), 120)
    done = [(p, r) for p, r in results if not isinstance(r, ClientError)]
    refused = [r for _, r in results if isinstance(r, ClientError)]
    want = {
        p: hf_greedy(reference, tokenizer(p)["input_ids"], 16, tokenizer.eos_token_id) for p in {p for p, _ in done}
    }
    for p, r in done:
        assert r.tokens == want[p]
    for e in refused:
        assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "gateway is full" in str(e), e
        assert "is the gateway running" not in str(e)
    assert len(done) >= SLOTS + 6 - 1 and len(refused) <= clients - SLOTS  # the queue of 6 waited its turn
    print(
        f"{clients} clients, {SLOTS} slots, queue of 6: {len(done)} completed, {len(refused)} refused; "
        f"RSS after the abuse suite: {rss_mb(net)}"
    )


def rss_mb(net: Testnet) -> dict[str, int]:
    """Resident memory of each node process, in MB (Linux /proc)."""
    out = {}
    for name, p in net.procs.items():
        with open(f"/proc/{p.pid}/status") as f:
            out[name] = next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS:"))
    return out


@pytest.mark.extended
async def test_memory_is_returned_after_200_abandoned_sessions():
    """200 generations with 1,000-token prompts, 20 at a time, each abandoned by its client after its first token:
    once their sessions have ended, every stage's RSS is back near where it was after one such generation."""
    prompt = list(range(5, 1005))
    cfg = GenerationConfig(mode="ar", max_new_tokens=500, ignore_eos=True)
    n = Testnet(plan(2, drafter=None, extra=["--round-timeout", "200"]))
    try:
        await n.up()
        stages = _addr(n, "stage")
        async with DsdClient(n.gateway) as c:

            async def abandon() -> None:
                stream = c.stream(prompt, cfg)
                await stream.__anext__()
                await stream.aclose()  # cancels the call: the session ends on every stage

            await abandon()
            await _wait_no_sessions(stages, 120)
            await asyncio.sleep(2)
            before = rss_mb(n)
            for _ in range(10):
                await asyncio.wait_for(asyncio.gather(*[abandon() for _ in range(20)]), 300)
            await _wait_no_sessions(stages, 120)
            await asyncio.sleep(2)
            after = rss_mb(n)
    finally:
        n.down()
        n.remove_temp_dirs()
    print(f"RSS (MB) after one abandoned session: {before}; after 200: {after}")
    for name in ("stage0", "stage1"):
        assert after[name] - before[name] < 150, (name, before[name], after[name])
