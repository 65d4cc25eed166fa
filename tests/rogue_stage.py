"""A tampered stage for the trust tests and tools/trust_bench.py: `python tests/rogue_stage.py TOKEN [dsd-node args]`
runs a dsd-node whose last shard adds a large bias to TOKEN's logit, so its verdicts commit TOKEN again and again
(the issue's "HACKED" stage). It joins through discovery like any other node and announces itself as fast as it
likes. DSD_ROGUE_FLAG=PATH: it computes honestly until PATH exists (so it passes the vetting of a newcomer),
then cheats in every round; it prints "rogue: cheated" each time it does."""

from __future__ import annotations

import os
import sys

import torch

from dsd_node import node_cli
from dsd_node.daemon import node
from dsd_node.engine import shard_runner


def main() -> None:
    token = int(sys.argv[1])
    flag = os.environ.get("DSD_ROGUE_FLAG")
    honest = shard_runner.ShardRunner.forward

    def forward(self, *args, **kwargs):
        out = honest(self, *args, **kwargs)
        if self.shard.is_last and (flag is None or os.path.exists(flag)):
            with torch.inference_mode():
                out[..., token] += 1e4
            print("rogue: cheated", flush=True)
        return out

    shard_runner.ShardRunner.forward = forward
    node.measure_tokens_per_s = lambda runner: 1e9  # and claims to be very fast, so routing picks it
    node_cli.main(sys.argv[2:])


if __name__ == "__main__":
    main()
