"""Memory-aware placement: which block of layers a stage node started with ``--layers auto`` hosts.

Pure code (no networking, no device queries). Two questions:

1. How many layers fit in the memory a node has? :func:`layer_bytes` / :func:`edge_bytes` estimate
   parameter bytes from a Hugging Face config (Llama, Qwen2/3, Mistral, Mixtral-style MoE, GPT-2);
   :func:`span_fits` says whether a given span [a, b) fits a budget (counting the embeddings of a
   span that starts at layer 0 and the final norm + LM head of one that ends at the last layer,
   tied embeddings once) after a KV reserve; :func:`layers_that_fit` is the conservative count
   (every span of that length fits, wherever it lies).
2. Which layers? :func:`choose_span` picks, like Petals' servers, the span the network covers least:
   first a span that closes a gap (layers no stage hosts), else the span whose layers have the
   fewest replicas in total, ties to the lowest start. :func:`plan_span` combines both for a node.

Nodes that start at the same moment all see the same records and would all pick the same span. A
``salt`` (the node's peer id) breaks ties among equally good candidates with a stable hash
(rendezvous hashing), so simultaneous nodes spread over the gaps (both ends of each gap are
candidates); without a tie the salt changes nothing. Placement stays greedy: a node never moves
once placed, the head's route waits (``RouteFinder``) until the layers are all covered, and nodes
that come later fill the gaps that remain. Tests start nodes one by one, so placement there is
deterministic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

MIB = 1 << 20

_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4, "torch.float32": 4,
    "bfloat16": 2, "bf16": 2, "torch.bfloat16": 2,
    "float16": 2, "fp16": 2, "half": 2, "torch.float16": 2,
    "float64": 8, "fp64": 8, "double": 8,
    "int8": 1, "uint8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
}  # fmt: skip


class PlacementError(ValueError):
    """This node cannot host any span of the model (not enough memory), or the arguments make no sense."""


def dtype_bytes(dtype: object) -> int:
    """Bytes per parameter of a dtype: an int, a torch.dtype (its itemsize) or a name ("bfloat16", "fp16", ...)."""
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        return dtype
    size = getattr(dtype, "itemsize", None)
    if isinstance(size, int):
        return size
    try:
        return _DTYPE_BYTES[str(dtype).lower()]
    except KeyError:
        raise PlacementError(f"unknown dtype {dtype!r}: resolve 'auto' first (float32, bfloat16, float16)") from None


# -- reading a config -------------------------------------------------------------------------------


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _get(config: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` that the config (a transformers config or a plain dict) sets to non-None."""
    for name in names:
        v = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
        if v is not None:
            return v
    return default


def _is_gpt2(config: Any) -> bool:
    # GPT2Config maps hidden_size to n_embd, so a config object is told apart by its model_type; a plain dict by
    # its GPT-2 names
    return _get(config, "model_type") == "gpt2" or (_get(config, "n_embd") is not None
                                                   and _get(config, "hidden_size") is None)


def num_layers(config: Any) -> int:
    c = _text_config(config)
    n = _get(c, "num_hidden_layers", "n_layer")
    if not n:
        raise PlacementError(f"config of type {type(config).__name__} names no number of decoder layers")
    return int(n)


