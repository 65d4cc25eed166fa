"""The OpenAI-compatible HTTP API and /metrics, through the official `openai` client, against a 2-stage testnet of
real node processes (one shared by every test here), checked against Hugging Face greedy generation."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
from conftest import PROMPTS, hf_greedy
from prometheus_client.parser import text_string_to_metric_families

from dsd_node.net.openai_protocol import SIMPLE_CHAT_PROMPT, SIMPLE_CHAT_TEMPLATE
from dsd_node.ops.testnet import Testnet, free_port, plan

pytestmark = pytest.mark.slow  # starts node processes

KEY = "sk-test-dsd"
MODEL = "embedded:target"


@pytest.fixture(scope="module")
def net():
    specs = plan(2, http="auto", extra=["--round-timeout", "30"])
    specs[-1].env["DSD_API_KEY"] = KEY  # the head
    stage0 = next(s for s in specs if s.name == "stage0")
    stage0.args += ["--metrics", f"127.0.0.1:{free_port()}"]
    n = Testnet(specs)
    try:
        asyncio.run(n.up())
    except BaseException:
        n.down()
        raise
    yield n
    n.down()
    n.remove_temp_dirs()


def client(net, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=net.http_url, api_key=key, max_retries=0, timeout=120)


def reference_text(reference, tokenizer, ids: list[int], n: int) -> tuple[str, list[int]]:
    want = hf_greedy(reference, ids, n, tokenizer.eos_token_id)
    return tokenizer.decode(want, skip_special_tokens=True), want


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The documented template for a tokenizer without a chat template (the embedded pair has none)."""
    text = "".join(SIMPLE_CHAT_TEMPLATE.format(**m) for m in messages) + SIMPLE_CHAT_PROMPT
    return tokenizer(text)["input_ids"]


async def test_completions_and_chat_greedy_equal_hf_streaming_or_not(net, reference, tokenizer):
    async with client(net) as c:
        assert [m.id for m in (await c.models.list()).data] == [MODEL]
        ids = tokenizer(PROMPTS[0])["input_ids"]
        want, toks = reference_text(reference, tokenizer, ids, 16)
        r = await c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=16, temperature=0)
        assert r.choices[0].text == want
        assert r.choices[0].finish_reason == ("stop" if tokenizer.eos_token_id in toks else "length")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
            (len(ids), len(toks), len(ids) + len(toks))
        dsd = r.model_extra["dsd"]
        assert dsd["mode"] == "si" and dsd["rounds"] >= 1 and dsd["new_tokens"] == len(toks) and dsd["tau"] > 0
        # streamed, the prompt as token ids, dsi: the same text, in several chunks as rounds commit
        chunks = [ch async for ch in await c.completions.create(model=MODEL, prompt=ids, max_tokens=16, temperature=0,
                                                                stream=True, extra_body={"mode": "dsi"})]
        texts = [ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].text]
        assert "".join(texts) == want and len(texts) >= 2, texts
        assert chunks[-1].choices[0].finish_reason in ("stop", "length") and chunks[-1].model_extra["dsd"]["rounds"]

        messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
        ids = chat_ids(tokenizer, messages)
        want, toks = reference_text(reference, tokenizer, ids, 16)
        r = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
        assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(toks))
        stream = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"mode": "ar"})
        chunks = [ch async for ch in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
        assert chunks[-1].usage.completion_tokens == len(toks) and chunks[-1].usage.prompt_tokens == len(ids)


@pytest.mark.extended
@pytest.mark.parametrize("mode", ["ar", "si", "dsi"])
async def test_every_mode_streamed_or_not_equals_hf(net, reference, tokenizer, mode):
    async with client(net) as c:
        for prompt in PROMPTS[1:3]:
            ids = tokenizer(prompt)["input_ids"]
            want, toks = reference_text(reference, tokenizer, ids, 16)
            r = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                           extra_body={"mode": mode, "draft_k": 3, "max_inflight": 2})
            assert r.choices[0].text == want and r.usage.completion_tokens == len(toks), (mode, prompt)
            stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                                extra_body={"mode": mode})
            assert "".join([ch.choices[0].text async for ch in stream]) == want, (mode, prompt)


