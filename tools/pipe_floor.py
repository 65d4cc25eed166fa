"""The floor of ar through N shard processes on this machine: the shards chained by OS pipes (pickled bytes, no
gRPC, no protobuf, no checks), next to Hugging Face `generate` and to the whole model as one shard process.

    python tools/pipe_floor.py [--stages 1,2,4] [--tokens 64] [--repeats 3] [--out pipe_floor.json]

Each stage process loads its layers of the embedded target (dsd_node.engine.shard_runner, the stages' own code),
runs one round per token as a stage does (the previous token's commit, then a one-node forward) and passes its
hidden states on through a pipe; the last one returns the greedy token to the head (this process). What is left
between this and dsd's ar at the same N is the transport and the bookkeeping of the real stages. Last, it times
one ar round's protobuf decode right after sleeps of 0, 3 and 12 ms: the cost of the same Python in a process that
was idle between rounds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import torch

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]


def _stage(i: int, n: int, inbox, outbox, results) -> None:
    torch.set_num_threads(1)
    from dsd_node.engine.models import load_shard, model_num_layers, split_layers
    from dsd_node.engine.shard_runner import ShardRunner
    from dsd_node.engine.tree import TokenTree

    start, end = split_layers(model_num_layers("embedded:target"), n)[i]
    runner = ShardRunner(load_shard("embedded:target", start, end))
    forward_s: list[float] = []
    if i == n - 1:
        outbox.send("ready")
    while (msg := inbox.recv()) is not None:
        sid, rid, tokens, hidden, commit = msg
        if rid == 0:
            runner.sessions.clear()  # one session at a time: the repeat before is over
        if commit is not None:
            runner.apply(sid, [commit], set())
        t = time.perf_counter()
        tree = TokenTree(tokens, [-1] + list(range(len(tokens) - 1)), n_given=len(tokens) if rid == 0 else 0)
        h = None if hidden is None else torch.frombuffer(bytearray(hidden), dtype=torch.float32).view(1, len(tokens), -1)
        out = runner.forward(sid, rid, [], tree, hidden=h)
        if rid:
            forward_s.append(time.perf_counter() - t)
        outbox.send((rid, int(out[-1].argmax())) if runner.shard.is_last else
                    (sid, rid, tokens, out.numpy().tobytes(), commit))
    results.put((i, forward_s))
    outbox.send(None)


def chain(n: int, tokens: int, repeats: int) -> dict:
    """ms per token of ar through n shard processes (median over repeats), and each stage's median forward."""
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in range(n + 1)]  # pipes[i] into stage i; pipes[n] back to the head
    results = ctx.Queue()
    procs = [ctx.Process(target=_stage, args=(i, n, pipes[i][0], pipes[i + 1][1], results), daemon=True)
             for i in range(n)]
    for p in procs:
        p.start()
    to_first, from_last = pipes[0][1], pipes[n][0]
    assert from_last.recv() == "ready"
    runs = []
    for rep in range(repeats + 1):  # the first pass warms up
        sid = f"s{rep}"
        to_first.send((sid, 0, PROMPT, None, None))
        _, y = from_last.recv()
        commit, t0 = (0, list(range(len(PROMPT)))), time.perf_counter()
        for rid in range(1, tokens + 1):
            to_first.send((sid, rid, [y], None, commit))
            _, y = from_last.recv()
            commit = (rid, [0])
        runs.append((time.perf_counter() - t0) / tokens * 1e3)
    to_first.send(None)
    forward = dict(results.get() for _ in range(n))
    for p in procs:
        p.join()
    per_stage = [statistics.median(forward[i][tokens:]) * 1e3 for i in range(n)]
    return {"stages": n, "ms_per_token": statistics.median(runs[1:]), "runs": runs[1:], "forward_ms": per_stage,
            "forward_sum_ms": sum(per_stage)}


def hf_generate_ms(tokens: int, repeats: int) -> float:
    """HF `generate`'s ms per token on the embedded target in this process (1 thread), median after a warm-up."""
    from transformers import AutoModelForCausalLM

    from dsd_node.engine.models import resolve_model_path
    from dsd_node.ops.bench.run import hf_generate_ms_per_token

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded:target"), dtype=torch.float32).eval()
    runs = [hf_generate_ms_per_token(model, PROMPT, tokens, {}) for _ in range(repeats + 1)]
    return statistics.median(runs[1:])


def wake_tax(rounds: int = 300) -> dict[str, float]:
    """µs to decode one ar round's protobuf (wire.round_from_pb) right after a sleep of 0, 3 and 12 ms (and some
    matrix work, as a stage's forward does): what the same Python costs in a process that was idle between
    rounds, as every stage is."""
    from dsd_node.engine.messages import Hop, RoundMsg
    from dsd_node.engine.tree import TokenTree
    from dsd_node.net.wire import round_from_pb, round_to_pb

    route = [Hop(f"127.0.0.1:{5000 + i}", 2 * i, 2 * i + 2, f"peer{i}") for i in range(4)]
    msg = RoundMsg("s", 5, 0, [(4, [0])], [], TokenTree([7], [-1]), hidden=torch.randn(1, 1, 256), route=route,
                   hop=1, reply_to="127.0.0.1:9")
    _, setup = round_from_pb(round_to_pb(msg, setup=True), None)
    m, w, out = round_to_pb(msg, setup=False), torch.randn(1024, 1024), {}
    for gap_ms in (0, 3, 12):
        times = []
        for _ in range(rounds):
            time.sleep(gap_ms / 1e3)
            x = torch.randn(1, 1024)
            for _ in range(5):
                x = torch.tanh(x @ w)
            t = time.perf_counter()
            round_from_pb(m, setup)
            times.append(time.perf_counter() - t)
        out[f"{gap_ms} ms"] = statistics.median(times) * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default="1,2,4", help="comma-separated stage counts")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="pipe_floor.json")
    args = ap.parse_args()
    hf = hf_generate_ms(args.tokens, args.repeats)
    rows = [chain(int(n), args.tokens, args.repeats) for n in args.stages.split(",")]
    hf_after = hf_generate_ms(args.tokens, args.repeats)  # before and after: the machine's drift shows
    print(f"HF generate: {hf:.2f} ms/token before, {hf_after:.2f} after ({args.tokens} tokens, 1 thread)\n")
    print("| shard processes | ms/token over pipes | / HF generate | forward per stage (ms) | forward sum |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stages']} | {r['ms_per_token']:.2f} | {r['ms_per_token'] / ((hf + hf_after) / 2):.2f}x | "
              f"{', '.join(f'{x:.2f}' for x in r['forward_ms'])} | {r['forward_sum_ms']:.2f} |")
    tax = wake_tax()
    print("\ndecoding one ar round (wire.round_from_pb) after a sleep of: " +
          ", ".join(f"{k} {v:.0f} us" for k, v in tax.items()))
    with open(args.out, "w") as f:
        json.dump({"hf_generate_ms": [hf, hf_after], "tokens": args.tokens, "rows": rows,
                   "decode_us_after_sleep": tax}, f, indent=1)


if __name__ == "__main__":
    main()
