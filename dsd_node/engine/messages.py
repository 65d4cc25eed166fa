"""The messages of the pipeline, as Python types (dsd_node.net.wire converts them to and from protobuf)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsd_node.engine.tree import TokenTree
from dsd_node.engine.verify import SamplingParams


@dataclass
class Hop:
    address: str
    layer_start: int
    layer_end: int
    peer_id: str = ""  # the stage's libp2p peer id: its TLS identity is checked against it ("" with --insecure)
    record: bytes = field(default=b"", compare=False, repr=False)  # its signed discovery record (see Dialable)


@dataclass
class RoundMsg:
    session_id: str
    round_id: int
    epoch: int
    commits: list[tuple[int, list[int]]] = field(default_factory=list)
    base: list[tuple[int, list[int]]] = field(default_factory=list)
    tree: TokenTree = field(default_factory=lambda: TokenTree([], []))
    sampling: SamplingParams = field(default_factory=SamplingParams)
    hidden: torch.Tensor | None = None
    route: list[Hop] = field(default_factory=list)
    hop: int = 0
    reply_to: str = ""
    reply_record: bytes = b""  # the head's signed discovery record for reply_to (see Dialable)


@dataclass
class VerdictMsg:
    session_id: str
    round_id: int
    epoch: int
    stale: bool
    accepted: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    verify_ms: float = 0.0
