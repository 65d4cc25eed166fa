"""A libp2p host and Kademlia DHT running under trio in a thread of its own, driven from asyncio.

py-libp2p is trio-based, so each :class:`TrioPeer` runs its libp2p host and DHT in a dedicated thread under
``trio.run``; asyncio callers reach it through :meth:`TrioPeer._call`, which schedules a trio task and resolves
an asyncio future from it. :class:`dsd_node.p2p.discovery.Discovery` builds its record store and lookups on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service
from libp2p.utils.address_validation import expand_wildcard_address
from multiaddr import Multiaddr

from dsd_node.p2p.identity import Identity

log = logging.getLogger("dsd_node.p2p.discovery")  # the logger these messages had before the split

T = TypeVar("T")


def quiet_libp2p_logging(level: int = logging.ERROR) -> None:
    """Send py-libp2p's logs through the application's logging at ``level`` and above.

    py-libp2p detaches its ``libp2p`` logger (no handler, no propagation) unless ``LIBP2P_DEBUG``
    is set, so its many routine warnings (e.g. "Failed to read DHT message from stream" after each
    fire-and-forget ADD_PROVIDER) reach stderr through logging's last-resort handler. Called by
    :meth:`TrioPeer.start` unless ``LIBP2P_DEBUG`` is set.
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


class TrioPeer:
    """A libp2p peer (host + Kademlia DHT in server mode) in its own trio thread, with an asyncio-facing lifecycle.

    Bootstrap policy: with ``require_bootstrap`` (a one-shot client such as ``dsd route``), :meth:`start`
    retries the bootstrap peers until ``connect_timeout_s`` and raises :class:`DiscoveryError` if none is
    reachable by then. Without it (a node daemon), :meth:`start` returns once listening and the peers are
    dialed in the background until one answers, with a warning every few seconds meanwhile: one dead
    bootstrap among several, or all of them down for a while, never stops a node. Once running, a
    background loop re-dials disconnected bootstrap peers every ``maintain_interval_s``; when the node has
    no connection at all it also re-dials every peer it has met (any known peer is an entry point). With
    no ``bootstrap`` peers it acts as a bootstrap peer.
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
        require_bootstrap: bool = True,
    ) -> None:
        self.identity = identity
        self.require_bootstrap = require_bootstrap
        self.listen_multiaddr = Multiaddr(f"/ip4/{listen_host}/tcp/{listen_port}")
        self.bootstrap = [str(a) for a in bootstrap]
        self._bootstrap_infos = [info_from_p2p_addr(Multiaddr(a)) for a in self.bootstrap]  # validate early
        self.connect_timeout_s = connect_timeout_s
        self.query_timeout_s = query_timeout_s
        self.maintain_interval_s = maintain_interval_s
        self._listen_addrs: list[str] = []
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop_event: trio.Event | None = None
        self._host: IHost | None = None
        self._dht: KadDHT | None = None

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
            self._configure_dht(dht)
            # DHT service first, dial afterwards: an early inbound connect otherwise tears the swarm down.
            async with background_trio_service(dht), trio.open_nursery() as nursery:
                self._host, self._dht, self._nursery = host, dht, nursery
                if self._bootstrap_infos and self.require_bootstrap:
                    try:
                        await self._initial_dial()
                    except DiscoveryError as exc:  # raised here, not through trio's exception groups
                        ready.set_exception(exc)
                        return
                elif self._bootstrap_infos:
                    nursery.start_soon(self._join_in_background)
                ready.set_result(self._dialable_addrs(host))
                nursery.start_soon(self._maintain)
                await self._stop_event.wait()
                nursery.cancel_scope.cancel()

    def _configure_dht(self, dht: KadDHT) -> None:
        """Called in the trio thread with the new DHT before it starts (e.g. to register validators)."""

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
        # py-libp2p 0.8 refuses to dial a peer for 60 s after one dial of it failed (a "negative cache"): a
        # bootstrap peer not listening yet when this node started would stay unreachable that long although our
        # own loops retry it every second. Those loops pace the dials, so the cache entry goes first.
        cache = getattr(self._host.get_network(), "_negative_peer_cache", None)
        if cache is not None:
            cache.evict(str(info.peer_id))
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

    async def _join_in_background(self, retry_s: float = 1.0, say_every_s: float = 10.0) -> None:
        """Dial the bootstrap peers until one answers (saying so every `say_every_s`), then fill the routing table."""
        assert self._dht is not None
        t0 = said = trio.current_time()
        while True:
            ok = [await self._dial(i) for i in self._bootstrap_infos]
            if any(ok):
                break
            if trio.current_time() - said >= say_every_s:
                said = trio.current_time()
                log.warning("no bootstrap peer reachable for %.0f s (%s); still retrying (give more with "
                            "--bootstrap; any node's p2p address works)", said - t0, ", ".join(self.bootstrap))
            await trio.sleep(retry_s)
        for info, good in zip(self._bootstrap_infos, ok, strict=True):
            if not good:
                log.warning("bootstrap peer %s unreachable; will keep retrying", info.peer_id)
        log.info("joined the network through %d of %d bootstrap peers", sum(ok), len(ok))
        with trio.move_on_after(self.query_timeout_s):
            await self._dht.peer_routing.find_closest_peers_network(self._host_id().to_bytes())

    async def _maintain(self) -> None:
        assert self._host is not None and self._dht is not None
        while True:
            await trio.sleep(self.maintain_interval_s)
            connected = set(self._host.get_connected_peers())
            for info in self._bootstrap_infos:
                if info.peer_id not in connected and not await self._dial(info):
                    log.debug("bootstrap peer %s still unreachable", info.peer_id)
            if self._bootstrap_infos and not self._host.get_connected_peers():
                # every bootstrap is down: any peer met before is an entry point too
                store = self._host.get_peerstore()
                for pid in self._dht.routing_table.get_peer_ids():
                    try:
                        addrs = store.addrs(pid)
                    except Exception:  # noqa: BLE001 - py-libp2p raises when it has no address for the peer
                        continue
                    if pid != self._host_id() and addrs and await self._dial(PeerInfo(pid, addrs)):
                        log.info("rejoined the network through known peer %s", pid)
                        break
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
