"""A quality measure for lossy decoding that works for any causal LM: the target's own log-probability
of what was generated.

For a prompt x and a continuation y_1..y_n, the score is the mean over positions of
log p_target(y_i | x, y_<i), in nats per token (teacher forcing: one forward pass of the unsharded
target over prompt + continuation). Greedy decoding picks each step's likeliest token, so a lossy
continuation (adaptive verification) usually scores lower; the gap to greedy's continuation of the
same prompt and length,

    delta = mean_logprob(lossy) - mean_logprob(greedy)      (nats per token, <= 0 as a rule)

is reported with its perplexity ratio exp(-delta) (1.10: 10 % higher perplexity than greedy's own
text, as the target itself judges it). It needs no reference text, no task and no second model.

A sequence's log-probability is not monotone in how often a decoder leaves greedy's choice (greedy
text can wander into unlikely places later, and lossy text can fall into a likely repetition), so a
local measure is reported beside it: the mean regret, log p(y_i | context) - max_v log p(v | context)
over the generated positions, in the text's own contexts. It is 0 for greedy output, never positive,
and counts each token a lossy rule accepted in place of the target's choice by how much less likely
the target found it (exp(-regret) is the factor by which the target, on average, preferred its own token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class ContinuationScorer:
    """The target's mean log-probability of a continuation (nats/token); loads the unsharded model once."""

    def __init__(self, model: str = "embedded:target", device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        from dsd_node.engine.models import resolve_model_path

        self.model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model), dtype=torch.float32).to(device)
        self.model.eval()
        self.device = device

    @torch.no_grad()
    def token_logprobs(self, prompt_ids: list[int], continuation: list[int]) -> tuple[list[float], list[float]]:
        """(log p(y_i | prompt, y_<i), max_v log p(v | prompt, y_<i)) for every continuation token, in one pass."""
        if not continuation:
            return [], []
        ids = torch.tensor([list(prompt_ids) + list(continuation)], device=self.device)
        logits = self.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
        lp = F.log_softmax(logits, dim=-1)
        got = lp.gather(-1, torch.tensor(continuation, device=self.device)[:, None])[:, 0]
        return got.tolist(), lp.max(-1).values.tolist()

    def score(self, prompt_ids: list[int], continuation: list[int]) -> tuple[float, float]:
        """(mean log-probability, mean regret) of a continuation, nats per token."""
        lps, tops = self.token_logprobs(prompt_ids, continuation)
        if not lps:
            return 0.0, 0.0
        return sum(lps) / len(lps), sum(a - b for a, b in zip(lps, tops, strict=True)) / len(lps)

    def mean_logprob(self, prompt_ids: list[int], continuation: list[int]) -> float:
        return self.score(prompt_ids, continuation)[0]


@dataclass
class QualityGap:
    """Mean log-probabilities over a prompt set, a lossy decoder's against greedy's."""

    mean_logprob: float  # nats per token, averaged over prompts
    greedy_mean_logprob: float
    mean_regret: float = 0.0  # nats per token (<= 0), averaged over prompts

    @property
    def delta(self) -> float:
        return self.mean_logprob - self.greedy_mean_logprob

    @property
    def ppl_ratio(self) -> float:
        """exp(-delta): the lossy text's perplexity under the target over greedy's (1.0 = as likely)."""
        return math.exp(-self.delta)

    @property
    def regret_ratio(self) -> float:
        """exp(-mean regret): how many times likelier, on average, the target found its own token."""
        return math.exp(-self.mean_regret)
