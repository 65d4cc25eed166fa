from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class SparseDist(_message.Message):
    __slots__ = ("ids", "probs")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    probs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., probs: _Optional[_Iterable[float]] = ...) -> None: ...

class DraftTree(_message.Message):
    __slots__ = ("tokens", "parents", "n_given", "draft_dists")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    N_GIVEN_FIELD_NUMBER: _ClassVar[int]
    DRAFT_DISTS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    n_given: int
    draft_dists: _containers.RepeatedCompositeFieldContainer[SparseDist]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., n_given: _Optional[int] = ..., draft_dists: _Optional[_Iterable[_Union[SparseDist, _Mapping]]] = ...) -> None: ...

class Commit(_message.Message):
    __slots__ = ("round_id", "keep")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    keep: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, round_id: _Optional[int] = ..., keep: _Optional[_Iterable[int]] = ...) -> None: ...

class BaseRef(_message.Message):
    __slots__ = ("round_id", "path")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    path: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, round_id: _Optional[int] = ..., path: _Optional[_Iterable[int]] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("rule", "temperature", "top_p", "seed", "adaptive_margin", "adaptive_tie_margin")
    class Rule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        GREEDY: _ClassVar[Sampling.Rule]
        SAMPLE: _ClassVar[Sampling.Rule]
        ADAPTIVE: _ClassVar[Sampling.Rule]
    GREEDY: Sampling.Rule
    SAMPLE: Sampling.Rule
    ADAPTIVE: Sampling.Rule
    RULE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_MARGIN_FIELD_NUMBER: _ClassVar[int]
    ADAPTIVE_TIE_MARGIN_FIELD_NUMBER: _ClassVar[int]
    rule: Sampling.Rule
    temperature: float
    top_p: float
    seed: int
    adaptive_margin: float
    adaptive_tie_margin: float
    def __init__(self, rule: _Optional[_Union[Sampling.Rule, str]] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., adaptive_margin: _Optional[float] = ..., adaptive_tie_margin: _Optional[float] = ...) -> None: ...

class TreeShape(_message.Message):
    __slots__ = ("branch", "branch_depth", "max_nodes")
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    BRANCH_DEPTH_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    branch: int
    branch_depth: int
    max_nodes: int
    def __init__(self, branch: _Optional[int] = ..., branch_depth: _Optional[int] = ..., max_nodes: _Optional[int] = ...) -> None: ...

class Hop(_message.Message):
    __slots__ = ("address", "layer_start", "layer_end", "peer_id", "record")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    address: str
    layer_start: int
    layer_end: int
    peer_id: str
    record: bytes
    def __init__(self, address: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., peer_id: _Optional[str] = ..., record: _Optional[bytes] = ...) -> None: ...

class SessionSetup(_message.Message):
    __slots__ = ("route", "hop", "reply_to", "reply_record", "sampling")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    HOP_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    REPLY_RECORD_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    route: _containers.RepeatedCompositeFieldContainer[Hop]
    hop: int
    reply_to: str
    reply_record: bytes
    sampling: Sampling
    def __init__(self, route: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ..., hop: _Optional[int] = ..., reply_to: _Optional[str] = ..., reply_record: _Optional[bytes] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ...) -> None: ...

