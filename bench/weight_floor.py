"""The weight-read floor of one decode step of SmolLM2-135M, batch 1, per dtype: the model's weight matrices once
through ``F.linear`` (what every method's step does), through oneDNN with pre-packed weights, and merely summed.

    python bench/weight_floor.py [--threads 2] [--reps 20]

Every decode step multiplies one token by every weight matrix of the model, whatever the KV cache holds, so the
``F.linear`` time bounds any method's step from below as the model runs today. The sum reads the same bytes with no
multiply: how fast this machine's memory can deliver them. The pre-packed oneDNN product (what Inductor's
``freezing`` uses for bfloat16 weights on CPU) and an Inductor-compiled ``(w * x).sum(-1)`` (one fused reduction
per matrix, no extra memory; neither is used by ``optimize``) show how much of the gap a better matrix-vector kernel
closes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from script_setup import load, model_parser


def _median_ms(fn: Callable[[], None], reps: int) -> float:
    times = []
    for _ in range(reps + 2):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[reps // 2] * 1e3


def _ways(ws: list[torch.Tensor]) -> dict[str, Callable[[], list]]:
    """One pass over the weights ``ws`` per way of reading them, with a one-token input of their dtype."""
    xs = [torch.randn(1, w.shape[1], dtype=w.dtype) for w in ws]
    ways = {
        "F.linear": lambda: [F.linear(x, w) for x, w in zip(xs, ws)],
        "sum (read only)": lambda: [w.sum() for w in ws],
    }
    if torch.backends.mkldnn.is_available():
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in ws]
        ways["oneDNN, pre-packed"] = lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                                              for x, p in zip(xs, packed)]
    product_sum = torch.compile(lambda x, w: (w * x).sum(-1), dynamic=False)
    ways["Inductor (w*x).sum"] = lambda: [product_sum(x, w) for x, w in zip(xs, ws)]
    return ways


@torch.no_grad()
def main() -> None:
    parser = model_parser(__doc__)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    model, _ = load(args)
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for dtype in (torch.float32, torch.bfloat16):
        ws = [w.detach().to(dtype) for w in weights]
        mib = sum(w.numel() * w.element_size() for w in ws) / 2**20
        for name, fn in _ways(ws).items():
            ms = _median_ms(fn, args.reps)
            print(f"{str(dtype):15s} {len(ws)} matrices, {mib:.0f} MiB, {name:20s}: median {ms:5.1f} ms per token "
                  f"({mib / 1024 / ms * 1e3:4.1f} GiB/s, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
