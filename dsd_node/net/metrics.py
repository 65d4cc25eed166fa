"""Prometheus metrics of one node: one `NodeMetrics` object per node, on its own CollectorRegistry (no globals).

The gateway, the stage service and the HTTP API call a few methods of it where they already compute the
numbers (a generation's Stats, a stage's forward pass); gauges that mirror live state (sessions, rounds in
flight, queued rounds, excluded peers) read it when scraped. `serve_metrics` serves `/metrics` over aiohttp on
the node's own asyncio loop.

Names (all prefixed `dsd_`): see `README.md`, "OpenAI-compatible API and metrics".
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from dsd_node.engine.config import Stats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   30.0)
TOKENS_PER_ROUND_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 12, 16, 32, 64)


class NodeMetrics:
    """Every metric a node exposes. Head metrics stay at zero on a stage and the other way round."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        # head / gateway
        self.generations = Counter("dsd_generations", "Generations finished, by mode and outcome (ok or an error code)",
                                   ["mode", "outcome"], registry=r)
        self.prompt_tokens = Counter("dsd_prompt_tokens", "Prompt tokens of generations started", registry=r)
        self.generated_tokens = Counter("dsd_generated_tokens", "Tokens generated (committed), by mode", ["mode"],
                                        registry=r)
        self.ttft = Histogram("dsd_time_to_first_token_seconds", "Time from a generation's start to its first token",
                              ["mode"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("dsd_inter_token_latency_seconds",
                             "Time between tokens after the first (a round's gap shared by the tokens it committed)",
                             ["mode"], buckets=LATENCY_BUCKETS, registry=r)
        self.rounds = Counter("dsd_rounds", "Rounds sent down the pipeline, by mode", ["mode"], registry=r)
        self.rounds_wasted = Counter("dsd_rounds_wasted", "Rounds given up (drafted on a rejected assumption)", ["mode"],
                                     registry=r)
        self.tokens_per_round = Histogram("dsd_tokens_per_round", "Tokens committed by one round's verdict", ["mode"],
                                          buckets=TOKENS_PER_ROUND_BUCKETS, registry=r)
        self.round_trip = Histogram("dsd_round_trip_seconds", "Head: a round sent to the first stage until its verdict",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.failovers = Counter("dsd_failovers", "Times the gateway re-routed a generation around a failed stage",
                                 registry=r)
        self.link_rtt = Gauge("dsd_link_rtt_seconds", "Head: last measured round trip of an Info call to a route's stage",
                              ["peer"], registry=r)
        self.http_requests = Counter("dsd_http_requests", "OpenAI-compatible HTTP API requests, by path and status",
                                     ["path", "status"], registry=r)
        # stage
        self.forward = Histogram("dsd_stage_forward_seconds", "Stage: time to run one round (layers, and the "
                                 "verification on the last stage)", ["layers"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage_rounds = Counter("dsd_stage_rounds", "Stage: rounds handled", ["layers"], registry=r)
        self.stage_sessions = Counter("dsd_stage_sessions", "Stage: sessions opened, by how their rounds come "
                                      "(grpc; in_process: from this node's own head)", ["transport"], registry=r)
        # live state, read when scraped (set_source)
        self.active_sessions = Gauge("dsd_active_sessions", "Sessions open now (head: generations; stage: KV sessions)",
                                     ["role"], registry=r)
        self.rounds_in_flight = Gauge("dsd_rounds_in_flight", "Head: rounds sent and not yet answered, all sessions",
                                      registry=r)
        self.queue_length = Gauge("dsd_queue_length", "Stage: rounds received and waiting for compute, all sessions",
                                  registry=r)
        self.verification = Counter("dsd_verification_rounds", "Head: rounds by output verification result (skipped: "
                                    "not sampled; agree, mismatch: re-run on independent replicas; unverifiable: "
                                    "no other replica announced)", ["result"], registry=r)
        self.banned_peers = Gauge("dsd_banned_peers", "Head: peers banned by output verification", registry=r)
        self.excluded_peers = Gauge("dsd_excluded_peers", "Head: peers excluded from routes after failing",
                                    registry=r)

    @staticmethod
    def set_source(gauge: Gauge, fn: Callable[[], float]) -> None:
        """Make a gauge read `fn()` whenever it is scraped."""
        gauge.set_function(fn)

    def generation_started(self, n_prompt: int) -> None:
        self.prompt_tokens.inc(n_prompt)

    def tokens_emitted(self, mode: str, n: int, since_start_s: float, since_last_s: float | None) -> None:
        """A round committed n tokens: the first ever of the generation (since_last_s None) or later ones."""
        if n <= 0:
            return
        if since_last_s is None:
            self.ttft.labels(mode).observe(since_start_s)
            n -= 1
            since_last_s = 0.0
        for _ in range(n):  # a round's gap is shared by the tokens it brings
            self.itl.labels(mode).observe(since_last_s / max(1, n))

    def generation_finished(self, stats: Stats, outcome: str = "ok") -> None:
        m = stats.mode
        self.generations.labels(m, outcome).inc()
        self.generated_tokens.labels(m).inc(stats.new_tokens)
        self.rounds.labels(m).inc(stats.rounds)
        self.rounds_wasted.labels(m).inc(stats.rounds_wasted)
        self.failovers.inc(stats.failovers)
        for k in stats.accepted_per_round:
            self.tokens_per_round.labels(m).observe(k)

    def stage_round(self, layers: str, seconds: float) -> None:
        self.forward.labels(layers).observe(seconds)
        self.stage_rounds.labels(layers).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def metrics_response(metrics: NodeMetrics) -> web.Response:
    return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve_metrics(metrics: NodeMetrics, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve GET /metrics on host:port (port 0: a free one) on the running loop; returns the runner and the port."""
    app = web.Application()

    async def handle(_request: web.Request) -> web.Response:
        return metrics_response(metrics)

    app.router.add_get("/metrics", handle)
    return await start_site(app, host, port)


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start an aiohttp app on the running asyncio loop (no thread of its own); returns the runner and the bound port."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1] if port == 0 else port  # noqa: SLF001 (aiohttp has no public getter)
    return runner, bound


def parse_host_port(value: str, what: str) -> tuple[str, int]:
    """HOST:PORT, or `auto` (127.0.0.1, a free port); ValueError with a one-line reason."""
    if value == "auto":
        return "127.0.0.1", 0
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{what} {value!r} is not HOST:PORT (or auto)")
    return host.strip("[]"), int(port)
