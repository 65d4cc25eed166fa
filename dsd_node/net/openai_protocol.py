"""The OpenAI API's shapes, without any HTTP: request bodies parsed and checked into one `ApiRequest`, errors in
OpenAI's JSON error shape (`ApiError`), streamed text held back at a possible stop sequence (`StopScanner`),
committed tokens turned into text (`Detokenizer`), chat messages into a prompt, and response bodies.

dsd's own settings ride along as extra body fields (`mode`, `draft_k`, `max_inflight`, `min_valid_prob`, `adaptive`,
`adaptive_margin`, `adaptive_tie_margin`, `ignore_eos`, and the draft tree's `branch`, `branch_depth`,
`max_nodes`); dsd's stats come back in an extra `dsd` field.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Any

from dsd_node.engine.config import MODES, ErrorCode, GenerationConfig, Stats, TreeShape
from dsd_node.engine.verify import DEFAULT_ADAPTIVE_MARGIN, DEFAULT_ADAPTIVE_TIE_MARGIN, SamplingParams

DEFAULT_MAX_TOKENS = 16  # /v1/completions, as OpenAI's
DEFAULT_CHAT_MAX_TOKENS = 512  # /v1/chat/completions: the context left, at most this
MAX_STOPS = 4
# for a tokenizer without a chat template (the embedded pair): one line per message, then the assistant's turn
SIMPLE_CHAT_TEMPLATE = "{role}: {content}\n"
SIMPLE_CHAT_PROMPT = "assistant:"

HTTP_STATUS = {ErrorCode.INVALID_ARGUMENT: 400, ErrorCode.FAILED_PRECONDITION: 400,
               ErrorCode.RESOURCE_EXHAUSTED: 429, ErrorCode.UNAVAILABLE: 503, ErrorCode.DEADLINE_EXCEEDED: 504}
ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
              429: "rate_limit_error", 503: "server_error", 504: "server_error"}


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @classmethod
    def from_code(cls, code: ErrorCode, message: str) -> ApiError:
        return cls(HTTP_STATUS.get(code, 503), message, code=code.name.lower())

    def body(self) -> dict:
        kind = ERROR_TYPE.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind,
                          "param": self.param, "code": self.code}}


@dataclass
class ApiRequest:
    """One completion or chat completion request, checked."""

    chat: bool
    prompt_ids: list[int]
    config: GenerationConfig
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    model: str = ""


def _field(body: dict, name: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    """body[name] if it has one of `kinds` (bool is not a number here), default if absent or null."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        names = " or ".join("a number" if k in (int, float) else {str: "a string", bool: "a boolean", list: "a list",
                                                                  dict: "an object"}.get(k, k.__name__) for k in kinds)
        raise ApiError(400, f"{name} must be {names}", param=name)
    return v


def _unsupported(body: dict) -> None:
    """OpenAI parameters this server cannot honour, when they ask for something other than the default."""
    checks = {"n": lambda v: v not in (None, 1), "best_of": lambda v: v not in (None, 1),
              "echo": lambda v: v not in (None, False), "logprobs": lambda v: v not in (None, False, 0),
              "top_logprobs": lambda v: v not in (None, 0), "suffix": lambda v: v not in (None, ""),
              "logit_bias": lambda v: v not in (None, {}), "presence_penalty": lambda v: v not in (None, 0, 0.0),
              "frequency_penalty": lambda v: v not in (None, 0, 0.0), "tools": lambda v: v not in (None, []),
              "functions": lambda v: v not in (None, []),
              "response_format": lambda v: v not in (None, {"type": "text"})}
    for name, bad in checks.items():
        if name in body and bad(body[name]):
            raise ApiError(400, f"{name}={body[name]!r} is not supported by this server", param=name)


def parse_request(body: Any, chat: bool, tokenizer, model_id: str, max_positions: int | None,
                  default_max_inflight: int = 0) -> ApiRequest:
    """The request a JSON body asks for; ApiError (400, or 404 for another model) when it cannot be served."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _field(body, "model", (str,))
    if model is None:
        raise ApiError(400, "model is required (GET /v1/models lists it)", param="model")
    if model != model_id:
        raise ApiError(404, f"the model {model!r} does not exist here; this server has {model_id!r}", param="model",
                       code="model_not_found")
    _unsupported(body)
    ids = chat_prompt_ids(body, tokenizer) if chat else completion_prompt_ids(body, tokenizer)
    if chat:
        max_tokens = _field(body, "max_completion_tokens", (int,), _field(body, "max_tokens", (int,)))
        if max_tokens is None:
            left = (max_positions - len(ids)) if max_positions else DEFAULT_CHAT_MAX_TOKENS
            max_tokens = max(1, min(DEFAULT_CHAT_MAX_TOKENS, left))
    else:
        max_tokens = _field(body, "max_tokens", (int,), DEFAULT_MAX_TOKENS)
    if max_tokens < 1:
        raise ApiError(400, "max_tokens must be at least 1", param="max_tokens")
    stream_options = _field(body, "stream_options", (dict,), {})
    return ApiRequest(chat, ids, generation_config(body, max_tokens, default_max_inflight), parse_stop(body),
                      bool(_field(body, "stream", (bool,), False)), bool(stream_options.get("include_usage")), model)


def completion_prompt_ids(body: dict, tokenizer) -> list[int]:
    """`prompt`: a string, a list of token ids, or a list holding one of those."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    elif prompt is None:
        raise ApiError(400, "prompt is required", param="prompt")
    else:
        raise ApiError(400, "prompt must be a string or a list of token ids (one prompt per request)", param="prompt")
    if not ids:
        raise ApiError(400, "prompt is empty", param="prompt")
    if any(not 0 <= t < len(tokenizer) for t in ids):
        raise ApiError(400, f"prompt has a token id outside the vocabulary (0..{len(tokenizer) - 1})", param="prompt")
    return ids


