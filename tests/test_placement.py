"""Memory-aware placement (``--layers auto``): memory estimates, span choice, record fields. Fast and pure."""

from __future__ import annotations

import dataclasses
import itertools
import time

import msgpack
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
)

from dsd_node.engine.models import load_shard, resolve_model_path
from dsd_node.p2p.identity import Identity
from dsd_node.p2p.peers import make_record
from dsd_node.p2p.placement import (
    MIB,
    PlacementError,
    choose_span,
    coverage,
    dtype_bytes,
    edge_bytes,
    kv_bytes_per_token,
    layer_bytes,
    layers_that_fit,
    plan_span,
    span_bytes,
    span_fits,
)
from dsd_node.p2p.records import DOMAIN, RecordError, sign_record, verify_record
from dsd_node.p2p.routing import build_route

TINY = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
            vocab_size=500)  # fmt: skip


@pytest.fixture(scope="module")
def target_config():
    return AutoConfig.from_pretrained(resolve_model_path("embedded:target"))


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    dec = model.get_decoder()
    return dec.layers if hasattr(dec, "layers") else dec.h


# -- memory estimates ------------------------------------------------------------------------------------------------


def test_layer_bytes_embedded_target(target_config) -> None:
    model = AutoModelForCausalLM.from_config(target_config)
    real_layer = _params(_layers(model)[0])
    est = layer_bytes(target_config, 4)
    assert abs(est / 4 - real_layer) <= 0.03 * real_layer
    # the whole model: 8 layers + embeddings (tied: the head is the embedding matrix, counted once)
    est_total = 8 * layer_bytes(target_config, 1) + edge_bytes(target_config, 1, first=True, last=True)
    assert abs(est_total - _params(model)) <= 0.03 * _params(model)
    assert layer_bytes(target_config, 2) * 2 == layer_bytes(target_config, 4)


@pytest.mark.parametrize(
    "config",
    [
        LlamaConfig(**TINY),
        LlamaConfig(**TINY, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
        Qwen2Config(**TINY, tie_word_embeddings=False),
        Qwen3Config(**TINY, head_dim=32),
        MixtralConfig(**{**TINY, "intermediate_size": 96}, num_local_experts=4),
        Qwen2MoeConfig(**TINY, moe_intermediate_size=48, shared_expert_intermediate_size=96, num_experts=4),
        GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=500, n_positions=128, bos_token_id=0, eos_token_id=0),
        GPT2Config(n_embd=64, n_inner=100, n_layer=3, n_head=4, vocab_size=500, n_positions=128, bos_token_id=0,
                   eos_token_id=0),
    ],
    ids=["llama", "llama-bias-tied", "qwen2-untied", "qwen3", "mixtral", "qwen2moe", "gpt2", "gpt2-n_inner"],
)
def test_layer_and_edge_bytes_match_real_models(config) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    real_layer = _params(_layers(model)[0])
    assert abs(layer_bytes(config, 1) - real_layer) <= 0.03 * real_layer
    total = _params(model)  # tied weights counted once
    est = 3 * layer_bytes(config, 1) + edge_bytes(config, 1, first=True, last=True)
    assert abs(est - total) <= 0.03 * total
    # a dict config (config.json as read) gives the same estimate
    assert layer_bytes(config.to_dict(), 2) == layer_bytes(config, 2)
    if config.tie_word_embeddings:  # the last stage alone still materializes the head
        assert edge_bytes(config, 1, True, True) < edge_bytes(config, 1, True, False) + edge_bytes(config, 1, False, True)


@pytest.mark.parametrize("span", [(0, 2), (3, 5), (6, 8), (0, 8)])
def test_span_bytes_equals_a_loaded_shard(target_config, span: tuple[int, int]) -> None:
    shard = load_shard("embedded:target", *span, dtype="float32", device="cpu")
    mods = [shard.layers, shard.embed, shard.pos_embed, shard.norm, shard.head]
    tensors = {p.data_ptr(): p for m in mods if m is not None for p in m.parameters()}  # tied: one tensor
    real = sum(p.numel() * p.element_size() for p in tensors.values())
    assert span_bytes(target_config, 4, *span) == real


