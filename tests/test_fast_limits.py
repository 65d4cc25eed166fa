"""Admission limits, input validation and the gateway's slot queue, without processes or models."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from dsd_node.daemon.config import ConfigError, NodeConfig
from dsd_node.engine.config import GenerationConfig, TreeShape
from dsd_node.engine.limits import MAX_INFLIGHT, LimitError, Limits, draft_nodes
from dsd_node.engine.memory import MemoryReturner
from dsd_node.engine.tree import SparseDist, TokenTree, TreeError
from dsd_node.engine.verify import SamplingParams
from dsd_node.net.admission import Admission, Busy
from dsd_node.net.client import ClientError
from dsd_node.net.wire import (
    WireError,
    generate_request_to_pb,
    generation_config_from_pb,
    sampling_from_pb,
    tensor_from_pb,
)
from dsd_node.proto import dsd_pb2 as pb


def test_a_default_request_passes_and_each_limit_is_enforced_with_its_name():
    lim = Limits()
    lim.check_generation(100, GenerationConfig(mode="dsi", max_new_tokens=64), 2048)
    cases = {
        "context of 2048": (2000, GenerationConfig(max_new_tokens=100)),
        "branch 5000": (10, GenerationConfig(tree=TreeShape(branch=5000))),
        "max_nodes 100000": (10, GenerationConfig(tree=TreeShape(max_nodes=100000))),
        "max_inflight": (10, GenerationConfig(mode="dsi", max_inflight=MAX_INFLIGHT + 1)),
        "draft depth 65": (10, GenerationConfig(draft_k=64)),  # a round drafts one level past draft_k
        "nodes, over": (10, GenerationConfig(draft_k=40, tree=TreeShape(branch=16, branch_depth=40))),
    }
    for words, (n_prompt, cfg) in cases.items():
        with pytest.raises(LimitError, match=words):
            lim.check_generation(n_prompt, cfg, 2048)
    # ar rounds carry no draft: the tree shape does not matter; a lower max_context caps the model's
    Limits().check_generation(10, GenerationConfig(mode="ar", tree=TreeShape(branch=5000)), 2048)
    with pytest.raises(LimitError, match="this gateway's limit of 512"):
        Limits(max_context=512).check_generation(500, GenerationConfig(max_new_tokens=20), 2048)


def test_round_limits_bound_every_allocation_before_it_happens():
    lim = Limits(max_tree_nodes=256)
    lim.check_round(n_given=1000, n_nodes=1005, ctx_len=0, model_positions=2048)  # a prompt round
    lim.check_round(n_given=0, n_nodes=256, ctx_len=1500, model_positions=2048)
    with pytest.raises(LimitError, match="257 draft tree nodes"):
        lim.check_round(n_given=0, n_nodes=257, ctx_len=0, model_positions=2048)
    with pytest.raises(LimitError, match="35000 draft tree nodes"):  # the 142 KB message that asked for 4.9 GB
        lim.check_round(n_given=0, n_nodes=35000, ctx_len=0, model_positions=None)
    with pytest.raises(LimitError, match="context of 2048"):
        lim.check_round(n_given=3000, n_nodes=3000, ctx_len=0, model_positions=2048)
    lim.check_round(n_given=0, n_nodes=10, ctx_len=2040, model_positions=2048)  # siblings share positions
    lim.check_depth(ctx_len=2040, depth=9, model_positions=2048)  # speculation may reach past the end by a draft
    with pytest.raises(LimitError, match="past the context of 2048"):
        lim.check_depth(ctx_len=2040, depth=80, model_positions=2048)


def test_draft_nodes_counts_what_the_drafter_builds():
    assert draft_nodes(4, TreeShape()) == 5
    assert draft_nodes(4, TreeShape(branch=3, branch_depth=10)) == 4 + 12
    assert draft_nodes(4, TreeShape(branch=3, branch_depth=2, max_nodes=6)) == 6


def test_limits_and_node_flags_refuse_nonsense():
    for bad in ({"max_branch": -1}, {"session_ttl_s": 0}, {"session_ttl_s": math.nan}, {"max_tree_nodes": 1}):
        with pytest.raises(ValueError):
            Limits(**bad)
    cfg = NodeConfig.resolve({"max_tree_nodes": 64, "session_ttl": 5.0, "queue_timeout": 2.0, "max_sessions": 3}, {})
    assert cfg.limits() == Limits(max_tree_nodes=64, session_ttl_s=5.0, queue_timeout_s=2.0, max_sessions=3)
    assert NodeConfig().limits().session_ttl_s == 30  # short by default (was 300 s)
    with pytest.raises(ConfigError, match="session_ttl"):
        NodeConfig.resolve({"session_ttl": 0.0}, {})
    with pytest.raises(ConfigError, match="DSD_MAX_BRANCH"):
        NodeConfig.resolve({}, {"DSD_MAX_BRANCH": "many"})


def test_wire_refuses_nan_and_negative_sampling_and_out_of_bounds_tensors():
    for s in (
        pb.Sampling(rule=1, temperature=math.nan),
        pb.Sampling(rule=1, temperature=-1),
        pb.Sampling(temperature=math.inf),
        pb.Sampling(top_p=1.5),
        pb.Sampling(top_p=math.nan),
        pb.Sampling(adaptive_margin=-0.1),
    ):
        with pytest.raises(WireError):
            sampling_from_pb(s)
    assert sampling_from_pb(pb.Sampling()).temperature == 1.0  # unset: the defaults
    with pytest.raises(ValueError):
        SamplingParams.create(temperature=math.nan)
    with pytest.raises(WireError, match="out of bounds"):
        tensor_from_pb(pb.Tensor(dtype="float32", shape=[2**40, 2**40, 0]))
    with pytest.raises(WireError, match="out of bounds"):
        tensor_from_pb(pb.Tensor(dtype="float32", shape=[1] * 9))
    assert tuple(tensor_from_pb(pb.Tensor(dtype="float32", shape=[3, 0])).shape) == (3, 0)


def test_min_valid_prob_travels_with_a_request_and_nonsense_is_refused():
    for v in (0.0, 0.2, 1.0):  # 0 means "whenever allowed", so it must survive the wire
        cfg = generation_config_from_pb(generate_request_to_pb("x", GenerationConfig(mode="dsi", min_valid_prob=v)))
        assert cfg.min_valid_prob == pytest.approx(v)
    assert generation_config_from_pb(pb.GenerateRequest(prompt="x")).min_valid_prob == GenerationConfig.min_valid_prob
    for v in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="min_valid_prob"):
            generation_config_from_pb(pb.GenerateRequest(prompt="x", min_valid_prob=v))


def test_draft_distributions_must_name_tokens_of_the_vocabulary():
    def tree(ids, probs):
        return TokenTree([5, 6], [-1, 0], 1, [None, SparseDist(ids, probs)])

    tree([7], [1.0]).validate(100)
    for ids, probs in (([99999], [1.0]), ([-5], [1.0]), ([7], [math.nan]), ([7], [-0.5]), ([7, 8], [1.0])):
        with pytest.raises(TreeError):
            tree(ids, probs).validate(100)


async def test_admission_queues_in_order_and_refuses_past_the_queue_or_its_deadline():
    adm = Admission(slots=2, queue_size=2, queue_timeout_s=5.0)
    order: list[str] = []
    release = asyncio.Event()

    async def job(name: str) -> None:
        async with adm.slot("c"):
            order.append(name)
            await release.wait()

    tasks = [asyncio.create_task(job(n)) for n in "abcd"]
    await asyncio.sleep(0.05)
    assert order == ["a", "b"] and adm.queued == 2
    with pytest.raises(Busy, match="2 queued"):  # the queue is full: refused at once
        async with adm.slot("c"):
            pass
    release.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == ["a", "b", "c", "d"] and adm.running == 0 and not adm.clients

    short = Admission(slots=1, queue_size=4, queue_timeout_s=0.05)
    async with short.slot("x"):
        with pytest.raises(Busy, match="queue deadline of 0.05 s"):
            async with short.slot("y"):
                pass
    assert short.running == 0 and short.queued == 0


async def test_a_cancelled_waiter_does_not_leak_its_slot_and_quotas_count_per_client():
    adm = Admission(slots=1, queue_size=4, queue_timeout_s=5.0, per_client=2)
    hold = asyncio.Event()

    async def job(client: str) -> None:
        async with adm.slot(client):
            await hold.wait()

    first = asyncio.create_task(job("a"))
    waiter = asyncio.create_task(job("a"))
    await asyncio.sleep(0.02)
    with pytest.raises(Busy, match="quota 2"):
        async with adm.slot("a"):
            pass
    waiter.cancel()
    await asyncio.sleep(0.02)
    hold.set()
    await first
    assert adm.running == 0 and not adm.waiters and not adm.clients
    async with adm.slot("b"):  # free again
        assert adm.running == 1


def test_overload_is_not_reported_as_a_gateway_that_is_down():
    busy = ClientError(grpc.StatusCode.RESOURCE_EXHAUSTED, "gateway is full: retry later", "127.0.0.1:6000")
    assert "is the gateway running" not in str(busy) and "RESOURCE_EXHAUSTED" in str(busy)
    no_route = ClientError(grpc.StatusCode.UNAVAILABLE, "no route left: no stage hosts layers 5-7", "127.0.0.1:6000")
    assert "is the gateway running" not in str(no_route)
    down = ClientError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses", "127.0.0.1:6000")
    assert "is the gateway running" in str(down)


async def test_memory_is_trimmed_after_sessions_end_at_most_once_per_interval():
    m = MemoryReturner(min_interval_s=0.1)
    if m._trim is None:
        pytest.skip("not glibc: nothing to trim")
    m.freed()
    m.freed()  # within the interval: one later trim is scheduled, not a second one now
    assert m.trims == 1
    await asyncio.sleep(0.2)
    assert m.trims == 2


def test_node_config_takes_flags_then_environment_then_file_then_defaults(tmp_path) -> None:
    f = tmp_path / "node.yaml"
    f.write_text("max-sessions: 7\nmax_branch: 5\nsession_ttl: 12\nlayers: '0:4'\n")
    cfg = NodeConfig.resolve({"max_sessions": 3, "max_branch": None}, {"DSD_MAX_BRANCH": "9", "DSD_SESSION_TTL": "8"},
                             str(f))
    assert (cfg.max_sessions, cfg.max_branch, cfg.session_ttl, cfg.layers) == (3, 9, 8.0, "0:4")
    assert NodeConfig.resolve({}, {}, None).max_sessions == NodeConfig().max_sessions
    (tmp_path / "bad.yaml").write_text("no_such_key: 1\n")
    with pytest.raises(ConfigError, match="unknown keys in .*bad.yaml: no_such_key"):
        NodeConfig.resolve({}, {}, str(tmp_path / "bad.yaml"))
