"""The trust layer's decisions without processes: certificates and call tokens, who may be dialled, and the output
auditor's majority vote (real keys and certificates; the auditor's replays are scripted opinions)."""

from __future__ import annotations

import random
import time

import grpc
import pytest

from dsd_node.engine.messages import Hop
from dsd_node.engine.verify import SamplingParams
from dsd_node.net.audit import Auditor, IntegrityError
from dsd_node.net.dialable import EXPIRY_GRACE_S, Dialable, NotAnnounced
from dsd_node.net.tls import (
    PEER_METADATA,
    TOKEN_TTL_S,
    AccessPolicy,
    AuthError,
    Membership,
    NodeTls,
    TlsIdentityError,
    peer_of_certificate,
    read_allow_peers,
    read_swarm_key,
)
from dsd_node.p2p.identity import Identity
from dsd_node.p2p.records import NodeRecord, sign_record, verify_record


def der(tls: NodeTls) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    return x509.load_pem_x509_certificate(tls.cert_pem).public_bytes(serialization.Encoding.DER)


def test_certificates_prove_the_peer_id_membership_and_allowlist(tmp_path):
    key = tmp_path / "swarm.key"
    key.write_text("x" * 64)
    swarm = Membership(read_swarm_key(key))
    a, b = NodeTls.create(Identity.generate(), swarm), NodeTls.create(Identity.generate())
    assert peer_of_certificate(der(a), swarm) == a.peer_id
    assert peer_of_certificate(der(b), Membership()) == b.peer_id  # open swarm
    with pytest.raises(TlsIdentityError, match="not a member"):
        peer_of_certificate(der(b), swarm)
    allow = tmp_path / "peers.txt"
    allow.write_text(f"# ours\n{a.peer_id}\n\n")
    with pytest.raises(TlsIdentityError, match="not on the allowlist"):
        peer_of_certificate(der(b), Membership(allow=read_allow_peers(allow)))
    short = tmp_path / "short.key"
    short.write_text("tiny")
    with pytest.raises(ValueError, match="too short"):
        read_swarm_key(short)


def test_call_tokens_are_bound_to_the_called_node_and_expire(tmp_path):
    key = tmp_path / "swarm.key"
    key.write_text("y" * 64)
    swarm = Membership(read_swarm_key(key))
    server, other = NodeTls.create(Identity.generate(), swarm), NodeTls.create(Identity.generate(), swarm)
    caller, outsider = NodeTls.create(Identity.generate(), swarm), NodeTls.create(Identity.generate())
    policy = AccessPolicy(server, api_key="k")
    assert policy.peer_of([(PEER_METADATA, caller.token(server.cert_sha256))]) == caller.peer_id
    cases = {
        "no token": ([], grpc.StatusCode.UNAUTHENTICATED, "only dsd nodes"),
        "made for another node": ([(PEER_METADATA, caller.token(other.cert_sha256))], grpc.StatusCode.UNAUTHENTICATED,
                                  "bad signature"),
        "expired": ([(PEER_METADATA, caller.token(server.cert_sha256, now=time.time() - 2 * TOKEN_TTL_S))],
                    grpc.StatusCode.UNAUTHENTICATED, "expired"),
        "garbage": ([(PEER_METADATA, "!!")], grpc.StatusCode.UNAUTHENTICATED, "malformed"),
        "non-member": ([(PEER_METADATA, outsider.token(server.cert_sha256))], grpc.StatusCode.PERMISSION_DENIED,
                       "not a member"),
    }
    for name, (md, code, text) in cases.items():
        with pytest.raises(AuthError) as e:
            policy.check("/dsd.v1.Stage/Forward", md)
        assert e.value.code == code and text in e.value.details, name
    policy.check("/grpc.health.v1.Health/Check", [])  # open
    policy.check("/dsd.v1.Node/Info", [])
    policy.check("/dsd.v1.Gateway/Generate", [("dsd-api-key", "k")])
    with pytest.raises(AuthError, match="needs an API key"):
        policy.check("/dsd.v1.Gateway/Generate", [])
    AccessPolicy(None, None).check("/dsd.v1.Stage/Forward", [])  # --insecure: nothing to check