class Round(_message.Message):
    __slots__ = ("session_id", "round_id", "epoch", "commits", "base", "tree", "hidden", "setup")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    COMMITS_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    SETUP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round_id: int
    epoch: int
    commits: _containers.RepeatedCompositeFieldContainer[Commit]
    base: _containers.RepeatedCompositeFieldContainer[BaseRef]
    tree: DraftTree
    hidden: Tensor
    setup: SessionSetup
    def __init__(self, session_id: _Optional[str] = ..., round_id: _Optional[int] = ..., epoch: _Optional[int] = ..., commits: _Optional[_Iterable[_Union[Commit, _Mapping]]] = ..., base: _Optional[_Iterable[_Union[BaseRef, _Mapping]]] = ..., tree: _Optional[_Union[DraftTree, _Mapping]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., setup: _Optional[_Union[SessionSetup, _Mapping]] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: int
    def __init__(self, round_id: _Optional[int] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("session_id", "round_id", "epoch", "stale", "accepted", "tokens", "verify_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round_id: int
    epoch: int
    stale: bool
    accepted: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    verify_ms: float
    def __init__(self, session_id: _Optional[str] = ..., round_id: _Optional[int] = ..., epoch: _Optional[int] = ..., stale: _Optional[bool] = ..., accepted: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[int]] = ..., verify_ms: _Optional[float] = ...) -> None: ...

class VerdictAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionRef(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class EndSessionReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DraftRequest(_message.Message):
    __slots__ = ("session_id", "context", "depth", "tree", "sampling")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    context: _containers.RepeatedScalarFieldContainer[int]
    depth: int
    tree: TreeShape
    sampling: Sampling
    def __init__(self, session_id: _Optional[str] = ..., context: _Optional[_Iterable[int]] = ..., depth: _Optional[int] = ..., tree: _Optional[_Union[TreeShape, _Mapping]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ...) -> None: ...

class DraftReply(_message.Message):
    __slots__ = ("tree", "main_path", "draft_ms")
    TREE_FIELD_NUMBER: _ClassVar[int]
    MAIN_PATH_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MS_FIELD_NUMBER: _ClassVar[int]
    tree: DraftTree
    main_path: _containers.RepeatedScalarFieldContainer[int]
    draft_ms: float
    def __init__(self, tree: _Optional[_Union[DraftTree, _Mapping]] = ..., main_path: _Optional[_Iterable[int]] = ..., draft_ms: _Optional[float] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("role", "model", "model_hash", "layer_start", "layer_end", "num_layers", "version", "sessions", "max_sessions", "peer_id", "address", "tokens_per_s", "dtype", "route", "excluded", "banned")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    BANNED_FIELD_NUMBER: _ClassVar[int]
    role: str
    model: str
    model_hash: str
    layer_start: int
    layer_end: int
    num_layers: int
    version: str
    sessions: int
    max_sessions: int
    peer_id: str
    address: str
    tokens_per_s: float
    dtype: str
    route: _containers.RepeatedCompositeFieldContainer[Hop]
    excluded: _containers.RepeatedCompositeFieldContainer[ExcludedPeer]
    banned: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, role: _Optional[str] = ..., model: _Optional[str] = ..., model_hash: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., num_layers: _Optional[int] = ..., version: _Optional[str] = ..., sessions: _Optional[int] = ..., max_sessions: _Optional[int] = ..., peer_id: _Optional[str] = ..., address: _Optional[str] = ..., tokens_per_s: _Optional[float] = ..., dtype: _Optional[str] = ..., route: _Optional[_Iterable[_Union[Hop, _Mapping]]] = ..., excluded: _Optional[_Iterable[_Union[ExcludedPeer, _Mapping]]] = ..., banned: _Optional[_Iterable[str]] = ...) -> None: ...

class ExcludedPeer(_message.Message):
    __slots__ = ("address", "reason", "remaining_s", "failures")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REMAINING_S_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    address: str
    reason: str
    remaining_s: float
    failures: int
    def __init__(self, address: _Optional[str] = ..., reason: _Optional[str] = ..., remaining_s: _Optional[float] = ..., failures: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "prompt_tokens", "mode", "max_new_tokens", "draft_k", "sampling", "max_inflight", "ignore_eos", "tree", "min_valid_prob")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    MIN_VALID_PROB_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    mode: str
    max_new_tokens: int
    draft_k: int
    sampling: Sampling
    max_inflight: int
    ignore_eos: bool
    tree: TreeShape
    min_valid_prob: float
    def __init__(self, prompt: _Optional[str] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., mode: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., draft_k: _Optional[int] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., max_inflight: _Optional[int] = ..., ignore_eos: _Optional[bool] = ..., tree: _Optional[_Union[TreeShape, _Mapping]] = ..., min_valid_prob: _Optional[float] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("rounds", "rounds_wasted", "accepted_per_round", "tokens_per_s", "ms_per_token", "new_tokens", "inflight", "mode", "draft_ms", "wall_ms", "failovers", "drafter_failures", "fallback_rounds")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_WASTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MS_FIELD_NUMBER: _ClassVar[int]
    WALL_MS_FIELD_NUMBER: _ClassVar[int]
    FAILOVERS_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_FAILURES_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: int
    rounds_wasted: int
    accepted_per_round: _containers.RepeatedScalarFieldContainer[int]
    tokens_per_s: float
    ms_per_token: float
    new_tokens: int
    inflight: _containers.RepeatedScalarFieldContainer[int]
    mode: str
    draft_ms: float
    wall_ms: float
    failovers: int
    drafter_failures: int
    fallback_rounds: int
    def __init__(self, rounds: _Optional[int] = ..., rounds_wasted: _Optional[int] = ..., accepted_per_round: _Optional[_Iterable[int]] = ..., tokens_per_s: _Optional[float] = ..., ms_per_token: _Optional[float] = ..., new_tokens: _Optional[int] = ..., inflight: _Optional[_Iterable[int]] = ..., mode: _Optional[str] = ..., draft_ms: _Optional[float] = ..., wall_ms: _Optional[float] = ..., failovers: _Optional[int] = ..., drafter_failures: _Optional[int] = ..., fallback_rounds: _Optional[int] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("tokens", "text", "stats")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    text: str
    stats: Stats
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ...) -> None: ...
