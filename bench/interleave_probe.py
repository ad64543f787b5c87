"""Does a full-attention decode at long context, interleaved step by step, slow the optimized model's own step?

One process, SmolLM2-135M: the optimized model (B=1024, compiled) decodes alone, then alternating one step each with
eager sdpa holding a long context, then with sdpa holding only the prompt, then alone again. Prints the optimized
step's median in each phase. Run on a quiet machine:

    python bench/interleave_probe.py --dtype bfloat16 --threads 2
"""

from __future__ import annotations

import statistics
import time

import torch
from script_setup import load, model_parser
from transformers import DynamicCache

import triattn_compile as tc
from triattn_compile.bench import _replica, prompt_ids, text_ids


def main() -> None:
    parser = model_parser(__doc__, dtype="bfloat16", threads=2)
    parser.add_argument("--context", type=int, default=7000, help="tokens the long sdpa cache holds")
    parser.add_argument("--steps", type=int, default=200, help="optimized steps per phase")
    args = parser.parse_args()
    model, tokenizer = load(args)
    opt = tc.optimize(_replica(model), budget=1024)

    with torch.no_grad():
        ids = prompt_ids(tokenizer, 1)
        out = opt(input_ids=ids)
        token, cache = out.logits[:, -1:].argmax(-1), out.past_key_values

        def opt_step() -> float:
            nonlocal token
            t0 = time.perf_counter()
            token = opt(input_ids=token, past_key_values=cache).logits[:, -1:].argmax(-1)
            return time.perf_counter() - t0

        def sdpa_cache(tokens: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
            full = DynamicCache(config=model.config)
            for chunk in tokens.split(1024, dim=1):
                logits = model(input_ids=chunk, past_key_values=full).logits
            return full, logits[:, -1:].argmax(-1)

        def phase(name: str, other=None) -> None:
            times = []
            for _ in range(args.steps):
                if other is not None:
                    other()
                times.append(opt_step())
            print(f"{name:<44} optimized step median {1000 * statistics.median(times):6.1f} ms")

        def sdpa_stepper(full: DynamicCache, tok: torch.Tensor):
            def step() -> None:
                nonlocal tok
                tok = model(input_ids=tok, past_key_values=full).logits[:, -1:].argmax(-1)
            return step

        for _ in range(3):
            opt_step()  # warm-up (compilation)
        phase("alone")
        long_cache, long_tok = sdpa_cache(text_ids(tokenizer, args.context))
        phase(f"interleaved with sdpa at {args.context} tokens", sdpa_stepper(long_cache, long_tok))
        del long_cache
        short_cache, short_tok = sdpa_cache(ids)
        phase(f"interleaved with sdpa at {ids.shape[1]} tokens", sdpa_stepper(short_cache, short_tok))
        phase("alone again")


if __name__ == "__main__":
    main()