async def test_only_announced_addresses_may_be_dialled():
    async def lookup():
        return [("10.0.0.1:6000", "peerA", time.time() + 60), ("10.0.0.2:6000", "gone", time.time() - EXPIRY_GRACE_S - 1),
                ("10.0.0.3:6000", "late", time.time() - 5)]

    d = Dialable(lookup, min_gap_s=0.01, miss_wait_s=0.05)
    await d.check("10.0.0.1:6000", "peerA")
    await d.check("10.0.0.1:6000")
    with pytest.raises(NotAnnounced, match="of peer peerB is not an announced peer"):
        await d.check("10.0.0.1:6000", "peerB")
    with pytest.raises(NotAnnounced, match="reply_to 10.9.9.9:1 is not an announced peer: refused, not dialled"):
        await d.check("10.9.9.9:1", what="reply_to")
    with pytest.raises(NotAnnounced):
        await d.check("10.0.0.2:6000")  # its record expired
    await d.check("10.0.0.3:6000", "late")  # expired a moment ago (a DHT slowed by a frozen peer): still counts
    await Dialable(static=["1.2.3.4:5"]).check("1.2.3.4:5")
    with pytest.raises(NotAnnounced):
        await Dialable(static=["1.2.3.4:5"]).check("1.2.3.4:6")
    await Dialable().check("anything:1")  # wired by address, nothing configured: unrestricted (said at start-up)


async def test_a_lookup_that_misses_a_record_is_retried_before_refusing():
    lookups = []

    async def flaky():  # a loaded DHT: the first two lookups miss the record
        lookups.append(1)
        return [("10.0.0.1:6000", "peerA", time.time() + 60)] if len(lookups) > 2 else []

    await Dialable(flaky, min_gap_s=0.01, miss_wait_s=5.0).check("10.0.0.1:6000", "peerA")
    assert len(lookups) == 3
    lookups.clear()
    with pytest.raises(NotAnnounced):  # and a miss is refused within miss_wait_s, not retried forever
        await Dialable(flaky, min_gap_s=0.01, miss_wait_s=0.0).check("10.0.0.1:6000", "peerA")
    assert len(lookups) == 1


async def test_a_record_carried_in_band_counts_as_announced_and_is_checked_as_the_dht_checks_it():
    swarm = b"k" * 32
    me, other = Identity.generate(), Identity.generate()

    def verify(blob: bytes) -> tuple[str, str, float]:
        r = verify_record(blob, swarm_key=swarm)
        return r.grpc_address, r.peer_id, r.expires_at

    def blob(who: Identity, address: str, key: bytes | None = swarm, ttl: float = 60.0) -> bytes:
        rec = NodeRecord(who.peer_id, "head", "m", "h", 0, 0, 8, address, "0", 0.0, 0, 4, time.time() + ttl)
        return sign_record(rec, who, swarm_key=key)

    async def nothing():  # the DHT lookup misses every record
        return []

    d = Dialable(nothing, verify=verify, min_gap_s=0.01, miss_wait_s=0.0)
    with pytest.raises(NotAnnounced):
        await d.check("10.0.0.1:6000", me.peer_id, "reply_to")
    await d.check("10.0.0.1:6000", me.peer_id, "reply_to", blob(me, "10.0.0.1:6000"))
    await d.check("10.0.0.1:6000", me.peer_id)  # known from then on, until the record expires
    cases = [(blob(me, "10.0.0.2:6000"), "10.0.0.9:1", ""),  # a record for another address
             (blob(other, "10.0.0.3:6000"), "10.0.0.3:6000", me.peer_id),  # another peer's record
             (blob(me, "10.0.0.4:6000", key=None), "10.0.0.4:6000", ""),  # no proof of the swarm key
             (blob(me, "10.0.0.5:6000", ttl=-1), "10.0.0.5:6000", ""),  # expired (this verify allows no grace)
             (b"\x93garbage", "10.0.0.6:6000", "")]
    for record, address, peer in cases:
        with pytest.raises(NotAnnounced, match="refused, not dialled"):
            await d.check(address, peer, "next stage", record)


def _rec(peer: str, a: int = 0, b: int = 8) -> NodeRecord:
    return NodeRecord(peer, "stage", "m", "h", a, b, 8, f"{peer}:1", "0", 1.0, 0, 4, time.time() + 60)


