"""Shared fixtures: the embedded model pair, reference Hugging Face models, random-weight models."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from dsd_node.engine.models import resolve_model_path

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n        self.",
    "for i in range(10):\n    if i % 2 == 0:\n",
    "    return [x for x in",
    "# Parse the command line arguments\n",
]


def hf_greedy(model, prompt_ids: list[int], n: int, eos: int | None = None) -> list[int]:
    """The reference: Hugging Face generate(), greedy, on the unsharded model."""
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                         eos_token_id=eos, pad_token_id=eos if eos is not None else 0)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="session")
def target_path() -> str:
    return str(resolve_model_path("embedded:target"))


@pytest.fixture(scope="session")
def reference(target_path):
    return AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer():
    from dsd_node.engine.models import load_tokenizer

    return load_tokenizer("embedded:target")


def save_random_llama(path: Path, layers: int, hidden: int, seed: int) -> str:
    """A Llama model with random weights and the embedded tokenizer (a drafter that is often wrong)."""
    torch.manual_seed(seed)
    src = resolve_model_path("embedded:target")
    cfg = LlamaConfig(vocab_size=2048, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=2 * hidden, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    for f in src.glob("tokenizer*"):
        shutil.copy(f, path / f.name)
    return str(path)


@pytest.fixture(scope="session")
def random_drafter(tmp_path_factory) -> str:
    return save_random_llama(tmp_path_factory.mktemp("random_drafter"), layers=1, hidden=64, seed=1)


async def count_flips(generate, ids: list[int], want: list[int]) -> int:
    """Tokens where `await generate(ids, n)` (a greedy generation of n tokens) differs from the reference `want`,
    resuming after each flip from the reference's own text: one flip changes all the text after it, so counting
    positions would count those too. Used for half precision, where near-tie argmaxes may flip."""
    flips, pos = 0, 0
    while pos < len(want):
        got = await generate(ids + want[:pos], len(want) - pos)
        k = 0
        while k < min(len(got), len(want) - pos) and got[k] == want[pos + k]:
            k += 1
        if k == len(want) - pos:
            break
        flips, pos = flips + 1, pos + k + 1
    return flips


async def find_stages(discovery, want: int, tries: int, every_s: float) -> list:
    """The embedded target's stage records `discovery` (started) finds, looked up until `want` are found or `tries`
    lookups were made: a lookup on a loaded machine may miss records, or they are still being announced."""
    found: dict = {}
    for i in range(tries):
        found.update({r.peer_id: r for r in await discovery.find("embedded:target") if r.role == "stage"})
        if len(found) >= want:
            break
        if i + 1 < tries:
            await asyncio.sleep(every_s)
    return list(found.values())


@contextmanager
def running(specs, temp_dirs=()) -> Iterator:
    """A Testnet of `specs` started and healthy for the block; stopped and its temp folders (and `temp_dirs`)
    removed after."""
    from dsd_node.ops.testnet import Testnet

    net = Testnet(specs, temp_dirs=list(temp_dirs))
    try:
        asyncio.run(net.up())
        yield net
    finally:
        net.down()
        net.remove_temp_dirs()


async def stage_sessions(addresses: list[str]) -> list[int]:
    """Open sessions on each node, from its Info reply."""
    import grpc

    from dsd_node.net.grpc_util import query_info

    out = []
    for a in addresses:
        async with grpc.aio.insecure_channel(a) as ch:
            out.append((await query_info(ch)).sessions)
    return out


async def wait_no_sessions(addresses: list[str], timeout: float) -> None:
    """Wait (at most `timeout` s) until no node holds a session; assert it."""
    deadline = time.monotonic() + timeout
    while sum(await stage_sessions(addresses)) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert await stage_sessions(addresses) == [0] * len(addresses)
