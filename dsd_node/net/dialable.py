"""Which addresses a node may dial when a message names them (a round's next hop, its reply_to).

A node never connects to an address it only read in a message: the address must belong to an announced
peer (a signed record found through discovery, and the peer id the message names, when it names one) or,
for a node without discovery, to the addresses it was configured with (--dial-allow). Without either,
the node dials what rounds name (the plain, wired-by-address setup), and says so at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

# A record counts this long after it expired, as the head's route finder keeps using it (p2p.peers.FORGET_S): a
# frozen or dead peer slows DHT writes, so fresh copies of live peers' records may not get through for a while.
EXPIRY_GRACE_S = 60.0


class NotAnnounced(PermissionError):
    """An address a message named that no announced peer owns: refused before anything is dialled."""


class Dialable:
    """`lookup`: (address, peer id, expires_at) of the announced peers (e.g. from discovery records); what it
    found stays known until its record expires (a DHT lookup may miss records a previous one found); an
    address not known is looked up again for up to `miss_wait_s` before it is refused; `static`: addresses
    configured by hand. Both None/empty: no restriction."""

    def __init__(self, lookup: Callable[[], Awaitable[list[tuple[str, str, float]]]] | None = None,
                 static: list[str] | None = None, refresh_s: float = 15.0, min_gap_s: float = 1.0,
                 miss_wait_s: float = 3.0, verify: Callable[[bytes], tuple[str, str, float]] | None = None):
        self.lookup, self.static, self.verify = lookup, set(static or []), verify
        self.refresh_s, self.min_gap_s, self.miss_wait_s = refresh_s, min_gap_s, miss_wait_s
        self._owners: dict[str, dict[str, float]] = {}  # address -> peer id -> record expiry (time.time())
        self._at = float("-inf")
        self._lock = asyncio.Lock()
        self._background: asyncio.Future | None = None

    async def keep_fresh(self) -> None:
        """Look the announced peers up every refresh_s until cancelled, so rounds rarely wait for a lookup."""
        while True:
            await self._refresh_later()
            await asyncio.sleep(self.refresh_s)

    async def _refresh_later(self) -> None:
        try:
            await self._refresh(force=False)
        except Exception:  # the next check tries again
            pass
        finally:
            self._background = None

    @property
    def restricted(self) -> bool:
        return self.lookup is not None or bool(self.static)

    async def _refresh(self, force: bool) -> None:
        async with self._lock:
            age = time.monotonic() - self._at
            if age < self.min_gap_s or (not force and age < self.refresh_s):
                return
            now = time.time()
            owners = {a: {p: t for p, t in ps.items() if t > now - EXPIRY_GRACE_S} for a, ps in self._owners.items()}
            for address, peer, expires in await self.lookup():
                owners.setdefault(address, {})[peer] = max(expires, owners.get(address, {}).get(peer, 0.0))
            self._owners, self._at = {a: ps for a, ps in owners.items() if ps}, time.monotonic()

    async def check(self, address: str, peer_id: str = "", what: str = "address", record: bytes = b"") -> None:
        """NotAnnounced unless `address` (owned by `peer_id`, when given) may be dialled. `record`: the signed
        discovery record a message carried for it, as good as one found in the DHT (the same checks, by
        `verify`), so a lookup that misses it (a loaded DHT) costs nothing."""
        if not self.restricted or address in self.static:
            return
        if record and self.verify is not None and self.lookup is not None:
            try:  # a record that does not prove `address` is ignored: the lookups below decide
                owner = self.verify(record)
                if owner[0] == address and (not peer_id or owner[1] == peer_id):
                    self._owners.setdefault(address, {})[owner[1]] = owner[2]
            except Exception:  # noqa: BLE001 - RecordError, or any garbage
                pass
        if self.lookup is not None:
            if self._known(address, peer_id):
                if time.monotonic() - self._at > self.refresh_s and self._background is None:
                    self._background = asyncio.ensure_future(self._refresh_later())  # not on the round's path
                return
            deadline = time.monotonic() + self.miss_wait_s
            while True:  # a peer announced since the last look, or a lookup missed its record (a loaded DHT does)
                with contextlib.suppress(Exception):  # a failed lookup (DHT timeout...) is a miss
                    await self._refresh(force=True)
                if self._known(address, peer_id):
                    return
                if time.monotonic() >= deadline:
                    break
                await asyncio.sleep(self.min_gap_s)
        owner = f" of peer {peer_id}" if peer_id else ""
        raise NotAnnounced(f"{what} {address}{owner} is not an announced peer: refused, not dialled")

    def _known(self, address: str, peer_id: str) -> bool:
        now = time.time()
        owners = {p for p, t in self._owners.get(address, {}).items() if t > now - EXPIRY_GRACE_S}
        return bool(owners) and (not peer_id or peer_id in owners)
