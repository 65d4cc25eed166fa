"""Peer discovery over a libp2p Kademlia DHT, with an asyncio-facing API.

The libp2p host and DHT run in a trio thread of their own (:class:`dsd_node.p2p.trio_peer.TrioPeer`, which
:class:`Discovery` extends); asyncio callers reach them through ``_call``.

Storage layout (all peers run the DHT in server mode and register the ``/dsd/`` validator):

* ``record_key(model, peer)`` = ``/dsd/<sha256(model, peer)[:40 hex]>`` -> the signed record (DHT value,
  replicated on the k closest peers; a newer ``signed_at`` replaces an older one).
* provider records under ``model_key(model_id)`` (a sha2-256 multihash) list the peers that
  announced the model, so readers can enumerate every record key.

``find`` unions the local and network provider sets, asks each provider for its record (falling
back to the replicas when it does not answer), keeps the newest correctly signed one per peer and
drops it if it is expired or for another model hash. A withdrawn record is replaced by an
already-expired "tombstone". Provider records cannot be deleted (py-libp2p keeps them 48 h), so
peers whose last record expired are afterwards only asked directly, which fails fast when dead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence

import trio
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.id import ID
from libp2p.records.validator import Validator

from dsd_node.p2p.identity import Identity
from dsd_node.p2p.records import NodeRecord, RecordError, decode_signed, sign_record, verify_record
from dsd_node.p2p.trio_peer import DiscoveryError, TrioPeer, parse_listen_multiaddr, quiet_libp2p_logging

__all__ = [
    "NAMESPACE", "Discovery", "DiscoveryError", "RecordValidator", "model_key", "parse_listen_multiaddr",
    "quiet_libp2p_logging", "record_key",
]

log = logging.getLogger(__name__)

NAMESPACE = "dsd"


def _model_digest(model_id: str) -> str:
    return hashlib.sha256(b"dsd/model/" + model_id.encode()).hexdigest()


def model_key(model_id: str) -> str:
    """Provider key for ``model_id``: a hex sha2-256 multihash (what ``KadDHT.provide`` expects)."""
    return "1220" + _model_digest(model_id)


def record_key(model_id: str, peer_id: str) -> str:
    """DHT value key holding ``peer_id``'s record for ``model_id``.

    A 45-byte digest: py-libp2p servers ignore FIND_NODE lookups for keys over 50 bytes that
    are not multihashes, so ``/dsd/<model>/<peer id>`` spelled out would not route.
    """
    digest = hashlib.sha256(f"dsd/record/{model_id}\0{peer_id}".encode()).hexdigest()[:40]
    return f"/{NAMESPACE}/{digest}"


class RecordValidator(Validator):
    """DHT validator for ``/dsd/`` keys: only correctly signed records under their own key; newest wins.

    Expiry is not checked here so that withdrawal tombstones (already expired) can replace live
    records; readers check expiry.
    """

    def __init__(self, swarm_key: bytes | None = None):
        self.swarm_key = swarm_key  # a private swarm's members store no record without its proof

    def validate(self, key: str, value: bytes) -> None:
        rec, _ = decode_signed(value, self.swarm_key)
        if record_key(rec.model_id, rec.peer_id) != key:
            raise RecordError(f"record of {rec.peer_id} for {rec.model_id!r} stored under foreign key {key}")

    def select(self, key: str, values: list[bytes]) -> int:
        def signed_at(v: bytes) -> float:
            try:
                self.validate(key, v)
                return decode_signed(v)[1]
            except Exception:
                return float("-inf")

        return max(range(len(values)), key=lambda i: signed_at(values[i]))


class Discovery(TrioPeer):
    """A libp2p peer (host + Kademlia DHT) that announces and finds signed node records.

    With no ``bootstrap`` peers it acts as a bootstrap peer: others dial it first; it stores and
    serves DHT values and provider records but announces nothing itself. Start, stop and the
    bootstrap policy are :class:`TrioPeer`'s.
    """

    def __init__(
        self,
        identity: Identity,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        bootstrap: Sequence[str] = (),
        *,
        connect_timeout_s: float = 10.0,
        query_timeout_s: float = 5.0,
        maintain_interval_s: float = 5.0,
        provide_interval_s: float = 30.0,
        require_bootstrap: bool = True,
        swarm_key: bytes | None = None,
    ) -> None:
        super().__init__(identity, listen_host, listen_port, bootstrap, connect_timeout_s=connect_timeout_s,
                         query_timeout_s=query_timeout_s, maintain_interval_s=maintain_interval_s,
                         require_bootstrap=require_bootstrap)
        self.provide_interval_s = provide_interval_s
        self.swarm_key = swarm_key  # private swarm: records without its proof are neither stored nor used
        self.invalid_seen = 0  # records dropped by find() as invalid (garbage, forged, expired, ...)
        self.signed: dict[tuple[str, str], bytes] = {}  # (model, peer id) -> the signed blob find() last accepted
        self._announced: dict[str, NodeRecord] = {}
        self._expired: set[str] = set()  # providers whose newest record was expired at the last find()
        self._provided_at: dict[str, float] = {}

    def _configure_dht(self, dht: KadDHT) -> None:
        dht.register_validator(NAMESPACE, RecordValidator(self.swarm_key))

    def sign(self, record: NodeRecord) -> bytes:
        """`record` signed by this peer (with the swarm's proof in a private swarm), as announce() publishes it."""
        return sign_record(record, self.identity, swarm_key=self.swarm_key)

    async def announce(self, record: NodeRecord) -> None:
        """Sign ``record`` and publish it (DHT value + provider record for its model)."""
        blob = self.sign(record)
        now = time.time()
        provide = now - self._provided_at.get(record.model_id, 0.0) >= self.provide_interval_s
        await self._call(self._t_publish, record.model_id, blob, provide)
        self._announced[record.model_id] = record
        if provide:
            self._provided_at[record.model_id] = now

    async def _t_publish(self, model_id: str, blob: bytes, provide: bool) -> None:
        assert self._dht is not None
        with trio.move_on_after(self.query_timeout_s) as scope:
            await self._dht.put_value(record_key(model_id, self.peer_id), blob)
        if scope.cancelled_caught:
            log.warning("storing the record of %s on the DHT timed out (kept locally)", model_id)
        if provide:
            with trio.move_on_after(self.query_timeout_s):
                await self._dht.provide(model_key(model_id))

    async def withdraw(self) -> None:
        """Replace every announced record with an expired tombstone and stop providing its model."""
        for model_id, rec in list(self._announced.items()):
            tomb = dataclasses.replace(rec, expires_at=time.time(), sessions=0)
            await self._call(self._t_withdraw, model_id, sign_record(tomb, self.identity, swarm_key=self.swarm_key))
        self._announced.clear()
        self._provided_at.clear()

    async def _t_withdraw(self, model_id: str, blob: bytes) -> None:
        assert self._dht is not None
        mkey = bytes.fromhex(model_key(model_id))
        self._dht.provider_store.providing_keys.discard(mkey)
        self._dht.provider_store.providers.get(mkey, {}).pop(self.peer_id, None)
        with trio.move_on_after(self.query_timeout_s):
            await self._dht.put_value(record_key(model_id, self.peer_id), blob)

    async def find(self, model_id: str, *, expected_model_hash: str | None = None) -> list[NodeRecord]:
        """Every live, correctly signed record for ``model_id`` (sorted by layer_start, peer_id).

        Invalid, forged, expired or mismatched records are dropped with a debug log.
        """
        blobs = await self._call(self._t_fetch, model_id)
        now = time.time()
        out: list[NodeRecord] = []
        for pid, candidates in blobs.items():
            best: tuple[float, bytes] | None = None
            for blob in candidates:
                try:
                    rec, signed_at = decode_signed(blob, self.swarm_key)
                    if rec.peer_id != pid or rec.model_id != model_id:
                        raise RecordError(f"record of {rec.peer_id} for {rec.model_id!r} under key of {pid}")
                except RecordError as exc:
                    self.invalid_seen += 1
                    log.debug("dropping invalid record under %s: %s", pid, exc)
                    continue
                if best is None or signed_at > best[0]:
                    best = (signed_at, blob)
            if best is None:
                continue
            try:
                out.append(verify_record(best[1], now=now, expected_model_hash=expected_model_hash,
                                         swarm_key=self.swarm_key))
                self.signed[(model_id, pid)] = best[1]
                self._expired.discard(pid)
            except RecordError as exc:
                log.debug("dropping record of %s: %s", pid, exc)
                if decode_signed(best[1])[0].expires_at <= now:
                    self._expired.add(pid)
        return sorted(out, key=lambda r: (r.layer_start, r.peer_id))

    async def _t_fetch(self, model_id: str) -> dict[str, list[bytes]]:
        """All candidate record blobs per provider of ``model_id`` (local + every replica)."""
        assert self._dht is not None
        dht = self._dht
        t_start = trio.current_time()
        mkey = bytes.fromhex(model_key(model_id))
        providers = {str(p.peer_id): p.peer_id for p in dht.provider_store.get_providers(mkey)}
        if model_id in self._announced:
            providers[self.peer_id] = self._host_id()

        async def providers_from(peer: ID) -> None:
            with trio.move_on_after(self.query_timeout_s):
                found, _ = await dht.provider_store._get_providers_from_peer_with_closers(peer, mkey)
                for p in found or []:
                    providers[str(p.peer_id)] = p.peer_id
                    if p.addrs:
                        dht.host.get_peerstore().add_addrs(p.peer_id, p.addrs, 600)

        asked: set[ID] = {self._host_id()}

        def ask_providers(nursery: trio.Nursery, peers: Iterable[ID]) -> None:
            for peer in set(peers) - asked:
                asked.add(peer)
                nursery.start_soon(providers_from, peer)

        async def network_lookup(nursery: trio.Nursery) -> None:
            # a lookup that a dead or frozen peer slows past the timeout finds nothing: the routing table's
            # peers, asked meanwhile, still count (as do the local providers)
            with trio.move_on_after(self.query_timeout_s):
                ask_providers(nursery, await dht.peer_routing.find_closest_peers_network(mkey))

        async with trio.open_nursery() as nursery:
            ask_providers(nursery, dht.routing_table.find_local_closest_peers(mkey, 20))
            nursery.start_soon(network_lookup, nursery)

        blobs: dict[str, list[bytes]] = {pid: [] for pid in providers}

        async def values_from(pid: str, peer: ID, key: bytes) -> None:
            with trio.move_on_after(self.query_timeout_s):
                value = await dht.value_store._get_from_peer(peer, key)
                if isinstance(value, bytes) and value:
                    blobs[pid].append(value)

        async def gather(pid: str) -> None:
            # The provider itself holds its newest record; replicas (routing-table neighbours of the
            # key, then a full iterative lookup) are asked only when it does not answer.
            key = record_key(model_id, pid).encode()
            local = dht.value_store.get(key)
            if local is not None and local.value:
                blobs[pid].append(local.value)
            asked = {self._host_id()}

            async def ask(peers: Iterable[ID]) -> bool:
                todo = set(peers) - asked
                asked.update(todo)
                before = len(blobs[pid])
                async with trio.open_nursery() as nursery:
                    for peer in todo:
                        nursery.start_soon(values_from, pid, peer, key)
                return len(blobs[pid]) > before

            if pid == self.peer_id or await ask([providers[pid]]) or pid in self._expired:
                return
            if await ask(dht.routing_table.find_local_closest_peers(key, 8)):
                return
            with trio.move_on_after(self.query_timeout_s):
                await ask(await dht.peer_routing.find_closest_peers_network(key))

        t_providers = trio.current_time()
        async with trio.open_nursery() as nursery:
            for pid in providers:
                nursery.start_soon(gather, pid)
        log.debug(
            "find %r: %d providers in %.0f ms, their records in %.0f ms", model_id, len(providers),
            (t_providers - t_start) * 1000, (trio.current_time() - t_providers) * 1000,
        )  # fmt: skip
        return blobs

    async def run_announcer(self, get_record: Callable[[], NodeRecord], interval_s: float) -> None:
        """Announce ``get_record()`` every ``interval_s`` until cancelled (errors are logged, retried).

        Records should expire a few intervals after they are made, so a live node is always
        visible while a dead one vanishes within about its record's lifetime.
        """
        while True:
            delay = interval_s
            try:
                rec = get_record()
                if rec.expires_at - time.time() <= interval_s:
                    log.warning(
                        "record of %s expires before the next refresh (interval %.1f s)", rec.peer_id, interval_s
                    )
                await self.announce(rec)
            except Exception as exc:
                log.warning("announce failed (%r); retrying", exc)
                delay = min(interval_s, 1.0)
            await asyncio.sleep(delay)

    async def connected_peers(self) -> list[str]:
        """Peer ids this node currently has connections to."""

        async def get() -> list[str]:
            assert self._host is not None
            return [str(p) for p in self._host.get_connected_peers()]

        return await self._call(get)
