"""Time one compaction of vLLM's paged cache (``triattn_compile/vllm/compaction.py``) on SmolLM2-135M's layout and
statistics, outside vLLM: random paged KV tensors of the engine's shape, one request, torch on one thread (as vLLM's
CPU worker runs). Prints the median milliseconds per compaction at each budget.

    python bench/paged_compaction.py --stats STATS [--model HF_DIR] [--budgets 256 1024] [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import triattn_compile as tc
from triattn_compile.loading import load_model
from triattn_compile.vllm.compaction import PagedCompressor, RequestState
from triattn_compile.vllm.paged import PagedSchedule
from triattn_compile.vllm.statsfile import load_for_layout


def time_compactions(compressor_class, layout, stats, budget: int, repeat: int) -> float:
    schedule = PagedSchedule(budget, 128, 128)
    blocks = schedule.peak_blocks + 1
    torch.manual_seed(0)
    kv = [torch.randn(blocks + 1, layout.num_kv_heads, 128, 2 * layout.head_dim) for _ in range(layout.num_layers)]
    compressor = compressor_class(schedule, lambda: (layout, stats, kv))
    row = torch.arange(1, blocks + 1)  # the request's block table (block 0 is vLLM's null block)
    times = []
    for _ in range(repeat + 1):  # the first compaction of a request of B + 128 tokens, the first one untimed
        start = time.perf_counter()
        compressor.compact(row, budget + 128, RequestState(prompt=32))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path.home() / ".cache/triattn/smollm2-135m-instruct-hf")
    parser.add_argument("--stats", type=Path, required=True)
    parser.add_argument("--budgets", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_model(str(args.model))
    layout = tc.discover(model)
    stats = load_for_layout(args.stats, layout)
    del model
    for budget in args.budgets:
        ms = time_compactions(PagedCompressor, layout, stats, budget, args.repeat)
        print(f"B={budget}: {ms:.1f} ms per compaction")


if __name__ == "__main__":
    main()