def test_dtype_bytes() -> None:
    assert dtype_bytes("bfloat16") == dtype_bytes("fp16") == dtype_bytes(torch.float16) == 2
    assert dtype_bytes("float32") == dtype_bytes(torch.float32) == dtype_bytes(4) == 4
    with pytest.raises(PlacementError, match="auto"):
        dtype_bytes("auto")


def test_layers_that_fit(target_config) -> None:
    lb = layer_bytes(target_config, 2)
    emb = edge_bytes(target_config, 2, True, False)
    head = edge_bytes(target_config, 2, False, True)
    assert head == emb + 256 * 2  # tied: the last stage holds the embedding matrix as its head, plus the norm
    # interior count: layer weights only
    assert layers_that_fit(target_config, 2, 3 * lb, ends=False) == 3
    assert layers_that_fit(target_config, 2, 3 * lb - 1, ends=False) == 2
    # conservative count: a 3-layer span at either end must fit too
    assert layers_that_fit(target_config, 2, 3 * lb + head) == 3
    assert layers_that_fit(target_config, 2, 3 * lb + head - 1) == 2
    assert span_fits(target_config, 2, 3 * lb + emb, 0, 3) and not span_fits(target_config, 2, 3 * lb + emb, 5, 8)
    # the whole model: embeddings and head counted once (tied)
    assert layers_that_fit(target_config, 2, 8 * lb + head) == 8
    assert layers_that_fit(target_config, 2, 10**12) == 8
    # the KV reserve and per-layer KV come first
    assert layers_that_fit(target_config, 2, 3 * lb + head + 1000, kv_reserve_bytes=1000) == 3
    assert layers_that_fit(target_config, 2, 3 * lb + head + 999, kv_reserve_bytes=1000) == 2
    kv = kv_bytes_per_token(target_config, 2)
    assert kv == 2 * 2 * 64 * 2  # keys + values, 2 KV heads of 64
    assert layers_that_fit(target_config, 2, 3 * (lb + 100 * kv), kv_tokens=100, ends=False) == 3
    assert layers_that_fit(target_config, 2, lb - 1) == 0


# -- span choice -----------------------------------------------------------------------------------------------------


def test_choose_span_closes_gaps_first() -> None:
    # coverage of an 8-layer model: layers 2 and 5-6 hosted by nobody
    recs = [(0, 2), (0, 2), (3, 5), (7, 8)]
    assert coverage(recs, 8) == [2, 2, 0, 1, 1, 0, 0, 1]
    assert choose_span(recs, 8, 1) == (2, 3)  # lowest gap first
    assert choose_span(recs, 8, 2) == (5, 7)  # the span closing the most uncovered layers
    assert choose_span(recs, 8, 4) == (2, 6)  # closes 2 uncovered layers, as (3,7) and (4,8) do: lowest start
    assert choose_span([(0, 2), (3, 8)], 8, 3) == (0, 3)  # a one-layer gap: aligned to its end, from the start
    assert choose_span(recs, 8, 6) == (2, 8)  # both gaps at once, from a boundary ((1,7) would start inside (0,2))
    assert choose_span([], 8, 3) == (0, 3)  # empty network: from layer 0
    assert choose_span([(0, 3)], 8, 2) == (3, 5)


def test_choose_span_least_covered_when_no_gap() -> None:
    recs = [(0, 4), (4, 8), (0, 2), (6, 8), (5, 8)]
    assert coverage(recs, 8) == [2, 2, 1, 1, 1, 2, 3, 3]
    assert choose_span(recs, 8, 2) == (2, 4)  # sum 2, lowest start among (2,4) and (3,5)
    assert choose_span(recs, 8, 3) == (2, 5)
    assert choose_span(recs, 8, 1) == (4, 5)  # the only 1-layer span that meets boundaries on both sides
    # a stage runs exactly its layers: a 3-layer node cannot chain beside one 8-layer span
    with pytest.raises(PlacementError, match="meets the announced spans' boundaries"):
        choose_span([(0, 8)], 8, 3)
    assert choose_span([(0, 8), (0, 4), (4, 8)], 8, 4) == (0, 4)  # a replica of an existing span: lowest start


