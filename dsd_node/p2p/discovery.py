"""Peer discovery over a libp2p Kademlia DHT, with an asyncio-facing API.

py-libp2p is trio-based, so each :class:`Discovery` runs its libp2p host and DHT in a dedicated
thread under ``trio.run``; asyncio callers reach it through :meth:`Discovery._call`, which
schedules a trio task and resolves an asyncio future from it.

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
import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.records.validator import Validator
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.address_validation import expand_wildcard_address
from multiaddr import Multiaddr

from dsd_node.p2p.identity import Identity
from dsd_node.p2p.records import NodeRecord, RecordError, decode_signed, sign_record, verify_record

log = logging.getLogger(__name__)

NAMESPACE = "dsd"
T = TypeVar("T")


def quiet_libp2p_logging(level: int = logging.ERROR) -> None:
    """Send py-libp2p's logs through the application's logging at ``level`` and above.

    py-libp2p detaches its ``libp2p`` logger (no handler, no propagation) unless ``LIBP2P_DEBUG``
    is set, so its many routine warnings (e.g. "Failed to read DHT message from stream" after each
    fire-and-forget ADD_PROVIDER) reach stderr through logging's last-resort handler. Called by
    :meth:`Discovery.start` unless ``LIBP2P_DEBUG`` is set.
    """
    logging.getLogger("libp2p").setLevel(level)
    logging.getLogger("libp2p").propagate = True
    logging.getLogger("libp2p.network.auto_connector").setLevel(level)  # forced to INFO by py-libp2p


def parse_listen_multiaddr(addr: str) -> tuple[str, int]:
    """``/ip4/0.0.0.0/tcp/4001`` -> ``("0.0.0.0", 4001)`` (for ``--listen-p2p``)."""
    ma = Multiaddr(addr)
    try:
        return ma.value_for_protocol("ip4"), int(ma.value_for_protocol("tcp"))
    except Exception as exc:
        raise ValueError(f"expected /ip4/<host>/tcp/<port>, got {addr!r}") from exc


class DiscoveryError(RuntimeError):
    """Discovery could not start (e.g. no bootstrap peer reachable) or is not running."""


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

    def validate(self, key: str, value: bytes) -> None:
        rec, _ = decode_signed(value)
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


class Discovery:
    """A libp2p peer (host + Kademlia DHT) that announces and finds signed node records.

    With no ``bootstrap`` peers it acts as a bootstrap peer: others dial it first; it stores and
    serves DHT values and provider records but announces nothing itself.

    Bootstrap policy: :meth:`start` retries the bootstrap peers until ``connect_timeout_s``; if
    none is reachable by then it raises :class:`DiscoveryError`. Once running, a background loop
    re-dials disconnected bootstrap peers every ``maintain_interval_s`` (logging at warning when
    the node has no connections at all).
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
    ) -> None:
        self.identity = identity
        self.listen_multiaddr = Multiaddr(f"/ip4/{listen_host}/tcp/{listen_port}")
        self.bootstrap = [str(a) for a in bootstrap]
        self._bootstrap_infos = [info_from_p2p_addr(Multiaddr(a)) for a in self.bootstrap]  # validate early
        self.connect_timeout_s = connect_timeout_s
        self.query_timeout_s = query_timeout_s
        self.maintain_interval_s = maintain_interval_s
        self.provide_interval_s = provide_interval_s
        self.invalid_seen = 0  # records dropped by find() as invalid (garbage, forged, expired, ...)
        self._listen_addrs: list[str] = []
        self._announced: dict[str, NodeRecord] = {}
        self._expired: set[str] = set()  # providers whose newest record was expired at the last find()
        self._provided_at: dict[str, float] = {}
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop_event: trio.Event | None = None
        self._host: IHost | None = None
        self._dht: KadDHT | None = None

    # ----------------------------------------------------------------- lifecycle

    @property
    def peer_id(self) -> str:
        """This node's base58 peer id."""
        return self.identity.peer_id

    @property
    def listen_addrs(self) -> list[str]:
        """Full multiaddrs (with ``/p2p/<peer id>``) this node listens on; empty before start()."""
        return list(self._listen_addrs)

    async def start(self) -> None:
        """Start libp2p in its own trio thread, dial the bootstrap peers, return when ready."""
        if self._thread is not None:
            raise DiscoveryError("Discovery already started")
        if not os.environ.get("LIBP2P_DEBUG"):
            quiet_libp2p_logging()
        ready: concurrent.futures.Future[list[str]] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name=f"libp2p-{self.peer_id[-6:]}", daemon=True
        )
        self._thread.start()
        try:
            self._listen_addrs = await asyncio.wrap_future(ready)
        except BaseException:
            await asyncio.to_thread(self._thread.join, 5.0)
            self._thread = self._token = self._nursery = self._stop_event = None
            raise
        log.info("libp2p peer %s listening on %s", self.peer_id, ", ".join(self._listen_addrs))

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Shut the libp2p thread down (idempotent); warns if it does not exit in ``timeout_s``."""
        thread, token, event = self._thread, self._token, self._stop_event
        if thread is None:
            return
        if token is not None and event is not None:
            try:
                token.run_sync_soon(event.set)
            except trio.RunFinishedError:
                pass
        await asyncio.to_thread(thread.join, timeout_s)
        if thread.is_alive():
            log.warning("libp2p thread of %s did not exit within %.1f s", self.peer_id, timeout_s)
        self._thread = self._token = self._nursery = self._stop_event = None
        self._host = self._dht = None

    def _thread_main(self, ready: concurrent.futures.Future[list[str]]) -> None:
        try:
            trio.run(self._trio_main, ready)
        except BaseException as exc:  # noqa: BLE001 - report start errors to start(), log the rest
            leaf = exc
            while len(getattr(leaf, "exceptions", ())) == 1:  # unwrap trio's single-error groups
                leaf = leaf.exceptions[0]  # type: ignore[attr-defined]
            if not ready.done():
                if not isinstance(leaf, DiscoveryError):
                    cause, leaf = leaf, DiscoveryError(f"libp2p failed to start on {self.listen_multiaddr}: {leaf!r}")
                    leaf.__cause__ = cause
                ready.set_exception(leaf)
            else:
                log.exception("libp2p thread of %s crashed", self.peer_id)

    async def _trio_main(self, ready: concurrent.futures.Future[list[str]]) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop_event = trio.Event()
        host = new_host(key_pair=self.identity.key_pair, listen_addrs=[self.listen_multiaddr])
        async with host.run(listen_addrs=[self.listen_multiaddr]):
            if not host.get_transport_addrs():  # py-libp2p logs a failed listen but carries on
                raise DiscoveryError(f"libp2p could not listen on {self.listen_multiaddr} (port in use?)")
            dht = KadDHT(host, DHTMode.SERVER)
            dht.register_validator(NAMESPACE, RecordValidator())
            # DHT service first, dial afterwards: an early inbound connect otherwise tears the swarm down.
            async with background_trio_service(dht), trio.open_nursery() as nursery:
                self._host, self._dht, self._nursery = host, dht, nursery
                if self._bootstrap_infos:
                    try:
                        await self._initial_dial()
                    except DiscoveryError as exc:  # raised here, not through trio's exception groups
                        ready.set_exception(exc)
                        return
                ready.set_result(self._dialable_addrs(host))
                nursery.start_soon(self._maintain)
                await self._stop_event.wait()
                nursery.cancel_scope.cancel()

    @staticmethod
    def _dialable_addrs(host: IHost) -> list[str]:
        """Listen addrs with /p2p/<id>; a 0.0.0.0 listener is expanded to the concrete interfaces."""
        suffix = f"/p2p/{host.get_id()}"
        out: list[str] = []
        for addr in map(str, host.get_transport_addrs()):
            expanded = (
                map(str, expand_wildcard_address(Multiaddr(addr))) if addr.startswith("/ip4/0.0.0.0/") else [addr]
            )
            out += [f"{a}{suffix}" for a in expanded if a.startswith("/ip4/")]
        return out or [f"{a}{suffix}" for a in host.get_transport_addrs()]

    @staticmethod
    async def _resolve(addrs: list[Multiaddr]) -> list[Multiaddr]:
        """Turn /dns4/<name>/... and /dns/<name>/... into /ip4/<address>/... (py-libp2p's TCP dial needs IPs)."""
        out = []
        for addr in addrs:
            parts = str(addr).split("/")  # ['', 'dns4', name, 'tcp', port, ...]
            if len(parts) > 2 and parts[1] in ("dns", "dns4"):
                ip = await trio.to_thread.run_sync(socket.gethostbyname, parts[2])
                addr = Multiaddr("/".join(["", "ip4", ip, *parts[3:]]))
            out.append(addr)
        return out

    async def _dial(self, info: PeerInfo) -> bool:
        assert self._host is not None and self._dht is not None
        try:
            with trio.fail_after(self.connect_timeout_s):
                addrs = await self._resolve(info.addrs)
                self._host.get_peerstore().add_addrs(info.peer_id, addrs, 3600)
                await self._host.connect(PeerInfo(info.peer_id, addrs))
            await self._dht.add_peer(info.peer_id, skip_server_mode_check=True)
            return True
        except Exception as exc:
            log.debug("dial %s failed: %r", info.peer_id, exc)
            return False

    async def _initial_dial(self) -> None:
        assert self._dht is not None
        deadline = trio.current_time() + self.connect_timeout_s
        while True:
            ok = [await self._dial(i) for i in self._bootstrap_infos]
            if any(ok):
                break
            if trio.current_time() >= deadline:
                raise DiscoveryError(
                    f"no bootstrap peer reachable within {self.connect_timeout_s:.0f} s: {', '.join(self.bootstrap)}"
                )
            log.info("waiting for bootstrap peers %s", self.bootstrap)
            await trio.sleep(0.5)
        for info, good in zip(self._bootstrap_infos, ok, strict=True):
            if not good:
                log.warning("bootstrap peer %s unreachable; will keep retrying", info.peer_id)
        with trio.move_on_after(self.query_timeout_s):  # self-lookup fills the routing table
            await self._dht.peer_routing.find_closest_peers_network(self._host_id().to_bytes())

    async def _maintain(self) -> None:
        assert self._host is not None
        while True:
            await trio.sleep(self.maintain_interval_s)
            connected = set(self._host.get_connected_peers())
            for info in self._bootstrap_infos:
                if info.peer_id not in connected and not await self._dial(info):
                    log.debug("bootstrap peer %s still unreachable", info.peer_id)
            if self._bootstrap_infos and not self._host.get_connected_peers():
                log.warning("libp2p peer %s has no connections; retrying bootstrap %s", self.peer_id, self.bootstrap)

    def _host_id(self) -> ID:
        assert self._host is not None
        return self._host.get_id()

    async def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` in the libp2p trio thread and await its result from asyncio."""
        token, nursery = self._token, self._nursery
        if token is None or nursery is None:
            raise DiscoveryError("Discovery is not running (call start() first)")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        scope = trio.CancelScope()

        def post(setter: Callable[[Any], None], value: Any) -> None:
            def apply() -> None:
                if not fut.done():
                    setter(value)

            try:
                loop.call_soon_threadsafe(apply)
            except RuntimeError:  # asyncio loop already closed
                pass

        async def runner() -> None:
            try:
                with scope:
                    post(fut.set_result, await fn(*args))
            except Exception as exc:
                post(fut.set_exception, exc)
            finally:
                post(fut.set_exception, DiscoveryError("libp2p call cancelled (discovery stopping?)"))

        try:
            token.run_sync_soon(nursery.start_soon, runner)  # thread-safe, does not block the event loop
        except trio.RunFinishedError as exc:
            raise DiscoveryError("Discovery is not running") from exc
        try:
            return await fut
        except asyncio.CancelledError:
            try:
                token.run_sync_soon(scope.cancel)
            except trio.RunFinishedError:
                pass
            raise

    # ----------------------------------------------------------------- announce / find

    async def announce(self, record: NodeRecord) -> None:
        """Sign ``record`` and publish it (DHT value + provider record for its model)."""
        blob = sign_record(record, self.identity)
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
            await self._call(self._t_withdraw, model_id, sign_record(tomb, self.identity))
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
                    rec, signed_at = decode_signed(blob)
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
                out.append(verify_record(best[1], now=now, expected_model_hash=expected_model_hash))
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

        with trio.move_on_after(self.query_timeout_s):
            closest = await dht.peer_routing.find_closest_peers_network(mkey)
        async with trio.open_nursery() as nursery:
            for peer in closest:
                if peer != self._host_id():
                    nursery.start_soon(providers_from, peer)

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
