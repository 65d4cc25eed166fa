"""The OpenAI request parser, stop sequences, incremental text and error shapes, without processes or model weights
(the embedded tokenizer only); the node's metrics on their own registry."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dsd_node.engine.config import ErrorCode, GenerationConfig, Stats
from dsd_node.engine.models import load_tokenizer
from dsd_node.engine.verify import Rule
from dsd_node.net.metrics import NodeMetrics, parse_host_port
from dsd_node.net.openai_protocol import ApiError, Detokenizer, StopScanner, parse_request

MODEL = "embedded:target"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(MODEL)


def parse(tok, body: dict, chat: bool = False):
    return parse_request({"model": MODEL, **body}, chat, tok, MODEL, 2048)


def test_request_defaults_and_dsd_fields(tok):
    r = parse(tok, {"prompt": "def f(x):"})
    assert r.prompt_ids == tok("def f(x):")["input_ids"] and r.config.max_new_tokens == 16  # OpenAI's default
    assert r.config.sampling.rule == Rule.SAMPLE and r.config.sampling.temperature == 1.0  # OpenAI's default too
    r = parse(tok, {"prompt": [[5, 6, 7]], "max_tokens": 9, "temperature": 0, "mode": "dsi", "draft_k": 6,
                    "max_inflight": 3, "min_valid_prob": 0, "stop": "\n\n", "stream": True, "stream_options": {"include_usage": True},
                    "user": "ignored", "presence_penalty": 0})
    assert r.prompt_ids == [5, 6, 7] and r.stop == ["\n\n"] and r.stream and r.include_usage
    c = r.config
    assert (c.mode, c.max_new_tokens, c.draft_k, c.max_inflight, c.sampling.rule) == ("dsi", 9, 6, 3, Rule.GREEDY)
    assert c.min_valid_prob == 0
    assert parse(tok, {"prompt": "x"}).config.min_valid_prob == GenerationConfig.min_valid_prob
    assert parse(tok, {"prompt": "x", "adaptive": True}).config.sampling.rule == Rule.ADAPTIVE  # greedy underneath
    r = parse(tok, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, chat=True)
    assert r.prompt_ids == tok("user: hi\nassistant:")["input_ids"] and r.config.max_new_tokens == 512


@pytest.mark.parametrize("body, status, text", [
    ({"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ({"prompt": "x", "model": None}, 400, "model is required"),
    ({}, 400, "prompt is required"),
    ({"prompt": ""}, 400, "empty"),
    ({"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ({"prompt": [1, True]}, 400, "list of token ids"),
    ({"prompt": [4096]}, 400, "outside the vocabulary"),
    ({"prompt": "x", "max_tokens": "7"}, 400, "max_tokens must be a number"),
    ({"prompt": "x", "temperature": 2.5}, 400, "between 0 and 2"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "temperature": 0.5, "adaptive": True}, 400, "temperature 0"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"prompt": "x", "stop": [1]}, 400, "list of strings"),
    ({"prompt": "x", "logprobs": 2}, 400, "not supported"),
    ({"prompt": "x", "mode": "turbo"}, 400, "mode must be one of"),
    ({"prompt": "x", "draft_k": 0}, 400, "draft_k"),
    ({"prompt": "x", "min_valid_prob": 2}, 400, "min_valid_prob"),
    ({"prompt": "x", "min_valid_prob": "high"}, 400, "min_valid_prob must be a number"),
])
def test_bad_requests_are_400_or_404_with_a_reason(tok, body, status, text):
    with pytest.raises(ApiError) as e:
        parse(tok, body)
    assert e.value.status == status and text in e.value.message, e.value.message
    err = e.value.body()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("messages", [[], "hi", [{"content": "no role"}], [{"role": "user", "content": 5}],
                                      [{"role": "user", "content": [{"type": "image_url"}]}]])
def test_bad_chat_messages(tok, messages):
    with pytest.raises(ApiError) as e:
        parse(tok, {"messages": messages}, chat=True)
    assert e.value.status == 400 and e.value.param == "messages"


def test_error_codes_map_to_http_statuses():
    assert ApiError.from_code(ErrorCode.RESOURCE_EXHAUSTED, "full").status == 429
    assert ApiError.from_code(ErrorCode.UNAVAILABLE, "down").status == 503
    assert ApiError.from_code(ErrorCode.INVALID_ARGUMENT, "bad").status == 400
    assert ApiError.from_code(ErrorCode.DEADLINE_EXCEEDED, "stuck").status == 504


def test_stop_scanner_holds_back_a_possible_stop_and_cuts_before_it():
    s = StopScanner(["STOP", "\n\n"])
    out = [s.feed(p) for p in ["abc S", "T", "xyz\n", "more", " ST", "OP tail"]]
    assert out == ["abc ", "", "STxyz", "\nmore", " ", ""] and s.hit
    assert "".join(out) == "abc STxyz\nmore "
    s = StopScanner(["zz"])
    assert s.feed("ab z") == "ab " and s.flush() == "z" and not s.hit
    assert StopScanner([]).feed("anything") == "anything"


def test_detokenizer_adds_text_in_context_without_special_tokens(tok):
    ids = tok("def fibonacci(n):\n    return n")["input_ids"] + [tok.eos_token_id]
    d = Detokenizer(tok)
    text = "".join(d.add([t]) for t in ids) + d.flush()
    assert text == "def fibonacci(n):\n    return n"


def test_metrics_registry_is_per_node_and_counts_a_generation():
    a, b = NodeMetrics(), NodeMetrics()  # two nodes in one process: no clash on a global registry
    st = Stats("si", rounds=3, rounds_wasted=1, accepted_per_round=[2, 3], new_tokens=5)
    a.generation_started(7)
    a.tokens_emitted("si", 2, 0.1, None)
    a.tokens_emitted("si", 3, 0.3, 0.2)
    a.generation_finished(st)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(a.exposition().decode()) for s in f.samples}
    assert samples[("dsd_generations_total", (("mode", "si"), ("outcome", "ok")))] == 1
    assert samples[("dsd_generated_tokens_total", (("mode", "si"),))] == 5
    assert samples[("dsd_prompt_tokens_total", ())] == 7
    assert samples[("dsd_rounds_wasted_total", (("mode", "si"),))] == 1
    assert samples[("dsd_time_to_first_token_seconds_count", (("mode", "si"),))] == 1
    assert samples[("dsd_inter_token_latency_seconds_count", (("mode", "si"),))] == 4
    assert samples[("dsd_tokens_per_round_sum", (("mode", "si"),))] == 5
    assert b"dsd_generations_total{" not in b.exposition()


def test_host_port_parsing():
    assert parse_host_port("auto", "--http") == ("127.0.0.1", 0)
    assert parse_host_port("0.0.0.0:8000", "--http") == ("0.0.0.0", 8000)
    for bad in ("8000", "host:", "host:port", ":80"):
        with pytest.raises(ValueError, match="not HOST:PORT"):
            parse_host_port(bad, "--http")