async def test_sse_wire_format_ends_with_done(net):
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as s, s.post(f"{net.http_url}/completions", json=body,
                                                    headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        raw = (await resp.read()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


async def test_stop_sequences_and_max_tokens(net, reference, tokenizer):
    ids = tokenizer(PROMPTS[1])["input_ids"]
    full, toks = reference_text(reference, tokenizer, ids, 32)
    stop = full[len(full) // 2:len(full) // 2 + 3]  # a piece of what greedy will write
    cut = full[:full.index(stop)]
    async with client(net) as c:
        r = await c.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=32, temperature=0,
                                       stop=["NEVER-THERE", stop])
        assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
        assert 1 <= r.usage.completion_tokens <= 32
        stream = await c.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=32, temperature=0,
                                            stop=stop, stream=True, extra_body={"mode": "dsi"})
        chunks = [ch async for ch in stream]
        assert "".join(ch.choices[0].text for ch in chunks) == cut
        assert chunks[-1].choices[0].finish_reason == "stop"
        r = await c.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
        assert r.choices[0].text == tokenizer.decode(toks[:5], skip_special_tokens=True)


async def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(net, reference, tokenizer):
    async with client(net) as c:
        bad = [({"temperature": 5}, "temperature"), ({"max_tokens": 0}, "max_tokens"),
               ({"extra_body": {"mode": "fast"}}, "mode"), ({"prompt": [999999]}, "vocabulary"),
               ({"max_tokens": 4000}, "context"), ({"extra_body": {"draft_k": "four"}}, "draft_k"),
               ({"n": 2}, "n=2")]
        for kw, text in bad:
            with pytest.raises(openai.BadRequestError) as e:
                await c.completions.create(**{"model": MODEL, "prompt": "x", **kw})
            assert e.value.status_code == 400 and text in e.value.body["message"], (kw, e.value.body)
            assert e.value.body["type"] == "invalid_request_error"
        with pytest.raises(openai.BadRequestError):
            await c.chat.completions.create(model=MODEL, messages=[])
        with pytest.raises(openai.NotFoundError) as e:
            await c.completions.create(model="gpt-4", prompt="x")
        assert e.value.body["code"] == "model_not_found"
    async with client(net, "wrong-key") as c:
        with pytest.raises(openai.AuthenticationError) as e:
            await c.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{net.http_url}/completions", data=b"{not json", headers=headers) as resp:
            assert resp.status == 400 and "not valid JSON" in (await resp.json())["error"]["message"]
        async with s.post(f"{net.http_url}/completions", json={"model": MODEL}) as resp:  # no key, no prompt
            assert resp.status == 401 and (await resp.json())["error"]["code"] == "invalid_api_key"
    async with client(net) as c:  # still serving, still exact
        r = await c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert r.choices[0].text == reference_text(reference, tokenizer, tokenizer(PROMPTS[0])["input_ids"], 8)[0]


@pytest.mark.extended
async def test_sixteen_concurrent_streams_each_get_their_own_text(net, reference, tokenizer):
    prompts = [PROMPTS[i % len(PROMPTS)] + f"x{i} = " for i in range(16)]
    modes = ["ar", "si", "dsi", "si"] * 4
    want = [reference_text(reference, tokenizer, tokenizer(p)["input_ids"], 12)[0] for p in prompts]

    async def one(c: openai.AsyncOpenAI, prompt: str, mode: str) -> str:
        stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            extra_body={"mode": mode})
        return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    async with client(net) as c:
        got = await asyncio.wait_for(asyncio.gather(*(one(c, p, m) for p, m in zip(prompts, modes, strict=True))), 240)
    assert got == want


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


async def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    async with aiohttp.ClientSession() as s, s.get(url) as resp:  # no key needed for /metrics
        assert resp.status == 200
        return _samples(await resp.text())


async def test_metrics_move_by_a_known_generation(net, tokenizer):
    base = net.http_url.removesuffix("/v1")
    stage0 = next(s for s in net.specs if s.name == "stage0")
    stage_url = f"http://{stage0.args[stage0.args.index('--metrics') + 1]}/metrics"
    before, stage_before = await _scrape(f"{base}/metrics"), await _scrape(stage_url)
    prompt, n = PROMPTS[3], 20
    async with client(net) as c:
        r = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                       extra_body={"mode": "si", "ignore_eos": True})
    dsd = r.model_extra["dsd"]
    after, stage_after = await _scrape(f"{base}/metrics"), await _scrape(stage_url)

    def moved(name: str, samples=(before, after), **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return samples[1].get(key, 0.0) - samples[0].get(key, 0.0)

    assert moved("dsd_generations_total", mode="si", outcome="ok") == 1
    assert moved("dsd_generated_tokens_total", mode="si") == n
    assert moved("dsd_prompt_tokens_total") == len(tokenizer(prompt)["input_ids"])
    assert moved("dsd_rounds_total", mode="si") == dsd["rounds"]
    assert moved("dsd_rounds_wasted_total", mode="si") == dsd["rounds_wasted"]
    assert moved("dsd_tokens_per_round_count", mode="si") == len(dsd["accepted_per_round"])
    assert moved("dsd_tokens_per_round_sum", mode="si") == sum(dsd["accepted_per_round"])
    assert moved("dsd_time_to_first_token_seconds_count", mode="si") == 1
    assert moved("dsd_inter_token_latency_seconds_count", mode="si") == n - 1
    assert moved("dsd_round_trip_seconds_count") == dsd["rounds"]
    assert moved("dsd_http_requests_total", path="/v1/completions", status="200") == 1
    assert after[("dsd_active_sessions", (("role", "head"),))] == 0
    assert after[("dsd_rounds_in_flight", ())] == 0
    # stage 0 computed every round of it, each with a timed forward pass
    layers = stage0.args[stage0.args.index("--layers") + 1]
    assert moved("dsd_stage_rounds_total", (stage_before, stage_after), layers=layers) == dsd["rounds"]
    assert moved("dsd_stage_forward_seconds_count", (stage_before, stage_after), layers=layers) == dsd["rounds"]
    assert ("dsd_queue_length", ()) in stage_after
    stages = {s.address for s in net.specs if s.name.startswith("stage")}
    for _ in range(60):  # the head probes its route's stages soon after start, then every 10 s
        rtt = {dict(k[1])["peer"]: v for k, v in (await _scrape(f"{base}/metrics")).items()
               if k[0] == "dsd_link_rtt_seconds"}
        if set(rtt) == stages:
            break
        await asyncio.sleep(0.5)
    assert set(rtt) == stages and all(0 < v < 10 for v in rtt.values())


async def test_a_client_that_goes_away_frees_its_session(net):
    base = net.http_url.removesuffix("/v1")
    before = await _scrape(f"{base}/metrics")
    body = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 1500, "temperature": 0, "stream": True,
            "ignore_eos": True, "mode": "ar"}
    async with aiohttp.ClientSession() as s, s.post(f"{net.http_url}/completions", json=body,
                                                    headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")  # the first chunk, then hang up
    for _ in range(100):  # the head notices at its next write and cancels the pipeline session
        after = await _scrape(f"{base}/metrics")
        if after[("dsd_active_sessions", (("role", "head"),))] == 0:
            break
        await asyncio.sleep(0.2)
    key = ("dsd_generations_total", (("mode", "ar"), ("outcome", "cancelled")))
    assert after[("dsd_active_sessions", (("role", "head"),))] == 0
    assert after.get(key, 0) - before.get(key, 0) == 1
    stage0 = next(s for s in net.specs if s.name == "stage0")
    stage_url = f"http://{stage0.args[stage0.args.index('--metrics') + 1]}/metrics"
    for _ in range(50):
        if (await _scrape(stage_url))[("dsd_active_sessions", (("role", "stage"),))] == 0:
            break
        await asyncio.sleep(0.2)
    assert (await _scrape(stage_url))[("dsd_active_sessions", (("role", "stage"),))] == 0


@pytest.mark.extended
async def test_http_bench_runs_against_the_endpoint(net, tmp_path):
    from dsd_node.ops.http_bench import main

    out = tmp_path / "bench.json"
    assert await asyncio.to_thread(main, ["--url", net.http_url, "--api-key", KEY, "--modes", "si", "--concurrency",
                                          "1,2", "--requests", "1", "--max-tokens", "6", "--json", str(out)]) == 0
    levels = json.loads(out.read_text())["levels"]
    assert [(x["mode"], x["concurrency"], x["tokens"]) for x in levels] == [("si", 1, 6), ("si", 2, 12)]
    assert all(x["tokens_per_s"] > 0 and x["ttft_ms_p50"] > 0 and x["tau"] >= 1 for x in levels)
