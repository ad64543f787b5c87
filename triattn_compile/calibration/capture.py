"""``capture_queries``: what the graph pass inserts on each layer's pre-RoPE query.

It adds every query it sees to the running sums of :class:`~triattn_compile.calibration.stats.QueryStats`
(offline calibration and online self-calibration alike). It is plain real-valued torch, traced into the compiled
graph, so Inductor fuses it into one small kernel per layer instead of a dozen eager ops per call.
"""

from __future__ import annotations

import torch

from triattn_compile.bands import band_parts
from triattn_compile.cache import query_positions


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
    rotary_start: int = 0,
    ctrl: torch.Tensor | None = None,
) -> None:
    """Accumulate pre-RoPE queries ``q_pre`` (heads on ``head_axis``, head_dim last) into the ``[L, H, F]`` band
    sums and the ``[L, H, P]`` sums of the pass-through dims, in float64. The rotary dims start at ``rotary_start``
    (trailing in MLA); statistics always list them first: ``[rotary ; pass-through]``. With the compressed cache's
    counters ``ctrl`` (online calibration), the queries of left-padding tokens are left out."""
    q = q_pre.detach().movedim(head_axis, -2).double()  # [B, T, H, D] (or [N, H, D])
    valid = None
    if ctrl is not None:  # a row's token t is at position fed + t - pad; padding has negative positions
        valid = (query_positions(ctrl, q.shape[1]) >= 0).reshape(-1)
    q = q.reshape(-1, q.shape[-2], q.shape[-1])  # [N, H, D]
    if valid is not None:
        q = q * valid[:, None, None]
    if rotary_start:
        q = q.roll(-rotary_start, -1)
    if rotary_dim:  # a NoPE layer (rotary_dim 0) has no bands: all its dims pass through
        re, im = band_parts(q, pairing, rotary_dim)  # [N, H, F]
        sum_re[layer] += re.sum(0)
        sum_im[layer] += im.sum(0)
        sum_abs[layer] += (re * re + im * im).sqrt().sum(0)
    passing = q.shape[-1] - rotary_dim
    if passing:  # right-aligned in sum_pass [L, H, P] (P = head_dim when the model has NoPE layers)
        sum_pass[layer, :, sum_pass.shape[-1] - passing :] += q[..., rotary_dim:].sum(0)
    count[layer] += q.shape[0] if valid is None else valid.sum()
