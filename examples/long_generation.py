"""Demo: SmolLM2-135M-Instruct writes 2,000+ tokens with a TriAttention KV cache of budget 256.

Runs full attention and the optimized model on the same chat prompt and prints tokens/s, the peak number of KV
slots each held, and the start of both texts.

    python examples/long_generation.py --budget 256 --new-tokens 2000
    python examples/long_generation.py --budget 1024 --new-tokens 8000 --dtype bfloat16   # an 8K timing via generate()
"""

from __future__ import annotations

import argparse
import time

import torch

import triattn_compile
from triattn_compile.loading import chat_ids, load_model

PROMPT = (
    "Write a detailed travel guide to an imaginary island nation: its history, its five regions, their food, "
    "festivals, wildlife and the best routes between them. Be thorough and keep going."
)


def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False,
        )
    return out[0, ids.shape[1]:], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=256, help="TriAttention KV budget per KV head")
    parser.add_argument("--new-tokens", type=int, default=2000, help="tokens to generate")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight and KV dtype")
    parser.add_argument("--skip-full", action="store_true", help="do not run the full-attention baseline")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_model(dtype=getattr(torch, args.dtype))
    ids = chat_ids(tokenizer, PROMPT)
    print(f"prompt: {ids.shape[1]} tokens; generating {args.new_tokens} tokens")

    if not args.skip_full:
        full, full_s = timed_generate(model, ids, args.new_tokens)
        print(f"full attention : {len(full) / full_s:6.1f} tok/s, peak KV slots {ids.shape[1] + len(full) - 1}")

    triattn_compile.optimize(model, budget=args.budget)
    warm_start = time.perf_counter()
    timed_generate(model, ids, 2)  # compiles the prefill and decode graphs
    print(f"compile (prefill + decode graphs): {time.perf_counter() - warm_start:.1f} s")
    comp, comp_s = timed_generate(model, ids, args.new_tokens)
    cache = triattn_compile.current_cache(model)
    print(
        f"TriAttention B={args.budget}: {len(comp) / comp_s:6.1f} tok/s, peak KV slots {cache.peak_occupancy()} "
        f"(limit {args.budget + 128}), {cache.compactions()} compactions"
    )
    if not args.skip_full:
        same = int((full[: len(comp)] == comp[: len(full)]).cumprod(0).sum())
        print(f"identical to full attention for the first {same} tokens")
        print("\n--- full attention ---\n" + tokenizer.decode(full[:300]))
    print("\n--- TriAttention ---\n" + tokenizer.decode(comp[:300]))
    print("\n--- TriAttention, last 300 tokens ---\n" + tokenizer.decode(comp[-300:]))


if __name__ == "__main__":
    main()
