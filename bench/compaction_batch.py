"""Compaction of a batch: one call for the rows on the same schedule vs one call per row (SmolLM2-135M, real text).

    python bench/compaction_batch.py [--batch 8] [--budget 1024] [--reps 7] [--threads 2] [--dtype bfloat16]

One row's cache is filled with ``budget + 127`` tokens of real text (no prompt protection), repeated to ``--batch``
rows; then, alternately on fresh copies, the rows are compacted one by one and all together. Prints the median
seconds of each and their ratio (same process, same cache contents), and checks that both leave the same cache.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from script_setup import load, model_parser

import triattn_compile as tc
from triattn_compile.bench import text_ids


def _timed_compaction(cache, compressor: tc.Compressor, groups: list[slice]) -> float:
    start = time.perf_counter()
    for rows in groups:
        compressor.compact(cache, rows)
    if cache.ctrl.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    model, tokenizer = load(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    tc.optimize(model, budget=args.budget, protect_prompt=False, compiler="eager")
    state = tc.inspect(model)
    model(input_ids=text_ids(tokenizer, args.budget + 127).to(device), use_cache=True)  # one slot short of full
    full = tc.current_cache(model)
    full.repeat_rows(args.batch)
    per_row = [slice(b, b + 1) for b in range(args.batch)]
    together = [slice(0, args.batch)]
    times: dict[str, list[float]] = {"one call per row": [], "one call for the batch": []}
    for _ in range(args.reps):
        for name, groups in (("one call per row", per_row), ("one call for the batch", together)):
            cache = copy.deepcopy(full)
            times[name].append(_timed_compaction(cache, state, groups))
            if name == "one call per row":
                reference = cache
    if not all(torch.equal(a.keys, b.keys) for a, b in zip(cache.layers, reference.layers)):
        raise SystemExit("compacting the rows together kept other keys than compacting them one by one")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in medians.items():
        print(f"{name}: {1000 * seconds:.1f} ms (median of {args.reps})")
    ratio = medians["one call for the batch"] / medians["one call per row"]
    print(f"batch {args.batch}, budget {args.budget}, {args.dtype}, {device}: together / per row = {ratio:.3f}")


if __name__ == "__main__":
    main()