def test_choose_span_capacity_beyond_end_and_zero() -> None:
    assert choose_span([], 8, 20) == (0, 8)
    assert choose_span([(0, 8)], 8, 8) == (0, 8)
    assert choose_span([(0, 6)], 8, 5) == (6, 8)  # a gap at the end: the span shrinks to it, never off a boundary
    with pytest.raises(PlacementError, match="not enough memory for a single layer"):
        choose_span([], 8, 0)


def test_choose_span_deterministic_and_salt_breaks_only_ties() -> None:
    recs = [(2, 4)]
    first = choose_span(recs, 8, 2, salt="12D3KooWabc")
    assert all(choose_span(list(recs), 8, 2, salt="12D3KooWabc") == first for _ in range(5))
    # gaps [0, 2) and [4, 8): candidates closing 2 uncovered layers are (0,2), (4,6), (6,8)
    picks = {choose_span(recs, 8, 2, salt=f"peer-{i}") for i in range(40)}
    assert picks == {(0, 2), (4, 6), (6, 8)}
    # a unique best span is chosen whatever the salt
    assert {choose_span([(0, 5)], 8, 3, salt=f"peer-{i}") for i in range(20)} == {(5, 8)}
    assert {choose_span([(0, 8), (0, 2), (4, 8)], 8, 2, salt=f"peer-{i}") for i in range(20)} == {(2, 4)}
    # nodes starting at once in an empty network spread over both ends of the gap
    assert {choose_span([], 8, 4, salt=f"peer-{i}") for i in range(40)} == {(0, 4), (4, 8)}


def test_choose_span_skips_what_does_not_fit() -> None:
    def no_ends(a: int, b: int) -> bool:
        return a > 0 and b < 8

    assert choose_span([], 8, 3, fits=no_ends) == (1, 4)
    with pytest.raises(PlacementError, match="no span of at most 2 layers"):
        choose_span([(0, 8)], 8, 2, fits=no_ends)  # nothing between 1 and 7 meets a boundary of (0, 8)
    assert choose_span([(0, 8)], 8, 8) == (0, 8)


def _node(ident: Identity, span: tuple[int, int], mem_mb: int = 0):
    return make_record(ident.peer_id, "stage", "embedded:target", "h", span[0], span[1], 8, "127.0.0.1:1", 1.0, 0, 4,
                       60.0, device="cpu", dtype="float32", mem_free_mb=mem_mb)


@pytest.mark.parametrize("order", list(itertools.permutations([3, 2, 4, 1])))
@pytest.mark.parametrize("salted", [False, True])
def test_sequential_heterogeneous_nodes_cover_every_layer(order: tuple[int, ...], salted: bool) -> None:
    records = []
    for cap in order:  # each node chooses after seeing the records of those before it
        ident = Identity.generate()
        try:
            span = choose_span(records, 8, cap, salt=ident.peer_id if salted else "")
        except PlacementError:  # only a node with nothing left it could chain into may refuse
            assert min(coverage(records, 8)) >= 1
            continue
        assert 1 <= span[1] - span[0] <= cap
        records.append(_node(ident, span))
    assert min(coverage(records, 8)) >= 1
    build_route(records, 8)  # and the spans chain: a route exists (RouteError otherwise)
    if order == (3, 2, 4, 1) and not salted:
        assert [(r.layer_start, r.layer_end) for r in records] == [(0, 3), (3, 5), (5, 8)]


