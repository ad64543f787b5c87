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


def gather_slots(buf: torch.Tensor, idx: torch.Tensor, ring: int | None = None, capacity: int = 0) -> None:
    """In place: the slots ``idx`` ``[B, Hkv, K]`` of ``buf [B, Hkv, C, (D)]`` to its front, ``buf[:, :, :K] =
    buf.gather(2, idx)``; with ``ring`` < K, the first ``ring`` of them there and the rest to the extra slots at
    ``capacity`` onwards. A 4-D buffer is read as ``B·Hkv·C`` rows of ``D`` elements by ``index_select`` (on CPU
    about 10x faster than ``gather`` with an index expanded over ``D``)."""
    k = idx.shape[-1]
    if buf.dim() == 4:
        batch, heads, slots, dim = buf.shape
        offsets = torch.arange(batch * heads, device=idx.device).view(batch, heads, 1) * slots
        kept = buf.reshape(-1, dim).index_select(0, (idx + offsets).reshape(-1)).view(batch, heads, k, dim)
    else:
        kept = buf.gather(2, idx)
    ring = k if ring is None else min(ring, k)
    buf[:, :, :ring].copy_(kept[:, :, :ring])
    if ring < k:
        buf[:, :, capacity:capacity + k - ring].copy_(kept[:, :, ring:])


def as_rows(rows: int | slice) -> slice:
    return slice(rows, rows + 1) if isinstance(rows, int) else rows


@torch.no_grad()
def compact(cache: CompressedCache, keep: torch.Tensor | None, rows: int | slice = 0,
            windowed: list[int] | tuple = (), layers: list[int] | None = None) -> None:
    """Keep each layer's budget of slots per KV head of ``rows``, for ``layers`` (default all; the rows' schedule
    moves on only when every layer is done: :func:`finish_compaction`): ``keep`` ``[X, B, Hkv, K]``
    (:func:`keep_slots` of a policy's scores over :meth:`~triattn_compile.cache.CompressedCache.held_slots`; X = 1
    for one keep set shared by the layers, else one per scored layer of ``layers``) in every layer but the
    sliding-window layers ``windowed``, which keep their most recent ``budget`` tokens (``keep`` is ``None`` when
    every layer is windowed). The first ``budget`` kept go to the ring's front, the rest to the layer's extra
    slots."""
    budget, capacity, rows, idx = cache.budget, cache.capacity, as_rows(rows), keep
    layers = range(len(cache.layers)) if layers is None else layers
    scored = [i for i in layers if i not in windowed]
    held_of: dict[int, torch.Tensor] = {}  # by extra slots held: the same order in all such layers
    for i in layers:
        layer = cache.layers[i]
        if i in windowed:
            layer_idx = select_keep(cache.slot_pos[i, rows, :, : cache.fill[rows.start]].float(), 0, budget)
        else:
            layer_idx = idx[scored.index(i) if idx.shape[0] > 1 else 0]
            kept = cache.kept_extra[rows.start][i]
            if kept and kept not in held_of:
                held_of[kept] = cache.held_slots(rows.start, i)
            if kept:
                layer_idx = held_of[kept][layer_idx]
        k = layer_idx.shape[-1]
        for buf in (layer.keys[rows], layer.values[rows], cache.slot_pos[i, rows]):
            gather_slots(buf, layer_idx, budget, capacity)
        cache.slot_pos[i, rows, :, budget:capacity] = -1
        cache.slot_pos[i, rows, :, capacity + k - budget:] = -1
        for acc in (cache.attention, cache.distant_attention):
            if acc is not None:
                gather_slots(acc[i, rows], layer_idx, budget, capacity)
                acc[i, rows, :, budget:capacity] = 0
                acc[i, rows, :, capacity + k - budget:] = 0
        for row in range(*rows.indices(cache.batch)):
            cache.kept_extra[row][i] = k - budget


def finish_compaction(cache: CompressedCache, rows: int | slice = 0) -> None:
    """After every layer of ``rows`` is compacted: their write pointer back to ``budget``, one more round."""
    rows = as_rows(rows)
    cache.ctrl[OCCUPIED, rows] = cache.budget  # a device write: no sync
    for row in range(*rows.indices(cache.batch)):
        cache.fill[row] = cache.budget
        cache.row_rounds[row] += 1
