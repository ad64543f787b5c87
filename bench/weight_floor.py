"""The weight-read floor of one decode step: one ``F.linear`` per weight matrix of SmolLM2-135M, batch 1, per dtype.

    python bench/weight_floor.py [--threads 2] [--reps 20]

Every decode step multiplies one token by every weight matrix of the model, whatever the KV cache holds, so this
time is a lower bound on any method's step (attention, norms and the rest come on top).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from triattn_compile.loading import load_model


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model()
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for dtype in (torch.float32, torch.bfloat16):
        ws = [w.detach().to(dtype) for w in weights]
        xs = [torch.randn(1, w.shape[1], dtype=dtype) for w in ws]
        times = []
        for _ in range(args.reps + 2):
            start = time.perf_counter()
            for x, w in zip(xs, ws):
                F.linear(x, w)
            times.append(time.perf_counter() - start)
        mb = sum(w.numel() * w.element_size() for w in ws) / 2**20
        median_ms = sorted(times[2:])[args.reps // 2] * 1e3
        print(f"{str(dtype):15s} {len(ws)} matrices, {mb:.0f} MiB: median {median_ms:.1f} ms per token "
              f"({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
