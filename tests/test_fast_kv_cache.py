"""TreeKVCache on hand-made tensors: every key is a number saying (layer, round, node), so what the cache
returns to attention and what it commits can be read off element by element."""

from __future__ import annotations

import pytest
import torch

from dsd_node.engine.kv_cache import CacheError, TreeKVCache

LAYERS = 2


def kv(layer: int, round_id: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [1, heads=2, n, dim=3] whose every element for node i is layer*1000 + round*10 + i; values are -keys."""
    ids = torch.tensor([layer * 1000 + round_id * 10 + i for i in range(n)], dtype=torch.float32)
    k = ids.view(1, 1, n, 1).expand(1, 2, n, 3).clone()
    return k, -k


def labels(k: torch.Tensor) -> list[int]:
    """The node labels along the sequence axis (checking every head and dim carries the same label)."""
    assert torch.equal(k, k[:, :1, :, :1].expand_as(k))
    return [int(x) for x in k[0, 0, :, 0].tolist()]


def run(cache: TreeKVCache, round_id: int, base: list[tuple[int, list[int]]], n: int) -> tuple[int, list[list[int]]]:
    """One round through every layer; returns the context length and, per layer, the keys attention sees."""
    ctx = cache.begin(round_id, base, n)
    seen = []
    for layer in range(LAYERS):
        k, v = cache.update(*kv(layer, round_id, n), layer)
        assert torch.equal(v, -k) and k.shape[2] == ctx + n
        seen.append(labels(k))
    return ctx, seen


def committed(cache: TreeKVCache) -> list[list[int]]:
    out = []
    for layer in range(LAYERS):
        k, v = cache.committed[layer]
        assert torch.equal(v, -k)
        out.append(labels(k))
    return out


def prompt_cache(n: int = 3) -> TreeKVCache:
    cache = TreeKVCache()
    assert run(cache, 0, [], n) == (0, [list(range(n)), [1000 + i for i in range(n)]])
    cache.commit(0, list(range(n)))
    return cache


def test_prompt_then_tree_commit_keeps_the_accepted_nodes_in_order():
    cache = prompt_cache()
    assert cache.committed_len == 3 and not cache.segments and committed(cache)[0] == [0, 1, 2]
    ctx, seen = run(cache, 1, [], 5)  # a tree of 5 nodes sees the committed prefix, then itself
    assert ctx == 3 and seen[0] == [0, 1, 2, 10, 11, 12, 13, 14] and seen[1][:3] == [1000, 1001, 1002]
    cache.commit(1, [0, 2, 4])  # a non-contiguous accepted path
    assert committed(cache) == [[0, 1, 2, 10, 12, 14], [1000, 1001, 1002, 1010, 1012, 1014]]
    assert cache.committed_len == 6 and cache.segments == {} and cache.segment_len == {}


def test_rounds_in_flight_see_the_assumed_paths_of_their_base():
    cache = prompt_cache()
    assert run(cache, 1, [], 4)[1][0] == [0, 1, 2, 10, 11, 12, 13]
    ctx, seen = run(cache, 2, [(1, [0, 1, 3])], 2)
    assert ctx == 6 and seen[0] == [0, 1, 2, 10, 11, 13, 20, 21]
    ctx, seen = run(cache, 3, [(1, [0, 1, 3]), (2, [1])], 3)
    assert ctx == 7 and seen[0] == [0, 1, 2, 10, 11, 13, 21, 30, 31, 32]
    assert seen[1] == [1000, 1001, 1002, 1010, 1011, 1013, 1021, 1030, 1031, 1032]
    # round 1's verdict accepts the assumed path: commit it; rounds 2 and 3 build on it and stay
    cache.commit(1, [0, 1, 3])
    assert cache.retain({2, 3}) == [] and set(cache.segments) == {2, 3}
    cache.commit(2, [1])
    assert cache.retain({3}) == []
    assert committed(cache)[0] == [0, 1, 2, 10, 11, 13, 21] and cache.committed_len == 7
    # round 3 ran on exactly what is now committed: its own keys follow on
    cache.commit(3, [0, 2])
    assert committed(cache)[1] == [1000, 1001, 1002, 1010, 1011, 1013, 1021, 1030, 1032]


def test_rollback_drops_rounds_built_on_a_rejected_path():
    cache = prompt_cache()
    run(cache, 1, [], 4)
    run(cache, 2, [(1, [0, 1, 3])], 2)
    run(cache, 3, [(1, [0, 1, 3]), (2, [0, 1])], 2)
    before = cache.nbytes()
    cache.commit(1, [0, 2])  # the verdict took another branch: rounds 2 and 3 are wasted
    assert cache.retain(set()) == [2, 3] and cache.segments == {} and cache.segment_len == {}
    assert cache.nbytes() < before
    ctx, seen = run(cache, 4, [], 2)  # the next round sees only the committed prefix
    assert ctx == 5 and seen[0] == [0, 1, 2, 10, 12, 40, 41]
    cache.commit(4, [0])
    assert committed(cache) == [[0, 1, 2, 10, 12, 40], [1000, 1001, 1002, 1010, 1012, 1040]]
    with pytest.raises(CacheError, match="does not hold"):
        cache.begin(5, [(2, [0])], 1)  # a dropped round cannot be built on


def test_nbytes_counts_committed_and_tentative_tensors():
    cache = prompt_cache()
    per_node = 2 * LAYERS * 2 * 3 * 4  # (k, v) x layers x heads x dim x float32
    assert cache.nbytes() == 3 * per_node
    run(cache, 1, [], 4)
    assert cache.nbytes() == 7 * per_node


def test_protocol_errors_leave_the_cache_untouched():
    cache = prompt_cache()
    run(cache, 1, [], 4)
    with pytest.raises(CacheError, match="does not hold"):
        cache.begin(2, [(7, [0])], 1)
    with pytest.raises(CacheError, match="outside round 1"):
        cache.begin(2, [(1, [0, 4])], 1)
    with pytest.raises(CacheError, match="no such round"):
        cache.commit(9, [0])
    with pytest.raises(CacheError, match="keeps node 4 of 4"):
        cache.commit(1, [0, 4])
    assert set(cache.segments) == {1} and cache.segment_len == {1: 4} and cache.committed_len == 3
    cache.commit(1, [3])
    assert committed(cache)[0] == [0, 1, 2, 13]


def test_one_node_rounds_commit_the_joined_pass_and_match_the_general_path():
    """ar's rounds (one node, no base) commit the keys their own pass joined; the result is the same prefix the
    index_select path builds, also when a round with a base or a dropped round comes in between."""
    fast = TreeKVCache()
    run(fast, 0, [], 3)
    fast.commit(0, [0, 1, 2])
    for rid in range(1, 4):
        run(fast, rid, [], 1)
        fast.commit(rid, [0])
    assert committed(fast)[0] == [0, 1, 2, 10, 20, 30]
    joined = fast.committed[0][0]
    run(fast, 4, [], 1)
    fast.commit(4, [0])
    assert fast.committed[0][0].shape[2] == 7 and committed(fast)[1] == [1000, 1001, 1002, 1010, 1020, 1030, 1040]
    assert fast.committed[0][0] is not joined
    run(fast, 5, [], 1)  # a one-node round, then a round built on it (dsi): the joined pass no longer applies
    run(fast, 6, [(5, [0])], 2)
    fast.commit(5, [0])
    fast.commit(6, [1])
    assert committed(fast)[0] == [0, 1, 2, 10, 20, 30, 40, 50, 61]
    run(fast, 7, [], 1)  # dropped, then a new round commits normally
    assert fast.retain(set()) == [7] and fast._joined is None
    run(fast, 8, [], 1)
    fast.commit(8, [0])
    assert committed(fast)[0] == [0, 1, 2, 10, 20, 30, 40, 50, 61, 80]
    assert fast.committed_len == 10
