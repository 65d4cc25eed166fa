"""docker-compose.yml run as local processes (`dsd testnet up --from`): the containers' own commands on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PROMPTS, hf_greedy

from dsd_node.engine.config import GenerationConfig
from dsd_node.net.client import DsdClient
from dsd_node.net.grpc_util import query_info
from dsd_node.ops.compose import specs_from_compose
from dsd_node.ops.testnet import Testnet

pytestmark = pytest.mark.slow  # starts node processes / network

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.extended  # 36 s; the docker tier runs the same file in containers
async def test_compose_services_as_local_processes_match_hf_generate(reference, tokenizer, tmp_path):
    specs = specs_from_compose(ROOT / "docker-compose.yml", threads=1, workdir=tmp_path)
    assert {s.name for s in specs} == {"bootstrap", "stage0", "stage1", "stage2", "stage3", "gateway"}
    async with Testnet(specs, log_dir=tmp_path / "logs") as net:
        async with DsdClient(net.gateway) as c:
            for mode in ("ar", "si", "dsi"):
                for prompt in PROMPTS[:2]:
                    r = await c.generate(prompt, GenerationConfig(mode=mode, max_new_tokens=24))
                    assert r.tokens == hf_greedy(reference, tokenizer(prompt)["input_ids"], 24, tokenizer.eos_token_id)
            # the gateway found its route through the bootstrap peer, as in the containers, and says so in Info
            route = (await query_info(c.channel)).route
            assert [(h.layer_start, h.layer_end) for h in route] == [(0, 2), (2, 4), (4, 6), (6, 8)]
