"""``triattn::capture_queries``: the op the graph pass inserts on each layer's pre-RoPE query.

It adds every query it sees to the running sums of :class:`~triattn_compile.calibration.stats.QueryStats`
(offline calibration and online self-calibration alike).
"""

from __future__ import annotations

import torch

from triattn_compile.kernels.scoring.naive import to_complex_pairs


@torch.library.custom_op(
    "triattn::capture_queries", mutates_args=("sum_re", "sum_im", "sum_abs", "count", "sum_pass")
)
def capture_queries(
    q_pre: torch.Tensor,
    sum_re: torch.Tensor,
    sum_im: torch.Tensor,
    sum_abs: torch.Tensor,
    count: torch.Tensor,
    sum_pass: torch.Tensor,
    layer: int,
    head_axis: int,
    pairing: str,
    rotary_dim: int,
) -> None:
    """Accumulate pre-RoPE queries ``q_pre`` (heads on ``head_axis``, head_dim last) into the ``[L, H, F]`` band
    sums and the ``[L, H, P]`` sums of the pass-through dims (the last ``D - rotary_dim`` of them)."""
    q = q_pre.detach().movedim(head_axis, -2)
    q = q.reshape(-1, q.shape[-2], q.shape[-1])  # [N, H, D]
    if rotary_dim:  # a NoPE layer (rotary_dim 0) has no bands: all its dims pass through
        z = to_complex_pairs(q.double(), pairing, rotary_dim)  # [N, H, F]
        sum_re[layer] += z.real.sum(0)
        sum_im[layer] += z.imag.sum(0)
        sum_abs[layer] += z.abs().sum(0)
    passing = q.shape[-1] - rotary_dim
    if passing:  # right-aligned in sum_pass [L, H, P] (P = head_dim when the model has NoPE layers)
        sum_pass[layer, :, sum_pass.shape[-1] - passing :] += q[..., rotary_dim:].double().sum(0)
    count[layer] += q.shape[0]


@capture_queries.register_fake
def _(q_pre, sum_re, sum_im, sum_abs, count, sum_pass, layer, head_axis, pairing, rotary_dim) -> None:
    return None
