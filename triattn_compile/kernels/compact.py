"""``triattn::compress``: advance the cache counters and, when the cache is full, score, select and compact.

The graph pass appends one call after the model's last attention node, so every layer has written the current
tokens. Schedule (TRIATTENTION.md §1.7, HF path): when the occupied slots reach ``budget + divide_length``, keep the
protected prompt plus the top ``budget - prompt`` decode tokens per KV head (one set shared by all layers unless
``per_layer``) and move them, in temporal order, to the front of every layer's slots.
"""

from __future__ import annotations

import torch

from triattn_compile.cache import OCCUPIED, PEAK, PROTECTED, ROUNDS, SEEN
from triattn_compile.kernels.scoring.naive import aggregate_scores, geometric_offsets, score_postrope, select_keep


def triattention_scores(
    keys: list[torch.Tensor],
    round_start: int,
    q_mean: torch.Tensor,
    q_abs: torch.Tensor,
    omega: torch.Tensor,
    pairing: str,
    max_offset: int,
    scale: float,
) -> torch.Tensor:
    """Per-layer, per-query-head scores of the occupied keys: ``[L, B, H, N]`` (post-RoPE form)."""
    offsets = geometric_offsets(max_offset)
    return torch.stack([
        score_postrope(k, round_start, q_mean[i], q_abs[i], omega[i], pairing, offsets, scale)
        for i, k in enumerate(keys)
    ])


def keep_indices(
    scores: torch.Tensor, num_kv_heads: int, num_protected: int, budget: int, per_layer: bool, noise: float, seed: int
) -> torch.Tensor:
    """z-score, group max, layer mean, top-k (§1.6). Returns ``[L or 1, B, Hkv, budget]`` slot indices."""
    N = scores.shape[-1]
    candidates = torch.arange(N, device=scores.device) >= num_protected
    jitter = None
    if noise > 0:
        gen = torch.Generator(device=scores.device).manual_seed(seed)
        jitter = torch.rand(scores.shape, generator=gen, device=scores.device, dtype=scores.dtype) * noise
    agg = aggregate_scores(scores, num_kv_heads, candidates, per_layer=per_layer, noise=jitter)
    idx = select_keep(agg, num_protected, budget)
    return idx if per_layer else idx[None]


def gather_slots(buf: torch.Tensor, idx: torch.Tensor) -> None:
    """In place: ``buf[:, :, :K] = buf.gather(2, idx)`` for ``buf [B, Hkv, C, (D)]``, ``idx [B, Hkv, K]``."""
    k = idx.shape[-1]
    if buf.dim() == 4:
        idx = idx[..., None].expand(*idx.shape, buf.shape[-1])
    buf[:, :, :k].copy_(buf.gather(2, idx))


@torch.library.custom_op("triattn::compress", mutates_args=("ctrl", "slot_pos", "keys", "values"))
def compress(
    ctrl: torch.Tensor,
    slot_pos: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    slots: torch.Tensor,
    sum_re: torch.Tensor,
    sum_im: torch.Tensor,
    sum_abs: torch.Tensor,
    count: torch.Tensor,
    omega: torch.Tensor,
    budget: int,
    divide_length: int,
    protect_prompt: bool,
    per_layer: bool,
    pairing: str,
    scale: float,
    max_offset: int,
    noise: float,
    seed: int,
) -> None:
    """Record the tokens just written at ``slots`` ``[T]`` and compact every layer when the cache is full."""
    new = slots.numel()
    first = int(ctrl[SEEN]) == 0
    slot_pos[..., slots] = ctrl[SEEN] + torch.arange(new, device=slots.device)
    ctrl[OCCUPIED] = slots[-1] + 1
    ctrl[SEEN] += new
    if first and protect_prompt:
        ctrl[PROTECTED] = new
    used = int(ctrl[OCCUPIED])
    ctrl[PEAK] = max(int(ctrl[PEAK]), used)
    if used < budget + divide_length:
        return
    n = count.clamp_min(1)[:, None, None]
    q_mean = torch.complex(sum_re / n, sum_im / n)
    q_abs = sum_abs / n
    live = [k[:, :, :used] for k in keys]
    scores = triattention_scores(live, int(ctrl[SEEN]), q_mean, q_abs, omega, pairing, max_offset, scale)
    rounds = int(ctrl[ROUNDS])
    idx = keep_indices(scores, keys[0].shape[1], int(ctrl[PROTECTED]), budget, per_layer, noise, seed + rounds)
    for i, (k, v) in enumerate(zip(keys, values)):
        layer_idx = idx[i if per_layer else 0]
        gather_slots(k, layer_idx)
        gather_slots(v, layer_idx)
        gather_slots(slot_pos[i], layer_idx)
    slot_pos[..., budget:] = -1
    ctrl[OCCUPIED] = budget
    ctrl[ROUNDS] += 1


@compress.register_fake
def _(ctrl, slot_pos, keys, values, slots, *args) -> None:
    return None
