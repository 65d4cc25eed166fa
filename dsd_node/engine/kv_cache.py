"""The KV cache of one session on one shard: a committed prefix plus tentative segments.

Each round's tree nodes get a tentative segment. A verdict commits the accepted path of a round
(non-contiguous tree nodes, kept with index_select) onto the committed prefix; every other
segment that no round still builds on is dropped. Several rounds can be in flight: a round
attends to the committed prefix, then to the assumed-accepted path of each earlier round it
builds on (its base), then to its own tree.

Everything stays on the cache's device (the shard's): keys, values and the index tensors that select
accepted nodes.

The object implements the one method transformers' attention layers call on a cache:
`update(key, value, layer_idx, ...)`, returning the keys and values to attend to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KV = tuple[torch.Tensor, torch.Tensor]


class CacheError(ValueError):
    """A commit or base that does not match the cache's state (a protocol error by the sender)."""


@dataclass
class TreeKVCache:
    committed: dict[int, KV] = field(default_factory=dict)
    committed_len: int = 0
    segments: dict[int, dict[int, KV]] = field(default_factory=dict)  # round id -> layer -> (k, v)
    segment_len: dict[int, int] = field(default_factory=dict)
    device: torch.device | None = None  # where index tensors are made (None: the CPU)
    _round: int | None = None
    _base: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    # a one-node round on the committed prefix alone (ar's rounds): round id, committed length it saw, and per
    # layer the joined keys/values its update returned, which are exactly the committed prefix after its commit
    _joined: tuple[int, int, dict[int, KV]] | None = None

    def _index(self, nodes: list[int], like: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tensor(nodes, dtype=torch.long, device=like.device if like is not None else self.device)

    def begin(self, round_id: int, base: list[tuple[int, list[int]]], n_nodes: int) -> int:
        """Prepare to run round `round_id` on top of `base`; returns the context length it sees."""
        ctx = self.committed_len
        self._base = []
        for rid, path in base:
            if rid not in self.segments:
                raise CacheError(f"round {round_id} builds on round {rid}, which this shard does not hold")
            if path and max(path) >= self.segment_len[rid]:
                raise CacheError(f"base path {path} is outside round {rid}'s {self.segment_len[rid]} nodes")
            self._base.append((rid, self._index(path)))
            ctx += len(path)
        self._round = round_id
        self.segments[round_id] = {}
        self.segment_len[round_id] = n_nodes
        self._joined = (round_id, self.committed_len, {}) if n_nodes == 1 and not base else None
        return ctx

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs) -> KV:
        """Store this round's keys/values for one layer; return committed + base paths + this round's."""
        self.segments[self._round][layer_idx] = (key, value)
        ks, vs = [], []
        if layer_idx in self.committed:
            ks.append(self.committed[layer_idx][0])
            vs.append(self.committed[layer_idx][1])
        for rid, path in self._base:
            k, v = self.segments[rid][layer_idx]
            if path.device != k.device:
                path = path.to(k.device)
            ks.append(k.index_select(2, path))
            vs.append(v.index_select(2, path))
        ks.append(key)
        vs.append(value)
        out = (torch.cat(ks, dim=2), torch.cat(vs, dim=2)) if len(ks) > 1 else (key, value)
        if self._joined is not None and self._joined[0] == self._round:
            self._joined[2][layer_idx] = out
        return out

    def commit(self, round_id: int, keep: list[int]) -> None:
        """Append the kept nodes of `round_id` to the committed prefix and drop the rest of its segment."""
        if round_id not in self.segments:
            raise CacheError(f"cannot commit round {round_id}: this shard holds no such round")
        if keep and max(keep) >= self.segment_len[round_id]:
            raise CacheError(f"commit of round {round_id} keeps node {max(keep)} of {self.segment_len[round_id]}")
        joined, self._joined = self._joined, None
        if joined is not None and joined[0] == round_id and joined[1] == self.committed_len and keep == [0] \
                and joined[2].keys() == self.segments[round_id].keys():
            self.segments.pop(round_id)  # the joined keys/values of its pass are the new committed prefix
            self.committed.update(joined[2])
            del self.segment_len[round_id]
            self.committed_len += 1
            return
        idx = None
        for layer, (k, v) in self.segments.pop(round_id).items():
            if idx is None or idx.device != k.device:
                idx = self._index(keep, k)
            k, v = k.index_select(2, idx), v.index_select(2, idx)
            if layer in self.committed:
                ck, cv = self.committed[layer]
                k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
            self.committed[layer] = (k, v)
        del self.segment_len[round_id]
        self.committed_len += len(keep)

    def retain(self, round_ids: set[int]) -> list[int]:
        """Drop every tentative segment not in `round_ids` (rolled-back rounds); returns the dropped ids."""
        dropped = [rid for rid in self.segments if rid not in round_ids]
        if self._joined is not None and self._joined[0] in dropped:
            self._joined = None
        for rid in dropped:
            del self.segments[rid]
            del self.segment_len[rid]
        return dropped

    def nbytes(self) -> int:
        tensors = [t for kv in self.committed.values() for t in kv]
        tensors += [t for seg in self.segments.values() for kv in seg.values() for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors)
