"""A session's route and sampling settings travel once, with its first round (wire.SessionSetup)."""

from __future__ import annotations

import grpc
import pytest
import torch

from dsd_node.engine.messages import Hop, RoundMsg
from dsd_node.engine.tree import TokenTree
from dsd_node.engine.verify import SamplingParams
from dsd_node.net.stage_service import abort_for
from dsd_node.net.wire import NoSessionSetup, WireError, round_from_pb, round_to_pb, sampling_from_pb, sampling_to_pb

ROUTE = [Hop("127.0.0.1:1", 0, 4, "peer-a", b"signed record a"), Hop("127.0.0.1:2", 4, 8, "peer-b", b"record b")]
SAMPLING = SamplingParams.create(temperature=0.7, top_p=0.9, seed=11)
ON_WIRE = sampling_from_pb(sampling_to_pb(SAMPLING))  # float32 on the wire


def _round(rid: int, **kw) -> RoundMsg:
    return RoundMsg("s", rid, 0, [(rid - 1, [0])] if rid else [], [], TokenTree.chain([5, 6, 7]),
                    hidden=torch.ones(1, 3, 8), **kw)


def test_later_rounds_take_the_settings_of_the_first():
    first = round_to_pb(_round(0, sampling=SAMPLING, route=ROUTE, hop=1, reply_to="gw:1", reply_record=b"head rec"))
    later = round_to_pb(_round(1, sampling=SamplingParams(), route=[], hop=0), setup=False)
    assert first.HasField("setup") and not later.HasField("setup")
    assert later.ByteSize() < first.ByteSize()
    m0, setup = round_from_pb(first, None)
    m1, setup1 = round_from_pb(later, setup)
    assert setup1 is setup
    for m in (m0, m1):
        assert (m.route, m.hop, m.reply_to, m.reply_record, m.sampling) == (ROUTE, 1, "gw:1", b"head rec", ON_WIRE)
        assert [h.record for h in m.route] == [b"signed record a", b"record b"]  # the in-band records are kept
    assert (m1.round_id, m1.commits, m1.tree.tokens) == (1, [(0, [0])], [5, 6, 7])
    assert torch.equal(m1.hidden, torch.ones(1, 3, 8))
    again, _ = round_from_pb(round_to_pb(_round(2, sampling=SAMPLING, route=ROUTE, hop=1, reply_to="gw:1")), setup)
    assert again.round_id == 2  # the same settings repeated: accepted


def test_a_round_without_settings_for_an_unknown_session_gets_a_clear_status():
    later = round_to_pb(_round(3), setup=False)
    with pytest.raises(NoSessionSetup, match="round 3 of session 's' brings no session settings") as e:
        round_from_pb(later, None)
    abort = abort_for(e.value)
    assert abort.code == grpc.StatusCode.FAILED_PRECONDITION and "first round carries" in abort.details


@pytest.mark.parametrize("change", [{"hop": 0}, {"reply_to": "elsewhere:1"}, {"route": ROUTE[:1]},
                                    {"sampling": SamplingParams()}])
def test_a_later_round_cannot_change_the_settings(change):
    kw = {"sampling": SAMPLING, "route": ROUTE, "hop": 1, "reply_to": "gw:1"}
    _, setup = round_from_pb(round_to_pb(_round(0, **kw)), None)
    with pytest.raises(WireError, match="changes the session's settings") as e:
        round_from_pb(round_to_pb(_round(1, **(kw | change))), setup)
    assert abort_for(e.value).code == grpc.StatusCode.INVALID_ARGUMENT
