"""The in-graph halves of the compressed cache's schedule, inserted by ``passes/rewrite.py``: with no host sync.

``triattn::record_positions`` (before the first attention node) records the positions of the tokens just written;
``triattn::advance`` (after the last one) moves the write pointers. The host side (when to compact) is
``schedule.py``; compaction itself is ``kernels/compact.py``.
"""

from __future__ import annotations

import torch

from triattn_compile.cache import OCCUPIED, SEEN, query_positions


@torch.library.custom_op("triattn::record_positions", mutates_args=("slot_pos",))
def record_positions(ctrl: torch.Tensor, slot_pos: torch.Tensor, slots: torch.Tensor) -> None:
    """Before the first attention: the step's tokens at ``slots`` ``[B, T]`` (or ``[T]``) get their row's position
    ``fed + t - pad`` in every layer's ``slot_pos`` (``-1`` for padding tokens)."""
    L, B, H, _ = slot_pos.shape
    slots = slots.expand(B, -1) if slots.dim() == 1 else slots  # [T]: every row on the same schedule
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
    ctrl[OCCUPIED] = slots[..., -1] + 1
    ctrl[SEEN] += slots.shape[-1]


@advance.register_fake
def _(ctrl, slots) -> None:
    return None


RECORD_POSITIONS = torch.ops.triattn.record_positions.default
ADVANCE = torch.ops.triattn.advance.default
