"""Compaction of the compressed cache, in place (TRIATTENTION.md §1.7, HF path).

:func:`keep_slots` turns scores into the kept slots (the protected prefix, a recent window, the best of the rest,
in temporal order); :func:`compact` gathers every layer's kept slots of some rows to the front. Who scores and when
is ``schedule.py``'s business.
"""

from __future__ import annotations

import torch

from triattn_compile.cache import OCCUPIED, CompressedCache
from triattn_compile.kernels.scoring.naive import select_keep


def keep_slots(scores: torch.Tensor, num_protected: int, recent_window: int, budget: int) -> torch.Tensor:
    """``[X, B, Hkv, N]`` scores -> ``[X, B, Hkv, budget]`` slots: the protected prefix, the last ``recent_window``
    slots, and the best of the rest, in increasing (temporal) order."""
    if recent_window:
        scores = scores.clone()
        scores[..., -recent_window:] = torch.inf
    return select_keep(scores, num_protected, budget)


def gather_slots(buf: torch.Tensor, idx: torch.Tensor) -> None:
    """In place: ``buf[:, :, :K] = buf.gather(2, idx)`` for ``buf [B, Hkv, C, (D)]``, ``idx [B, Hkv, K]``. A 4-D
    buffer is read as ``B·Hkv·C`` rows of ``D`` elements by ``index_select`` (on CPU about 10x faster than ``gather``
    with an index expanded over ``D``)."""
    k = idx.shape[-1]
    if buf.dim() == 4:
        batch, heads, capacity, dim = buf.shape
        offsets = torch.arange(batch * heads, device=idx.device).view(batch, heads, 1) * capacity
        kept = buf.reshape(-1, dim).index_select(0, (idx + offsets).reshape(-1)).view(batch, heads, k, dim)
    else:
        kept = buf.gather(2, idx)
    buf[:, :, :k].copy_(kept)


def as_rows(rows: int | slice) -> slice:
    return slice(rows, rows + 1) if isinstance(rows, int) else rows


@torch.no_grad()
def compact(cache: CompressedCache, keep: torch.Tensor | None, rows: int | slice = 0,
            windowed: list[int] | tuple = ()) -> None:
    """Keep ``cache.budget`` slots per KV head of ``rows``: ``keep`` ``[X, B, Hkv, budget]`` (:func:`keep_slots` of
    a policy's scores; X = 1 for one keep set shared by the layers, else one per scored layer) in every layer but
    the sliding-window layers ``windowed``, which keep their most recent ``budget`` tokens (``keep`` is ``None``
    when every layer is windowed)."""
    budget, rows, idx = cache.budget, as_rows(rows), keep
    scored = [i for i in range(len(cache.layers)) if i not in windowed]
    for i, layer in enumerate(cache.layers):
        if i in windowed:
            layer_idx = select_keep(cache.slot_pos[i, rows, :, : cache.fill[rows.start]].float(), 0, budget)
        else:
            layer_idx = idx[scored.index(i) if idx.shape[0] > 1 else 0]
        gather_slots(layer.keys[rows], layer_idx)
        gather_slots(layer.values[rows], layer_idx)
        gather_slots(cache.slot_pos[i, rows], layer_idx)
        for acc in (cache.attention, cache.distant_attention):
            if acc is not None:
                gather_slots(acc[i, rows], layer_idx)
    cache.slot_pos[:, rows, :, budget:] = -1
    for acc in (cache.attention, cache.distant_attention):
        if acc is not None:
            acc[:, rows, :, budget:] = 0
    cache.ctrl[OCCUPIED, rows] = budget  # a device write: no sync
    for row in range(*rows.indices(cache.batch)):
        cache.fill[row] = budget
        cache.row_rounds[row] += 1