def _auditor(peers: list[str], answers: dict[str, list[int]], **kw) -> tuple[Auditor, list[str]]:
    banned: list[str] = []

    async def replicas(fresh: bool):
        return [_rec(p) for p in peers]

    async def replay(route, context, tokens, sampling):
        return answers[route[0].peer_id]

    return Auditor(replicas, replay, on_ban=banned.append, **kw), banned


def hop(peer: str) -> Hop:
    return Hop(f"{peer}:1", 0, 8, peer)


async def test_the_auditor_bans_the_minority_and_refuses_a_caught_round():
    greedy, good, bad = SamplingParams.create(), [5, 6, 7], [9, 9, 9]
    # the session's own route is the rogue: two replicas outvote it, the round is not sent
    a, banned = _auditor(["rogue", "h1", "h2"], {"h1": good, "h2": good})
    assert a.should_check([hop("rogue")], first_round=True, sampling=greedy)
    with pytest.raises(IntegrityError, match="failed verification"):
        await a.check([hop("rogue")], [1, 2], bad, greedy)
    assert banned == ["rogue"] and {"h1", "h2"} <= a.vouched and a.stats.mismatches == 1
    # the rogue is the replica asked first (unvouched peers by id): it is banned, the round stands
    a, banned = _auditor(["h1", "evil", "h2"], {"evil": bad, "h2": good})
    await a.check([hop("h1")], [1, 2], good, greedy)
    assert banned == ["evil"] and "h1" in a.vouched
    # agreement vouches for both; afterwards a vouched route is checked only by chance
    a, banned = _auditor(["h1", "h2"], {"h2": good}, fraction=0.0001)
    await a.check([hop("h1")], [1], good, greedy)
    assert banned == [] and a.vouched == {"h1", "h2"}
    assert not a.should_check([hop("h1")], first_round=True, sampling=greedy)
    # nothing to compare with: counted, not refused
    a, _ = _auditor(["h1"], {})
    await a.check([hop("h1")], [1], good, greedy)
    assert a.stats.unverifiable == 1
    # sampled rounds, or verification off: never checked
    assert not a.should_check([hop("x")], True, SamplingParams.create(temperature=0.8))
    assert not _auditor([], {}, fraction=0.0)[0].should_check([hop("x")], True, greedy)


async def test_the_auditor_reports_each_rounds_result_and_checks_about_its_fraction():
    greedy, good = SamplingParams.create(), [5, 6, 7]
    results: list[str] = []
    a, _ = _auditor(["h1", "h2"], {"h2": good}, fraction=0.25, rng=random.Random(7), on_result=results.append)
    await a.check([hop("h1")], [1], good, greedy)  # vouches for both
    checked = sum(a.should_check([hop("h1")], False, greedy) for _ in range(4000))
    assert results[0] == "agree" and results.count("skipped") == 4000 - checked
    assert 0.22 < checked / 4000 < 0.28  # binomial(4000, 0.25): 0.25 +/- 0.03 is over 4 standard deviations
    a, _ = _auditor(["h1"], {}, on_result=results.append)
    await a.check([hop("h1")], [1], good, greedy)
    assert results[-1] == "unverifiable"
    # a replay that fails (the replica is unreachable: []) is no opinion: nobody is banned, the round stands
    a, banned = _auditor(["h1", "h2"], {"h2": []}, on_result=results.append)
    await a.check([hop("h1")], [1], good, greedy)
    assert results[-1] == "unverifiable" and banned == [] and a.stats.mismatches == 0


async def test_no_replay_goes_through_a_peer_the_gateway_excludes():
    """A frozen replica, excluded after a failover, would hold every replay (and so the session) until the stages
    expire it: replays go through the replicas the gateway still routes to, else the round is unverifiable."""
    greedy, good = SamplingParams.create(), [5, 6, 7]
    excluded = {"frozen:1"}
    asked: list[str] = []

    async def replicas(fresh: bool):
        return [_rec(p) for p in ("h1", "frozen", "h2")]

    async def replay(route, context, tokens, sampling):
        asked.append(route[0].peer_id)
        return good

    a = Auditor(replicas, replay, excluded=lambda: excluded)
    await a.check([hop("h1")], [1], good, greedy)
    assert asked == ["h2"] and a.vouched == {"h1", "h2"}
    excluded.add("h2:1")
    await a.check([hop("h1")], [1], good, greedy)
    assert asked == ["h2"] and a.stats.unverifiable == 1
