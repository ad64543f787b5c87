"""The two halves of the compressed cache's schedule (TRIATTENTION.md §1.7, HF path).

``triattn::record_positions`` (before the first attention node) records the positions of the tokens just written;
``triattn::advance`` (after the last one) moves the write pointers: inside the compiled step, with no host sync.

:func:`compact` runs between steps, for each row whose host-side counters say it holds ``budget + divide_length``
tokens (rows of a left-padded batch fill up at different steps): the policy scores the row's occupied slots, the
protected prompt and the policy's recent window are kept, the top tokens per KV head fill the rest of the budget,
and every layer's slots of that row are gathered in place, in temporal order, to the front.
"""

from __future__ import annotations

import torch

from triattn_compile.cache import OCCUPIED, SEEN, CompressedCache, query_positions
from triattn_compile.kernels.scoring.naive import fold_latent_query, select_keep
from triattn_compile.policies import CompactionInputs, Policy


@torch.library.custom_op("triattn::record_positions", mutates_args=("slot_pos",))
def record_positions(ctrl: torch.Tensor, slot_pos: torch.Tensor, slots: torch.Tensor) -> None:
    """Before the first attention: the step's tokens at ``slots`` ``[B, T]`` get their row's position
    ``fed + t - pad`` in every layer's ``slot_pos`` (``-1`` for padding tokens)."""
    L, B, H, _ = slot_pos.shape
    pos = query_positions(ctrl, slots.shape[-1])
    pos = pos.masked_fill(pos < 0, -1)
    shape = (L, B, H, slots.shape[-1])
    slot_pos.scatter_(3, slots[None, :, None, :].expand(shape), pos[None, :, None, :].expand(shape))


@record_positions.register_fake
def _(ctrl, slot_pos, slots) -> None:
    return None


@torch.library.custom_op("triattn::advance", mutates_args=("ctrl",))
def advance(ctrl: torch.Tensor, slots: torch.Tensor) -> None:
    """After the last attention: move each row's write pointer past ``slots`` ``[B, T]`` and count the fed tokens."""
    ctrl[OCCUPIED] = slots[:, -1] + 1
    ctrl[SEEN] += slots.shape[-1]


@advance.register_fake
def _(ctrl, slots) -> None:
    return None


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


def compaction_inputs(cache: CompressedCache, state, rows: int | slice = 0) -> CompactionInputs:
    """What the policy sees for ``rows`` (one row, or adjacent rows on the same schedule: ``cache.full_groups()``):
    their occupied slots, position and protected prompt, and the statistics of ``state`` (a TriAttentionState), for
    the layers the policy decides (sliding-window layers keep their most recent tokens instead)."""
    rows = _as_rows(rows)
    first = rows.start
    used = cache.fill[first]
    layers = [i for i in range(len(cache.layers)) if i not in state.windowed_layers]
    pick = (lambda t: t) if len(layers) == len(cache.layers) else (lambda t: t[layers])
    q_pass = pick(state.stats.q_pass_mean())
    if state.latent_maps:
        q_pass = [fold_latent_query(q, state.latent_maps[i]) if i in state.latent_maps else q
                  for i, q in zip(layers, q_pass)]
    queries = None if cache.queries is None else pick(cache.queries)[:, rows]
    return CompactionInputs(
        keys=[state.scoring_keys(cache, i, rows, used) for i in layers],
        positions=pick(cache.slot_pos)[:, rows, :, :used],
        next_position=cache.seen - cache.pads[first],
        num_protected=cache.prompt[first],
        round=cache.row_rounds[first],
        q_mean=pick(state.stats.q_mean()),
        q_abs=pick(state.stats.q_abs()),
        q_pass=q_pass,
        omega=pick(state.omega),
        pairing=state.key_pairing,
        scale=float(state.signature.attention_scaling),
        queries=queries.roll(-state.rotary_start, -1) if queries is not None and state.rotary_start else queries,
        attention=None if cache.attention is None else pick(cache.attention)[:, rows, :, :used],
    )


def _as_rows(rows: int | slice) -> slice:
    return slice(rows, rows + 1) if isinstance(rows, int) else rows


@torch.no_grad()
def compact(cache: CompressedCache, policy: Policy, inputs: CompactionInputs, rows: int | slice = 0,
            windowed: list[int] | tuple = ()) -> torch.Tensor | None:
    """Keep ``cache.budget`` slots per KV head of ``rows``, chosen by ``policy`` on ``inputs`` (those rows'
    :func:`compaction_inputs`) in every layer but the sliding-window layers ``windowed``, which keep their most
    recent ``budget`` tokens; returns the policy's kept slot indices ``[X, B, Hkv, budget]`` (``None`` if every
    layer is windowed)."""
    budget, rows = cache.budget, _as_rows(rows)
    idx = keep_slots(policy.scores(inputs), inputs.num_protected, policy.recent_window, budget) if inputs.keys else None
    scored = [i for i in range(len(cache.layers)) if i not in windowed]
    for i, layer in enumerate(cache.layers):
        if i in windowed:
            layer_idx = select_keep(cache.slot_pos[i, rows, :, : cache.fill[rows.start]].float(), 0, budget)
        else:
            layer_idx = idx[scored.index(i) if idx.shape[0] > 1 else 0]
        gather_slots(layer.keys[rows], layer_idx)
        gather_slots(layer.values[rows], layer_idx)
        gather_slots(cache.slot_pos[i, rows], layer_idx)
        if cache.attention is not None:
            gather_slots(cache.attention[i, rows], layer_idx)
    cache.slot_pos[:, rows, :, budget:] = -1
    if cache.attention is not None:
        cache.attention[:, rows, :, budget:] = 0
    cache.ctrl[OCCUPIED, rows] = budget  # a device write: no sync
    for row in range(*rows.indices(cache.batch)):
        cache.fill[row] = budget
        cache.row_rounds[row] += 1
    return idx
