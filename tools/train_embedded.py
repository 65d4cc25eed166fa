"""Train the embedded default model pair (target + drafter) that ships with dsd.

Both models are small Llama-architecture models trained on Python source code (the
standard library of the interpreter that runs this script), sharing one byte-level BPE
tokenizer. The drafter is distilled from the target so that its drafts are accepted often.
Weights are stored in float16 (half the repo size); dsd computes in float32 by default.

    python tools/train_embedded.py --out dsd_node/embedded --steps 600
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import ByteLevelBPETokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def corpus_files(max_bytes: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    random.Random(0).shuffle(files)
    out, total = [], 0
    for p in files:
        size = p.stat().st_size
        if total + size > max_bytes:
            continue
        out.append(p)
        total += size
    return out


def train_tokenizer(files: list[Path], out: Path, vocab: int) -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train([str(p) for p in files], vocab_size=vocab, min_frequency=2, special_tokens=[EOS])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    tok.save_pretrained(out)
    return tok


def model_config(tok, hidden: int, layers: int, heads: int, kv_heads: int, inter: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=inter, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )


def batches(ids: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        yield torch.stack([ids[s : s + seq] for s in starts])


def train(model, data, steps: int, lr: float, name: str, teacher=None) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    t0 = time.time()
    for step in range(steps):
        warm = min(1.0, (step + 1) / 50)
        for g in opt.param_groups:
            g["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = next(data)
        logits = model(input_ids=x).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        if teacher is not None:
            with torch.no_grad():
                soft = F.softmax(teacher(input_ids=x).logits[:, :-1], dim=-1)
            kl = F.kl_div(F.log_softmax(logits, -1), soft, reduction="batchmean") / x.size(1)
            loss = 0.5 * loss + 0.5 * kl
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"[{name}] step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)


def save(model, tok, out: Path) -> None:
    model.half().save_pretrained(out)
    tok.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["dtype"] = "float32"  # stored as float16, computed in float32
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("dsd_node/embedded"))
    ap.add_argument("--corpus-mb", type=float, default=6.0)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--drafter-steps", type=int, default=400)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    files = corpus_files(int(args.corpus_mb * 1e6))
    tmp = args.out / "_tokenizer"
    tok = train_tokenizer(files, tmp, args.vocab)
    text = EOS.join(p.read_text(errors="ignore") for p in files)
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    print(f"corpus: {len(files)} files, {len(ids)} tokens, vocab {len(tok)}", flush=True)
    gen = torch.Generator().manual_seed(0)
    target = LlamaForCausalLM(model_config(tok, 256, 8, 4, 2, 512))
    train(target, batches(ids, args.seq, args.batch, gen), args.steps, 2e-3, "target")
    target.eval()
    drafter = LlamaForCausalLM(model_config(tok, 128, 2, 4, 2, 256))
    train(drafter, batches(ids, args.seq, args.batch, gen), args.drafter_steps, 3e-3, "drafter", teacher=target)
    save(target, tok, args.out / "target")
    save(drafter, tok, args.out / "drafter")
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