def _message_text(m: Any, i: int) -> tuple[str, str]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ApiError(400, f"messages[{i}] must be an object with a role and content", param="messages")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
    return m["role"], content


def chat_prompt_ids(body: dict, tokenizer) -> list[int]:
    """Messages through the tokenizer's chat template, or SIMPLE_CHAT_TEMPLATE when it has none."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    turns = [_message_text(m, i) for i, m in enumerate(messages)]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "".join(SIMPLE_CHAT_TEMPLATE.format(role=r, content=c) for r, c in turns) + SIMPLE_CHAT_PROMPT
    return tokenizer(text)["input_ids"]


def parse_stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "stop must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop takes at most {MAX_STOPS} sequences", param="stop")
    return [s for s in stops if s]


def generation_config(body: dict, max_tokens: int, default_max_inflight: int) -> GenerationConfig:
    """Sampling (OpenAI's defaults: temperature 1, top_p 1, a random seed) and dsd's own fields."""
    adaptive = bool(_field(body, "adaptive", (bool,), False))
    temperature = float(_field(body, "temperature", (int, float), 0.0 if adaptive else 1.0))
    if not 0 <= temperature <= 2:
        raise ApiError(400, "temperature must be between 0 and 2", param="temperature")
    seed = _field(body, "seed", (int,))
    mode = _field(body, "mode", (str,), "si")
    if mode not in MODES:
        raise ApiError(400, f"mode must be one of {', '.join(MODES)}", param="mode")
    try:
        sampling = SamplingParams.create(temperature, float(_field(body, "top_p", (int, float), 1.0)),
                                         secrets.randbits(31) if seed is None else seed, adaptive,
                                         float(_field(body, "adaptive_margin", (int, float), DEFAULT_ADAPTIVE_MARGIN)),
                                         float(_field(body, "adaptive_tie_margin", (int, float), DEFAULT_ADAPTIVE_TIE_MARGIN)))
        tree = TreeShape(**{f.name: _field(body, f.name, (int,), f.default) for f in fields(TreeShape)})
        cfg = GenerationConfig(mode=mode, max_new_tokens=max_tokens, draft_k=_field(body, "draft_k", (int,), 4),
                               tree=tree, max_inflight=_field(body, "max_inflight", (int,), 0) or default_max_inflight,
                               min_valid_prob=float(_field(body, "min_valid_prob", (int, float),
                                                           GenerationConfig.min_valid_prob)),
                               sampling=sampling, ignore_eos=bool(_field(body, "ignore_eos", (bool,), False)))
        cfg.validate()
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    return cfg


class StopScanner:
    """Text as it streams, cut before the first stop sequence; text that may be the start of one is held back."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""
        self.sent = 0  # characters handed out
        self.hit = False

    def feed(self, new: str) -> str:
        """Add text; return what can be sent now (after a hit: nothing more)."""
        if self.hit:
            return ""
        self.text += new
        found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            self.text = self.text[:min(found)]
            return self.flush()
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        safe = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:safe], safe
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


class Detokenizer:
    """Committed token ids to new text, decoded in context (merges stay right), without special tokens; a trailing
    incomplete UTF-8 character waits for the tokens that complete it."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.done = 0  # characters handed out

    def add(self, tokens: list[int]) -> str:
        self.ids += tokens
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        end = len(text.rstrip("\ufffd"))
        out, self.done = text[self.done:end], max(self.done, end)
        return out

    def flush(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        out, self.done = text[self.done:], len(text)
        return out


def usage(n_prompt: int, n_completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def dsd_extra(stats: Stats) -> dict:
    """dsd's stats for the extra `dsd` field: tau (tokens per round), rounds, wasted rounds, speed."""
    return {"tau": round(stats.tokens_per_round, 3), **stats.as_dict()}


@dataclass
class ResponseIds:
    chat: bool
    model: str
    id: str = ""
    created: int = 0

    def __post_init__(self):
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, text: str, finish_reason: str, n_prompt: int, stats: Stats) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {**self._base("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": usage(n_prompt, stats.new_tokens), "dsd": dsd_extra(stats)}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        """A streamed chunk: text, or the closing one with finish_reason (text None)."""
        if self.chat:
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return {**self._base("text_completion"), "choices": [choice]}

    def usage_chunk(self, n_prompt: int, n_completion: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(obj), "choices": [], "usage": usage(n_prompt, n_completion)}