def test_plan_span_sizes_by_memory(target_config) -> None:
    lb = layer_bytes(target_config, 4)
    head = edge_bytes(target_config, 4, False, True)
    reserve = 64 * 1024
    records = []
    for n_layers in (3, 2, 4):  # budgets that hold n layers and the embeddings/head beside them
        budget = n_layers * lb + head + reserve
        span = plan_span(records, target_config, 4, budget, kv_reserve_bytes=reserve)
        assert span_fits(target_config, 4, budget, *span, kv_reserve_bytes=reserve)
        ident = Identity.generate()
        records.append(_node(ident, span, budget // MIB))
    assert [(r.layer_start, r.layer_end) for r in records] == [(0, 3), (3, 5), (5, 8)]  # the third node shrinks to the gap
    assert min(coverage(records, 8)) == 1
    build_route(records, 8)
    # memory for 3 layers but not the embeddings beside them: layer 0 is still closed, with fewer layers
    assert plan_span([], target_config, 4, 3 * lb + reserve, kv_reserve_bytes=reserve) == (0, 2)
    # a one-layer node has no span that would chain beside them, and says so
    with pytest.raises(PlacementError, match="meets the announced spans' boundaries"):
        plan_span(records, target_config, 4, lb + head + reserve, kv_reserve_bytes=reserve)
    # a node in a covered network replicates the least covered span that fits it
    assert plan_span([(0, 8), (0, 4), (4, 8), (4, 8)], target_config, 4, 4 * lb + head) == (0, 4)
    # records for other roles or another model depth are ignored
    drafter = dataclasses.replace(records[0], role="drafter", layer_start=0, layer_end=8)
    assert coverage([drafter, (0, 12)], 8) == [1] * 8


def test_node_with_too_little_memory_refuses(target_config) -> None:
    lb = layer_bytes(target_config, 4)
    with pytest.raises(PlacementError, match=r"not enough memory for a single layer: \d+ MB free, one layer needs \d+ MB"):
        plan_span([], target_config, 4, lb - 1)
    with pytest.raises(PlacementError, match="KV reserve"):
        plan_span([], target_config, 4, lb + 10, kv_reserve_bytes=100)
    big = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=32, vocab_size=128256)  # Llama-3.1-8B shape
    assert layer_bytes(big, 2) == 218_112_000 * 2  # parameters per layer of Llama-3.1-8B, in bf16 (416 MiB)
    with pytest.raises(PlacementError, match=r"200 MB free, one layer needs 416 MB") as exc:
        plan_span([], big, 2, 200 * MIB)
    assert isinstance(exc.value, ValueError)
    # a single-layer model whose one span holds the embeddings too
    one = LlamaConfig(**{**TINY, "num_hidden_layers": 1})
    with pytest.raises(PlacementError, match="embeddings or LM head"):
        plan_span([], one, 4, layer_bytes(one, 4) + 10)


# -- record fields -------------------------------------------------------------------------------------------------


def test_record_memory_fields_signed_and_old_records_decode() -> None:
    ident = Identity.generate()
    rec = _node(ident, (0, 3), 24576)
    assert (rec.device, rec.dtype, rec.mem_free_mb) == ("cpu", "float32", 24576)
    assert verify_record(sign_record(rec, ident)) == rec
    # a record from a node that predates the fields: signed payload without them decodes with defaults
    fields = {k: v for k, v in dataclasses.asdict(rec).items() if k not in ("device", "dtype", "mem_free_mb")}
    payload = msgpack.packb({**fields, "signed_at": time.time()}, use_bin_type=True)
    blob = msgpack.packb({"v": 1, "payload": payload, "pk": ident.public_key_bytes, "sig": ident.sign(DOMAIN + payload)})
    old = verify_record(blob)
    assert (old.device, old.dtype, old.mem_free_mb) == ("", "", 0)
    assert old.layer_end == 3
    # old callers of make_record still work
    plain = make_record(ident.peer_id, "stage", "m", "h", 0, 8, 8, "127.0.0.1:1", 1.0, 0, 4, 60.0)
    assert plain.mem_free_mb == 0 and verify_record(sign_record(plain, ident)) == plain
    with pytest.raises(RecordError, match="mem_free_mb"):
        sign_record(dataclasses.replace(rec, mem_free_mb=-1), ident)
    with pytest.raises(RecordError, match="device"):
        sign_record(dataclasses.replace(rec, device=3), ident)  # type: ignore[arg-type]
