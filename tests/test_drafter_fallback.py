"""A drafter that goes away mid-generation: the head sends its rounds without a draft (as in ar), output
stays HF greedy, the stats say so, and drafting resumes when a drafter answers again (in one process)."""

from __future__ import annotations

import uuid

import pytest
from conftest import PROMPTS, hf_greedy

from dsd_node.engine.config import GenerationConfig
from dsd_node.engine.head import DrafterUnavailable, Head
from dsd_node.engine.local import LocalDraftSource, LocalEngine

pytestmark = pytest.mark.slow  # loads the embedded models


class FlakyDrafts:
    """The real drafter, down for the draft calls numbered in `down` (as when every drafter node is dead)."""

    def __init__(self, source: LocalDraftSource, down: range):
        self.source, self.down, self.calls = source, down, 0

    async def draft(self, session_id, req):
        self.calls += 1
        if self.calls in self.down:
            raise DrafterUnavailable("no drafter reachable (test: all down)")
        return await self.source.draft(session_id, req)


@pytest.fixture(scope="module")
def engine():
    return LocalEngine("embedded:target", "embedded:drafter", stages=2)


@pytest.mark.parametrize("mode", ["si", "dsi"])
async def test_generation_continues_without_a_drafter_and_says_so(engine, reference, tokenizer, mode):
    ids = tokenizer(PROMPTS[0])["input_ids"]
    want = hf_greedy(reference, ids, 24, None)
    cfg = GenerationConfig(mode=mode, max_new_tokens=24, draft_k=4, max_inflight=3, ignore_eos=True)
    for down in (range(3, 6), range(1, 10_000)):  # down for a while, then back; down for good
        sid = uuid.uuid4().hex
        drafts = FlakyDrafts(LocalDraftSource(engine.drafter), down)
        head = Head(sid, engine.pipeline, drafts, cfg, tokenizer.eos_token_id, pipeline_depth=2)
        try:
            got = await head.run(ids)
        finally:
            engine.pipeline.end_session(sid)
            engine.drafter.end_session(sid)
        assert got == want, f"{mode} diverged with the drafter down for calls {down}"
        st = head.stats
        assert st.drafter_failures > 0 and st.fallback_rounds > 0, st
        if down.stop < 100:  # it came back: later rounds were drafted again (more than one token accepted)
            assert max(st.accepted_per_round) > 1 and st.fallback_rounds < st.rounds
        else:  # every round went without a draft: one token each, as in ar
            assert st.fallback_rounds == st.rounds and max(st.accepted_per_round) == 1