def _dims(c: Any) -> tuple[int, int, int, int, int]:
    """(hidden, intermediate, heads, kv heads, head dim) of a Llama-like config."""
    h = int(_get(c, "hidden_size", "n_embd", "d_model"))
    heads = int(_get(c, "num_attention_heads", "n_head"))
    kv = int(_get(c, "num_key_value_heads", default=heads))
    hd = int(_get(c, "head_dim", default=h // heads))
    inter = int(_get(c, "intermediate_size", "n_inner", "ffn_dim", default=4 * h))
    return h, inter, heads, kv, hd


def layer_params(config: Any) -> int:
    """Parameters of one decoder layer (the largest one, for MoE models with some dense layers)."""
    c = _text_config(config)
    if _is_gpt2(c):
        n = int(_get(c, "n_embd"))
        inner = int(_get(c, "n_inner", default=4 * n))
        # ln_1, ln_2 (weight + bias); c_attn (n -> 3n), attn c_proj (n -> n), c_fc (n -> inner), mlp c_proj (inner -> n)
        return 2 * 2 * n + (n * 3 * n + 3 * n) + (n * n + n) + (n * inner + inner) + (inner * n + n)
    h, inter, heads, kv, hd = _dims(c)
    model_type = str(_get(c, "model_type", default=""))
    q, k = heads * hd, kv * hd
    attn = h * q + 2 * h * k + q * h
    if _get(c, "attention_bias", default=False):
        attn += q + 2 * k + h
    elif model_type.startswith("qwen2"):  # Qwen2 has q/k/v biases without a config switch
        attn += q + 2 * k
    if model_type.startswith("qwen3"):  # per-head q/k RMSNorm
        attn += 2 * hd
    mlp_one = 3 * h * inter + ((2 * inter + h) if _get(c, "mlp_bias", default=False) else 0)
    experts = int(_get(c, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)
    if experts > 1:
        e_inter = int(_get(c, "moe_intermediate_size", default=inter))
        moe = experts * 3 * h * e_inter + h * experts  # experts + router
        shared = int(_get(c, "shared_expert_intermediate_size", default=0) or 0)
        if shared:
            moe += 3 * h * shared + h  # shared expert + its gate
        n_shared = int(_get(c, "n_shared_experts", default=0) or 0)
        if n_shared:
            moe += n_shared * 3 * h * e_inter
        mlp = max(mlp_one, moe)
    else:
        mlp = mlp_one
    return attn + mlp + 2 * h  # + input and post-attention RMSNorm


def layer_bytes(config: Any, dtype_bytes: int) -> int:
    """Parameter bytes of one decoder layer, estimated from a transformers config (or its dict)."""
    return layer_params(config) * dtype_bytes


def edge_params(config: Any, first: bool, last: bool) -> int:
    """Parameters outside the decoder layers that a span holds: token (and GPT-2 position) embeddings when it
    starts at layer 0, final norm + LM head when it ends at the last layer. With tied embeddings the head is the
    embedding matrix, counted once when the span holds both (the shard loader shares one tensor)."""
    c = _text_config(config)
    gpt2 = _is_gpt2(c)
    h = int(_get(c, "n_embd") if gpt2 else _get(c, "hidden_size", "n_embd", "d_model"))
    vocab = int(_get(c, "vocab_size"))
    tied = bool(_get(c, "tie_word_embeddings", default=False))  # unknown: count the head apart (conservative)
    total = 0
    if first:
        total += vocab * h
        if gpt2:
            total += int(_get(c, "n_positions", "max_position_embeddings", default=0)) * h
    if last:
        total += 2 * h if gpt2 else h  # final LayerNorm (weight + bias) / RMSNorm
        if not (tied and first):
            total += vocab * h
    return total


def edge_bytes(config: Any, dtype_bytes: int, first: bool, last: bool) -> int:
    """Bytes of the embeddings / final norm + LM head a span holds (see :func:`edge_params`)."""
    return edge_params(config, first, last) * dtype_bytes


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """KV cache bytes one token costs in one layer (keys + values of every KV head)."""
    c = _text_config(config)
    if _is_gpt2(c):
        return 2 * int(_get(c, "n_embd")) * dtype_bytes
    _, _, _, kv, hd = _dims(c)
    return 2 * kv * hd * dtype_bytes


# -- what fits --------------------------------------------------------------------------------------


def span_bytes(config: Any, dtype_bytes: int, start: int, end: int, *, kv_tokens: int = 0) -> int:
    """Bytes a shard of layers [start, end) needs: its layers, its edges, and ``kv_tokens`` cached tokens per layer."""
    n = num_layers(config)
    if not 0 <= start < end <= n:
        raise PlacementError(f"span [{start}, {end}) is not inside the model's {n} layers")
    per_layer = layer_bytes(config, dtype_bytes) + kv_tokens * kv_bytes_per_token(config, dtype_bytes)
    return (end - start) * per_layer + edge_bytes(config, dtype_bytes, start == 0, end == n)


def span_fits(config: Any, dtype_bytes: int, budget_bytes: int, start: int, end: int, *, kv_reserve_bytes: int = 0,
              kv_tokens: int = 0) -> bool:
    """Whether layers [start, end) fit in ``budget_bytes`` with ``kv_reserve_bytes`` set aside."""
    return span_bytes(config, dtype_bytes, start, end, kv_tokens=kv_tokens) + kv_reserve_bytes <= budget_bytes


def layers_that_fit(config: Any, dtype_bytes: int, budget_bytes: int, *, kv_reserve_bytes: int = 0,
                    kv_tokens: int = 0, ends: bool = True) -> int:
    """How many layers fit in ``budget_bytes`` after ``kv_reserve_bytes`` (and ``kv_tokens`` per layer).

    ends=True (conservative): the largest n such that *every* span of n layers fits, including the one that
    starts at layer 0 (embeddings) and the one that ends at the last layer (norm + LM head). ends=False: spans
    that touch neither end (layer weights only), an upper bound for where a span lies."""
    n_layers = num_layers(config)
    per_layer = layer_bytes(config, dtype_bytes) + kv_tokens * kv_bytes_per_token(config, dtype_bytes)
    room = budget_bytes - kv_reserve_bytes
    if room < per_layer:
        return 0
    best = min(n_layers, room // per_layer)
    if not ends:
        return int(best)
    while best > 0 and not (
        span_fits(config, dtype_bytes, budget_bytes, 0, best, kv_reserve_bytes=kv_reserve_bytes, kv_tokens=kv_tokens)
        and span_fits(config, dtype_bytes, budget_bytes, n_layers - best, n_layers, kv_reserve_bytes=kv_reserve_bytes,
                      kv_tokens=kv_tokens)
    ):
        best -= 1
    return int(best)


# -- which layers -----------------------------------------------------------------------------------


def coverage(records: Iterable[Any], num_layers: int) -> list[int]:
    """Replicas per layer: how many stage records host each layer of a ``num_layers``-layer model.

    A record is anything with ``layer_start`` / ``layer_end`` (a NodeRecord: other roles and records for a model of
    another depth are skipped) or a ``(start, end)`` pair. Ranges are clipped to the model."""
    cov = [0] * num_layers
    for r in records:
        if isinstance(r, tuple):
            a, b = r
        else:
            if getattr(r, "role", "stage") != "stage" or getattr(r, "num_layers", num_layers) != num_layers:
                continue
            a, b = r.layer_start, r.layer_end
        for i in range(max(0, a), min(num_layers, b)):
            cov[i] += 1
    return cov


def boundaries(records: Iterable[Any], num_layers: int) -> set[int]:
    """Layer indices where an announced span starts or ends (and both ends of the model)."""
    out = {0, num_layers}
    for r in records:
        a, b = r if isinstance(r, tuple) else (r.layer_start, r.layer_end)
        if isinstance(r, tuple) or (getattr(r, "role", "stage") == "stage"
                                    and getattr(r, "num_layers", num_layers) == num_layers):
            out |= {a, b}
    return out


def chains(a: int, b: int, cov: list[int], bounds: set[int]) -> bool:
    """Whether a stage hosting [a, b) can sit in a route: a stage runs exactly its own layers, so each end must
    meet an announced boundary, or face layers nobody hosts yet (a later node fills them up to this end)."""
    return (a in bounds or cov[a - 1] == 0) and (b in bounds or cov[b] == 0)


def _gaps(cov: list[int]) -> list[tuple[int, int]]:
    """Maximal runs [a, b) of layers with zero coverage."""
    gaps, i = [], 0
    while i < len(cov):
        if cov[i] == 0:
            j = i
            while j < len(cov) and cov[j] == 0:
                j += 1
            gaps.append((i, j))
            i = j
        else:
            i += 1
    return gaps


def _salted_pick(starts: list[int], salt: str) -> int:
    """One of ``starts``: the lowest without a salt, else the one whose hash with the salt is lowest (rendezvous)."""
    if not salt or len(starts) == 1:
        return min(starts)
    return min(starts, key=lambda s: (hashlib.sha256(f"{salt}\x00{s}".encode()).digest(), s))


def _gap_span(cov: list[int], cap: int, salt: str, ok: Callable[[int, int], bool],
              bounds: set[int]) -> tuple[int, int] | None:
    """Rule 1 of :func:`choose_span`: the best span of ``cap`` layers aligned to a gap, None if none fits."""
    n = len(cov)
    starts = sorted({min(max(s, 0), n - cap) for a, b in _gaps(cov) for s in (a, b - cap)})
    starts = [s for s in starts if ok(s, s + cap) and chains(s, s + cap, cov, bounds)]
    if not starts:
        return None
    uncovered = {s: sum(1 for c in cov[s:s + cap] if c == 0) for s in starts}
    most = max(uncovered.values())
    s = _salted_pick([s for s in starts if uncovered[s] == most], salt)
    return s, s + cap


def _check(num_layers: int, capacity: int) -> int:
    if num_layers <= 0:
        raise PlacementError(f"a model needs at least one layer, got num_layers={num_layers}")
    if capacity <= 0:
        raise PlacementError(f"not enough memory for a single layer (capacity {capacity} layers)")
    return min(capacity, num_layers)


def choose_span(records: Iterable[Any], num_layers: int, capacity: int, *, salt: str = "",
                fits: Callable[[int, int], bool] | None = None) -> tuple[int, int]:
    """The span [a, b) of at most ``capacity`` layers (all of them when capacity >= num_layers) that the network
    needs most.

    ``records`` are the stage records already announced for the model (exclude this node's own). Only spans that
    can join a route are candidates (:func:`chains`): a stage runs exactly its layers, so a span starting or ending
    inside another node's span, away from any boundary, would never chain. Rules, in order:

    1. If some layers have no replica: the longest span aligned to a gap (starting at a gap's first layer or
       ending at its last, moved inside the model when it would run past an end, so a gap is never split in two)
       that covers the most uncovered layers, ties to the lowest start.
    2. Else the longest span whose layers have the fewest replicas in total, ties to the lowest start.

    ``salt`` (the node's peer id) breaks a tie by a stable hash instead of the lowest start, so nodes that choose at
    the same moment spread out; a unique best span is chosen whatever the salt. ``fits(a, b)`` drops candidates
    that do not fit this node (e.g. a span holding the embeddings). Deterministic: same records, capacity and salt,
    same span. PlacementError when no span chains and fits.
    """
    cap = _check(num_layers, capacity)
    records = list(records)
    cov, bounds = coverage(records, num_layers), boundaries(records, num_layers)
    ok = fits or (lambda a, b: True)
    for c in range(cap, 0, -1):
        span = _gap_span(cov, c, salt, ok, bounds)
        if span is not None:
            return span
    for c in range(cap, 0, -1):
        starts = [s for s in range(num_layers - c + 1) if ok(s, s + c) and chains(s, s + c, cov, bounds)]
        if starts:
            load = {s: sum(cov[s:s + c]) for s in starts}
            s = _salted_pick([s for s in starts if load[s] == min(load.values())], salt)
            return s, s + c
    raise PlacementError(f"no span of at most {cap} layers fits this node and meets the announced spans' "
                         f"boundaries ({', '.join(map(str, sorted(bounds)))})")


def plan_span(records: Iterable[Any], config: Any, dtype_bytes: int, budget_bytes: int, *,
              kv_reserve_bytes: int = 0, kv_tokens: int = 0, salt: str = "",
              max_layers: int | None = None) -> tuple[int, int]:
    """The span a node with ``budget_bytes`` of free memory should host, given the stage records it sees.

    Starts from the most layers that fit away from the ends (``layers_that_fit(..., ends=False)``). While layers
    are uncovered, the node takes a gap-aligned span (rule 1 of :func:`choose_span`), shrunk until it fits: layer 0
    with the embeddings beside only a few layers beats a longer span that would split the gap. Otherwise (or when
    no gap-aligned span fits at all) the least covered span that fits, as long as possible. ``max_layers`` caps
    the span (an operator's choice). Raises :class:`PlacementError` with the numbers when not even one layer fits.
    """
    records = list(records)
    n = num_layers(config)
    per_layer = layer_bytes(config, dtype_bytes) + kv_tokens * kv_bytes_per_token(config, dtype_bytes)
    cap = layers_that_fit(config, dtype_bytes, budget_bytes, kv_reserve_bytes=kv_reserve_bytes, kv_tokens=kv_tokens,
                          ends=False)
    if max_layers is not None:
        cap = min(cap, max_layers)
    reserve = f" after a {kv_reserve_bytes / MIB:.0f} MB KV reserve" if kv_reserve_bytes else ""
    if cap <= 0:
        raise PlacementError(f"not enough memory for a single layer: {budget_bytes / MIB:.0f} MB free, one layer "
                             f"needs {per_layer / MIB:.0f} MB{reserve}")

    def fits(a: int, b: int) -> bool:
        return span_fits(config, dtype_bytes, budget_bytes, a, b, kv_reserve_bytes=kv_reserve_bytes,
                         kv_tokens=kv_tokens)

    try:
        return choose_span(records, n, cap, salt=salt, fits=fits)
    except PlacementError as e:
        if any(fits(a, a + 1) for a in range(n)):
            raise
        cause = e
    edges = max(edge_bytes(config, dtype_bytes, True, False), edge_bytes(config, dtype_bytes, False, True))
    raise PlacementError(f"not enough memory for any span of the model: {budget_bytes / MIB:.0f} MB free, one layer "
                         f"needs {per_layer / MIB:.0f} MB and every span touches the embeddings or LM head "
                         f"({edges / MIB:.0f} MB){reserve}") from cause
