"""The whole engine in one process: every shard, the drafter and the head, for the API and `dsd generate --local`."""

from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, dataclass, field

import torch

from dsd_node.engine.config import DrafterSpec, GenerationConfig, Stats
from dsd_node.engine.device import default_threads, resolve_device
from dsd_node.engine.drafter import Draft, Drafter, DraftRequest
from dsd_node.engine.head import Head
from dsd_node.engine.limits import check_context
from dsd_node.engine.messages import RoundMsg, VerdictMsg
from dsd_node.engine.models import (
    check_same_tokenizer,
    load_config,
    load_shard,
    load_tokenizer,
    max_positions,
    model_num_layers,
    split_layers,
)
from dsd_node.engine.shard_runner import ShardRunner
from dsd_node.engine.speculation import PolicyMemory
from dsd_node.engine.stage import StageHandler
from dsd_node.engine.verify import low_importance_mask


class LocalPipeline:
    """Runs each round through in-process stage handlers, in order, and queues the verdicts."""

    def __init__(self, stages: list[StageHandler]):
        self.stages = stages
        self.verdicts: asyncio.Queue[VerdictMsg] = asyncio.Queue()

    async def send(self, msg: RoundMsg) -> None:
        out: RoundMsg | VerdictMsg | None = msg
        for stage in self.stages:
            if not isinstance(out, RoundMsg):
                break
            out = stage.handle(out)
            await asyncio.sleep(0)  # yield to the loop between stages: Ctrl-C and other tasks get their turn
        if isinstance(out, VerdictMsg):
            self.verdicts.put_nowait(out)

    async def recv(self) -> VerdictMsg:
        return self.verdicts.get_nowait()

    def end_session(self, session_id: str) -> None:
        for stage in self.stages:
            stage.runner.end_session(session_id)


class LocalDraftSource:
    def __init__(self, drafter: Drafter):
        self.drafter = drafter

    async def draft(self, session_id: str, req: DraftRequest) -> Draft:
        return self.drafter.draft(session_id, req)

    async def end_session(self, session_id: str) -> None:
        self.drafter.end_session(session_id)


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    stats: Stats
    prompt_tokens: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "stats": self.stats.as_dict()}


class LocalEngine:
    """Target cut into `stages` in-process shards, plus a drafter ("self" drafts with the target, "oracle:ALPHA" with a calibrated acceptance).

    device: auto | cpu | cuda | cuda:N | mps; dtype: auto | bfloat16 | float16 | float32 (auto: the checkpoint's
    on a GPU, float32 on a CPU; see dsd_node.engine.device). threads: torch CPU threads for this process
    (None leaves torch's setting alone; it is process-wide)."""

    def __init__(self, model: str = "embedded:target", drafter: str | None = "embedded:drafter", stages: int = 2,
                 dtype: str = "float32", device: str = "cpu", threads: int | None = None):
        if threads is not None:  # 0: this machine's cores, capped by the model's width
            torch.set_num_threads(threads or default_threads(1, getattr(load_config(model), "hidden_size", None)))
        dev = resolve_device(device)
        self.tokenizer = load_tokenizer(model)
        spec = DrafterSpec.parse(drafter, model) if drafter else None
        if spec and not spec.is_target:
            check_same_tokenizer(self.tokenizer, load_tokenizer(spec.source), model, spec.source)
        ranges = split_layers(model_num_layers(model), stages)
        self.handlers = [StageHandler(ShardRunner(load_shard(model, a, b, dtype, dev)),
                                      low_importance=lambda: low_importance_mask(self.tokenizer)) for a, b in ranges]
        first = self.handlers[0].runner.shard
        self.device, self.dtype = first.device, first.dtype
        self.max_positions = max_positions(first.config)
        self.pipeline = LocalPipeline(self.handlers)
        self.drafter = Drafter(spec.source, dtype, device=dev, oracle_alpha=spec.oracle_alpha) if spec else None
        self.dsi_memory = PolicyMemory()  # dsi: what earlier sessions measured, for the next one

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    async def generate_async(self, prompt: str | list[int], cfg: GenerationConfig, session_id: str | None = None,
                             keep_session: bool = False) -> GenerationResult:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        check_context(len(ids), cfg.max_new_tokens, self.max_positions)
        sid = session_id or uuid.uuid4().hex
        key = (cfg.draft_k, astuple(cfg.tree))
        policy = self.dsi_memory.policy(key, cfg.min_valid_prob, len(self.handlers))
        head = Head(sid, self.pipeline, LocalDraftSource(self.drafter) if self.drafter else None, cfg,
                    self.tokenizer.eos_token_id, pipeline_depth=len(self.handlers), policy=policy)
        try:
            tokens = await head.run(ids)
            if cfg.mode == "dsi":
                self.dsi_memory.keep(key, policy)
            if keep_session:
                await head.flush()
        finally:
            if not keep_session:
                self.pipeline.end_session(sid)
                if self.drafter:
                    self.drafter.end_session(sid)
        return GenerationResult(self.tokenizer.decode(tokens), tokens, head.stats, ids)

    def generate(self, prompt: str | list[int], cfg: GenerationConfig, **kw) -> GenerationResult:
        """The blocking form of generate_async, for scripts; inside a running event loop (Jupyter,
        `python -m asyncio`) it runs the generation on a worker thread with its own loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.generate_async(prompt, cfg, **kw))
        with ThreadPoolExecutor(1, thread_name_prefix="dsd-generate") as pool:
            return pool.submit(asyncio.run, self.generate_async(prompt, cfg, **kw)).result()
