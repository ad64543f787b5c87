"""Soak: a 32,000-token greedy generation at B = 512 with a small random Llama (long RoPE context), recording cache
occupancy and process memory every 1,000 tokens. Passes when both stay flat after the first compaction.

    python bench/soak.py --tokens 32000 --budget 512 --out bench/results/soak.md
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import triattn_compile as tc


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32_000)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--every", type=int, default=1000, help="record every N tokens")
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.md"))
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.tokens + 64)
    model = LlamaForCausalLM(config).eval()
    tc.optimize(model, budget=args.budget)
    token = torch.randint(0, 512, (1, 16))
    cache = None
    rows = []
    start = time.perf_counter()
    with torch.no_grad():
        for step in range(1, args.tokens + 1):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
            if step % args.every == 0:
                rows.append({"tokens": cache.tokens_seen(), "occupied slots": cache.occupancy()[0],
                             "peak slots": cache.peak_occupancy(), "compactions": cache.compactions(),
                             "KV MiB": round(cache.kv_bytes() / 2**20, 2), "RSS MiB": round(rss_mib(), 1),
                             "elapsed s": round(time.perf_counter() - start, 1)})
                print(json.dumps(rows[-1]), flush=True)
    after_first = [r for r in rows if r["compactions"] > 0]
    steady = after_first[1:]  # skip the first record after the first compaction (allocator warm-up)
    rss = [r["RSS MiB"] for r in steady]
    occupancy_flat = all(r["occupied slots"] <= args.budget + 128 and r["peak slots"] == args.budget + 128
                         for r in after_first)
    rss_growth = max(rss) - min(rss) if rss else float("nan")
    verdict = {"occupancy bounded by budget + 128": occupancy_flat,
               "RSS growth after warm-up MiB": round(rss_growth, 1),
               "RSS flat (growth < 2%)": rss_growth < 0.02 * min(rss)}
    from tabulate import tabulate

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join([
        f"# Soak: {args.tokens} tokens at B = {args.budget}", "",
        f"Command: `python bench/soak.py --tokens {args.tokens} --budget {args.budget}` "
        f"(CPU, torch {torch.__version__}, Inductor; a random 4-layer Llama, 4 heads / 2 KV heads, head_dim 64)", "",
        tabulate(rows, headers="keys", tablefmt="github"), "", tabulate([verdict], headers="keys", tablefmt="github"),
        "",
    ]))
    print(json.dumps(verdict))
    return 0 if occupancy_flat and verdict["RSS flat (growth < 2%)"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
