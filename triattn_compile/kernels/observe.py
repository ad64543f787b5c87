"""Ops that let attention-based eviction policies (SnapKV, R-KV, H2O, TriAttention's observed variants) see live
queries; TriAttention needs neither.

Both run inside the compiled step, before each attention node, with no host sync.
"""

from __future__ import annotations

import math

import torch


@torch.library.custom_op("triattn::record_queries", mutates_args=("ring",))
def record_queries(query: torch.Tensor, ring: torch.Tensor, layer: int) -> None:
    """Shift the step's queries ``[B, H, T, D]`` into ``ring[layer]`` ``[B, H, W, D]`` (the last W are kept)."""
    window = ring.shape[3]
    ring[layer].copy_(torch.cat([ring[layer], query.to(ring.dtype)], dim=2)[:, :, -window:])


@record_queries.register_fake
def _(query, ring, layer) -> None:
    return None


@torch.library.custom_op("triattn::accumulate_attention", mutates_args=("acc", "distant"))
def accumulate_attention(
    query: torch.Tensor, keys: torch.Tensor, acc: torch.Tensor, visible: torch.Tensor, layer: int, scale: float | None,
    distant: torch.Tensor | None = None, counted: torch.Tensor | None = None,
) -> None:
    """``acc[layer] [B, Hkv, C] += Σ_{queries, group heads} softmax(q·kᵀ·scale)`` over the slots each query sees
    (``visible`` ``[B, Hkv, T, C]``, the attention mask of ``passes/rewrite.py``). With ``distant``, the same
    probabilities (softmax over ``visible``) are also summed into ``distant[layer]`` where ``counted``
    ``[B, Hkv, T, C]`` is set (:func:`~triattn_compile.passes.rewrite.distant_slots`: the keys at least a minimum
    distance before the query)."""
    B, H, T, D = query.shape
    Hkv = keys.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q = query.float().view(B, Hkv, H // Hkv, T, D)
    logits = torch.einsum("bhgtd,bhcd->bhgtc", q, keys.float()) * scale
    probs = logits.masked_fill(~visible[:, :, None], -torch.inf).softmax(-1)
    width = keys.shape[2]  # the layer's slots (a layer of a smaller budget is narrower than ``acc``)
    acc[layer, ..., :width] += probs.sum(dim=(2, 3))
    if distant is not None:
        distant[layer, ..., :width] += probs.masked_fill(~counted[:, :, None], 0.0).sum(dim=(2, 3))


@accumulate_attention.register_fake
def _(query, keys, acc, visible, layer, scale, distant=None, counted=None) -> None:
    return None


RECORD_QUERIES = torch.ops.triattn.record_queries.default
ACCUMULATE_ATTENTION = torch.ops.triattn.accumulate_attention.default
