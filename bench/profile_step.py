"""Profile one optimized decode step of SmolLM2-135M with a full cache (``torch.profiler``, top ops by self time).

    python bench/profile_step.py [--budget 1024] [--steps 5] [--threads 2] [--dtype bfloat16] [--freezing]

The prompt (``budget + 76`` tokens of real text, no prompt protection) fills the cache in one prefill; the profiled
steps then run at capacity, compaction included when it falls due. Then the median of 40 unprofiled steps and the
process's peak RSS. ``--freezing``: compile with Inductor's ``freezing`` (weights folded in as constants, pre-packed
for oneDNN/MKL on CPU), which ``optimize`` does not use.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch
from script_setup import load, model_parser
from torch.profiler import profile

import triattn_compile as tc
from triattn_compile.bench import text_ids


@torch.no_grad()
def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--freezing", action="store_true", help="compile with torch._inductor.config.freezing")
    args = parser.parse_args()
    torch._inductor.config.freezing = args.freezing
    model, tokenizer = load(args)
    tc.optimize(model, budget=args.budget, protect_prompt=False)
    out = model(input_ids=text_ids(tokenizer, args.budget + 76), use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    step = lambda t: model(input_ids=t, past_key_values=tc.current_cache(model), use_cache=True).logits.argmax(-1)
    for _ in range(3):  # compile the decode graph and warm up
        token = step(token)
    with profile() as prof:
        for _ in range(args.steps):
            token = step(token)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    seconds = []
    for _ in range(40):
        start = time.perf_counter()
        token = step(token)
        seconds.append(time.perf_counter() - start)
    print(f"{args.dtype}, freezing={args.freezing}: median step {1e3 * statistics.median(seconds):.1f} ms over 40, "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
