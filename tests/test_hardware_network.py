"""Devices, precision and memory-aware placement through real node processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc
import pytest
import torch
from conftest import PROMPTS, count_flips, hf_greedy
from transformers import AutoModelForCausalLM

from dsd_node.engine.config import GenerationConfig
from dsd_node.engine.models import load_config
from dsd_node.net.client import DsdClient
from dsd_node.net.grpc_util import query_info, wait_healthy
from dsd_node.ops.testnet import Testnet, plan, plan_discovery
from dsd_node.p2p.discovery import Discovery
from dsd_node.p2p.identity import Identity
from dsd_node.p2p.peers import make_record
from dsd_node.p2p.placement import MIB, span_fits
from dsd_node.p2p.routing import build_route

pytestmark = pytest.mark.slow  # starts node processes

BF16_AGREEMENT_FLOOR = 0.95  # the same floor as in one process (tests/test_precision.py)


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_an_absent_device_is_a_one_line_error_before_the_node_starts(device):
    if device == "cuda" and torch.cuda.is_available() or device == "mps" and torch.backends.mps.is_available():
        pytest.skip(f"this machine has {device}")
    p = subprocess.run([sys.executable, "-m", "dsd_node.node_cli", "--role", "stage", "--device", device,
                        "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and f"{device} requested" in p.stderr
    assert "Traceback" not in p.stderr + p.stdout and "ready" not in p.stdout  # nothing started half-way


@pytest.mark.extended  # 30-100 s; tests/test_precision.py checks bf16 agreement in one process by default
async def test_bf16_stages_agree_with_hf_generate_in_bf16(target_path, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.bfloat16).eval()
    prompts = PROMPTS[:3]
    want = {p: hf_greedy(model, tokenizer(p)["input_ids"], 24, tokenizer.eos_token_id) for p in prompts}
    async with Testnet(plan(3, extra=["--dtype", "bfloat16", "--device", "cpu"])) as net:
        async with grpc.aio.insecure_channel(net.specs[0].address) as ch:
            assert (await query_info(ch)).dtype == "bfloat16"
        async with DsdClient(net.gateway) as c:
            for mode in ("ar", "si", "dsi"):
                async def generate(ids: list[int], n: int, mode=mode) -> list[int]:
                    return (await c.generate(ids, GenerationConfig(mode=mode, max_new_tokens=n))).tokens

                flips = total = 0
                for p in prompts:
                    flips += await count_flips(generate, tokenizer(p)["input_ids"], want[p])
                    total += len(want[p])
                agreement = 1 - flips / total
                print(f"bf16 through 3 stage processes, {mode}: {flips} flips in {total} tokens, agreement {agreement:.3f}")
                assert agreement >= BF16_AGREEMENT_FLOOR, (mode, flips, total)


async def _records_visible(bootstrap: str, n: int, timeout_s: float = 60.0) -> None:
    """Wait until a fresh peer finds n stage records (so the next node plans with them in view)."""
    d = Discovery(Identity.generate(), bootstrap=[bootstrap])
    await d.start()
    try:
        deadline = time.monotonic() + timeout_s
        while len([r for r in await d.find("embedded:target") if r.role == "stage"]) < n:
            assert time.monotonic() < deadline, f"fewer than {n} stage records after {timeout_s:.0f} s"
            await asyncio.sleep(0.5)
    finally:
        await d.stop()


@pytest.mark.extended  # 80-190 s: nodes start one by one (tests/test_placement.py covers the rules in 6 s)
async def test_layers_auto_covers_the_model_by_memory_and_generates_exactly(reference, tokenizer, tmp_path):
    # 8 layers of 2.25 MB (float32), embeddings and LM head 2 MB each; 10% of the cap is kept for KV caches.
    # Nodes start one by one, each placing its span where the others leave layers uncovered.
    caps = [9, 7, 10, 6]  # MB
    specs = plan_discovery(len(caps), model="embedded:target", drafter="embedded:drafter")
    by_name = {s.name: s for s in specs}
    stages = [by_name[f"stage{i}"] for i in range(len(caps))]
    for spec, cap in zip(stages, caps, strict=True):
        i = spec.args.index("--layers")
        spec.args[i + 1: i + 2] = ["auto", "--max-mem-mb", str(cap)]
    boot = by_name["head"].args[by_name["head"].args.index("--bootstrap") + 1]
    net = Testnet(specs, log_dir=tmp_path / "logs")
    try:
        net.start(by_name["bootstrap"])
        await asyncio.sleep(2)
        for i, spec in enumerate(stages):
            net.start(spec)
            await wait_healthy(spec.address, timeout=120)
            await _records_visible(boot, i + 1)
        spans = []
        for spec in stages:
            async with grpc.aio.insecure_channel(spec.address) as ch:
                info = await query_info(ch)
            spans.append((info.layer_start, info.layer_end))
        covered = sorted({layer for a, b in spans for layer in range(a, b)})
        assert covered == list(range(8)), spans  # every layer hosted
        records = [make_record(str(i), "stage", "m", "", a, b, 8, "x", 1.0, 0, 1, 60) for i, (a, b) in enumerate(spans)]
        assert build_route(records, 8), spans  # and the spans chain into a route (RouteError otherwise)
        config = load_config("embedded:target")
        for (a, b), cap in zip(spans, caps, strict=True):  # each node within its memory
            assert span_fits(config, 4, cap * MIB, a, b, kv_reserve_bytes=cap * MIB // 10), (a, b, cap)

        # a node with room for no layer at all refuses to start, in one line
        tiny = subprocess.run([sys.executable, "-m", "dsd_node.node_cli", "--role", "stage", "--layers", "auto",
                               "--max-mem-mb", "2", "--listen", "127.0.0.1:0", "--threads", "1"],
                              capture_output=True, text=True, timeout=120)
        assert tiny.returncode == 2 and "not enough memory for a single layer" in tiny.stderr
        assert "Traceback" not in tiny.stderr

        for name in ("drafter", "head"):
            net.start(by_name[name])
            await wait_healthy(by_name[name].address, timeout=120)
        async with DsdClient(net.gateway) as c:
            for mode in ("ar", "si"):
                ids = tokenizer(PROMPTS[1])["input_ids"]
                r = await c.generate(ids, GenerationConfig(mode=mode, max_new_tokens=24))
                assert r.tokens == hf_greedy(reference, ids, 24, tokenizer.eos_token_id), mode
    finally:
        net.down()
