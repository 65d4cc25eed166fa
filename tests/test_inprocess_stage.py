"""A head that hosts the first stage of its route (head, drafter and stage 0 in one process, as `dsd bench` and
`dsd testnet up` run it) enters that stage in-process, not through a loopback gRPC call: real node processes,
checked against Hugging Face greedy generation and against the node's own metrics."""

from __future__ import annotations

import tempfile
from pathlib import Path

import aiohttp
import pytest
from conftest import PROMPTS, hf_greedy, running
from prometheus_client.parser import text_string_to_metric_families

from dsd_node.engine.config import GenerationConfig
from dsd_node.net.client import DsdClient
from dsd_node.ops.testnet import Trust, free_port, plan

pytestmark = pytest.mark.slow  # starts node processes


@pytest.fixture(scope="module")
def net():
    """TLS links: the head is a stage's caller with its own identity, as any upstream is (check_upstream)."""
    key_dir = Path(tempfile.mkdtemp(prefix="dsd-inprocess-"))
    specs = plan(2, colocate=True, trust=Trust(tls=True), key_dir=key_dir, extra=["--round-timeout", "20"])
    head = specs[-1]
    head.args += ["--metrics", f"127.0.0.1:{free_port()}"]
    with running(specs, temp_dirs=[key_dir]) as n:
        yield n


async def _stage_sessions(net) -> dict[str, float]:
    head = net.specs[-1]
    async with aiohttp.ClientSession() as s, s.get(f"http://{head.args[head.args.index('--metrics') + 1]}/metrics") as r:
        text = await r.text()
    return {s.labels["transport"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == "dsd_stage_sessions_total"}


async def test_the_colocated_first_stage_runs_in_process_and_equals_hf(net, reference, tokenizer):
    before = await _stage_sessions(net)
    n = 0
    async with DsdClient(net.gateway) as c:
        for mode, prompt in zip(("ar", "si", "dsi"), PROMPTS, strict=False):
            r = await c.generate(prompt, GenerationConfig(mode=mode, max_new_tokens=24))
            assert r.tokens == hf_greedy(reference, tokenizer(prompt)["input_ids"], 24, tokenizer.eos_token_id), mode
            n += 1
    assert c.tls  # the links are TLS: the head calls its stage as the node it is
    after = await _stage_sessions(net)
    assert after.get("in_process", 0) - before.get("in_process", 0) == n  # every session entered stage 0 in-process
    assert after.get("grpc", 0) == before.get("grpc", 0) == 0  # and none through a gRPC call to itself
