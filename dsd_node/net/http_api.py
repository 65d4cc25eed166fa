"""The OpenAI-compatible HTTP API of a head node (aiohttp, on the node's own asyncio loop).

GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as server-sent events ending with
`data: [DONE]`), GET /metrics (Prometheus) and GET /health. Generations go through the same in-process path
as the gRPC Generate call (GatewayService.generate): tokens stream out as the pipeline's rounds commit.
With an API key, every /v1 request needs `Authorization: Bearer KEY` (/metrics and /health stay open, as
a scraper and a load balancer expect).
"""

from __future__ import annotations

import hmac
import json
import logging
import time

from aiohttp import web

from dsd_node.engine.config import GenerationError
from dsd_node.net.gateway import GatewayService, StopGeneration
from dsd_node.net.metrics import NodeMetrics, metrics_response, start_site
from dsd_node.net.openai_protocol import (
    ApiError,
    ApiRequest,
    Detokenizer,
    ResponseIds,
    StopScanner,
    dsd_extra,
    parse_request,
)

log = logging.getLogger("dsd.http")


class HttpApi:
    def __init__(self, gateway: GatewayService, model_id: str, metrics: NodeMetrics, api_key: str | None = None):
        self.gateway, self.model_id, self.metrics, self.api_key = gateway, model_id, metrics, api_key or None
        self.runner: web.AppRunner | None = None
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.errors_and_auth], client_max_size=16 << 20)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/health", self.health)
        return app

    async def start(self, host: str, port: int) -> int:
        """Serve on host:port (0: a free port) on the running loop; the bound port."""
        self.runner, bound = await start_site(self.app(), host, port)
        return bound

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @web.middleware
    async def errors_and_auth(self, request: web.Request, handler) -> web.StreamResponse:
        """Answer every failure in OpenAI's error shape (never a traceback for bad input) and count requests."""
        resource = getattr(request.match_info.route, "resource", None)
        path = resource.canonical if resource is not None else "other"
        try:
            if request.path.startswith("/v1/"):
                self.check_key(request)
            resp = await handler(request)
        except ApiError as e:
            resp = web.json_response(e.body(), status=e.status)
        except web.HTTPException as e:  # aiohttp's own: unknown path (404), wrong method (405), body too large (413)
            resp = web.json_response(ApiError(e.status, e.reason or "error", code=str(e.status)).body(), status=e.status,
                                     headers={k: v for k, v in e.headers.items() if k.lower() == "allow"})
        except Exception as e:  # a bug: say so in the API's shape, log the traceback
            log.exception("HTTP %s %s failed", request.method, request.path)
            resp = web.json_response(ApiError(500, f"internal error: {type(e).__name__}: {e}").body(), status=500)
        self.metrics.http_requests.labels(path, str(resp.status)).inc()
        return resp

    def check_key(self, request: web.Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("Authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY" if auth else
                           "this server needs an API key: send Authorization: Bearer KEY", code="invalid_api_key")

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.model_id:
            raise ApiError(404, f"the model {request.match_info['model']!r} does not exist here", code="model_not_found")
        return web.json_response(self._model_card())

    def _model_card(self) -> dict:
        card = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "dsd"}
        if self.gateway.cfg is not None and self.gateway.cfg.max_positions:
            card["max_model_len"] = self.gateway.cfg.max_positions
        return card

    async def metrics_page(self, _request: web.Request) -> web.Response:
        return metrics_response(self.metrics)

    async def health(self, _request: web.Request) -> web.Response:
        if self.gateway.cfg is None:
            raise ApiError(503, "gateway is still building its route")
        return web.json_response({"status": "ok"})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json(loads=json.loads)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        cfg = self.gateway.cfg
        if cfg is None:
            raise ApiError(503, "gateway is still building its route; retry shortly")
        req = parse_request(body, chat, cfg.tokenizer, self.model_id, cfg.max_positions, cfg.default_max_inflight)
        return await _Completion(request, req, ResponseIds(chat, self.model_id), cfg.tokenizer).run(self.gateway)


class _Completion:
    """One request's generation: text through the stop scanner, out as one JSON response or as SSE chunks."""

    def __init__(self, request: web.Request, req: ApiRequest, ids: ResponseIds, tokenizer):
        self.request, self.req, self.ids = request, req, ids
        self.detok, self.scanner = Detokenizer(tokenizer), StopScanner(req.stop)
        self.eos = None if req.config.ignore_eos else tokenizer.eos_token_id
        self.saw_eos = False
        self.parts: list[str] = []
        self.stream: web.StreamResponse | None = None

    async def run(self, gateway: GatewayService) -> web.StreamResponse:
        try:
            stats = await gateway.generate(self.req.prompt_ids, self.req.config, self.emit,
                                           client=f"http:{self.request.remote}")
        except ConnectionResetError:  # the client hung up mid-stream: the generation was cancelled; nothing to say
            log.info("client went away mid-stream; generation cancelled")
            return self.stream
        except GenerationError as e:
            err = ApiError.from_code(e.code, str(e))
            if self.stream is None:  # nothing sent yet: a plain error with its status
                raise err from None
            await self.event(err.body())  # mid-stream: the error as an event (the client raises it)
            await self.stream.write(b"data: [DONE]\n\n")
            return self.stream
        if not self.scanner.hit:
            await self.send(self.scanner.feed(self.detok.flush()) + (self.scanner.flush() if not self.scanner.hit else ""))
        finish = "stop" if self.scanner.hit or self.saw_eos else "length"
        n_prompt = len(self.req.prompt_ids)
        if not self.req.stream:
            return web.json_response(self.ids.response("".join(self.parts), finish, n_prompt, stats))
        await self.open_stream()
        await self.event({**self.ids.chunk(None, finish), "dsd": dsd_extra(stats)})
        if self.req.include_usage:
            await self.event(self.ids.usage_chunk(n_prompt, stats.new_tokens))
        await self.stream.write(b"data: [DONE]\n\n")
        await self.stream.write_eof()
        return self.stream

    async def emit(self, tokens: list[int], _text: str) -> None:
        if self.eos is not None and self.eos in tokens:
            self.saw_eos = True
        await self.send(self.scanner.feed(self.detok.add(tokens)))
        if self.scanner.hit:
            raise StopGeneration

    async def send(self, text: str) -> None:
        if not text:
            return
        if not self.req.stream:
            self.parts.append(text)
            return
        await self.open_stream()
        await self.event(self.ids.chunk(text))

    async def open_stream(self) -> None:
        """Send the SSE headers (200) with the first text, so that errors before it keep their own status."""
        if self.stream is not None:
            return
        self.stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                  "X-Accel-Buffering": "no"})
        await self.stream.prepare(self.request)
        if self.ids.chat:  # OpenAI's first chat chunk names the role
            await self.event(self.ids.chunk("", first=True))

    async def event(self, obj: dict) -> None:
        await self.stream.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")
