"""Compressed KV cache: fixed capacity ``budget + divide_length`` slots per layer and KV head, allocated once.

The cache is a transformers :class:`~transformers.Cache`, so an unmodified model writes to it through its usual
``past_key_values.update(...)`` call. Keys are stored post-RoPE. ``update`` only writes the new tokens at the next
free slots; the graph pass (``passes/rewrite.py``) masks attention to the occupied slots and appends the
``triattn::compress_`` op that advances the counters and compacts every layer in place when the cache is full.

State tensors (all on the cache's device, never read on the host inside the compiled step):

* ``ctrl`` int64 ``[5]``: occupied slots, tokens seen (absolute position of the next token), protected prompt
  slots, compaction rounds done, peak occupied slots.
* ``slot_pos`` int64 ``[L, B, Hkv, C]``: absolute position of the token in each slot (``-1`` when empty).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

OCCUPIED, SEEN, PROTECTED, ROUNDS, PEAK = range(5)


class CompressedLayer(CacheLayerMixin):
    """One layer's key/value slots ``[B, Hkv, C, D]``; writes go to ``ctrl[OCCUPIED] + arange(T)``."""

    is_compileable = True
    is_sliding = False

    def __init__(self, capacity: int, ctrl: torch.Tensor):
        super().__init__()
        self.capacity = capacity
        self.ctrl = ctrl

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads = key_states.shape[:2]
        self.keys = key_states.new_zeros(batch, heads, self.capacity, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # key_states: [B, Hkv, T, D] post-RoPE
        slots = self.ctrl[OCCUPIED] + torch.arange(key_states.shape[-2], device=self.device)
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.capacity, 0

    def get_seq_length(self) -> torch.Tensor:
        return self.ctrl[SEEN]

    def get_max_length(self) -> int:
        return self.capacity


class CompressedCache(Cache):
    """A transformers cache of fixed capacity whose contents TriAttention compacts in place.

    Args:
        num_layers: attention layers of the model.
        budget: tokens kept per KV head after a compaction (B).
        divide_length: decode steps between compactions; capacity is ``budget + divide_length``.
    """

    def __init__(self, num_layers: int, budget: int, divide_length: int = 128, device: torch.device | str = "cpu"):
        self.budget = budget
        self.capacity = budget + divide_length
        self.ctrl = torch.zeros(5, dtype=torch.int64, device=device)
        super().__init__(layers=[CompressedLayer(self.capacity, self.ctrl) for _ in range(num_layers)])
        self.slot_pos: torch.Tensor | None = None

    # transformers asks this to decide on eager mask building in generate(); the pass builds its own mask.
    @property
    def is_compileable(self) -> bool:
        return False

    def allocate_positions(self, batch: int, kv_heads: int) -> torch.Tensor:
        """``slot_pos`` ``[L, B, Hkv, C]``, created on first use (the batch size is known only then)."""
        if self.slot_pos is None:
            self.slot_pos = torch.full(
                (len(self.layers), batch, kv_heads, self.capacity), -1, dtype=torch.int64, device=self.ctrl.device
            )
        return self.slot_pos

    def occupancy(self) -> list[int]:
        """Occupied slots per layer (identical across layers: every layer keeps the same count)."""
        return [int(self.ctrl[OCCUPIED])] * len(self.layers)

    def peak_occupancy(self) -> int:
        """Most slots ever occupied at once (measured before each compaction)."""
        return int(self.ctrl[PEAK])

    def compactions(self) -> int:
        """Compaction rounds done so far."""
        return int(self.ctrl[ROUNDS])

    def tokens_seen(self) -> int:
        """Absolute position of the next token."""
        return int(self.ctrl[SEEN])

    def kv_bytes(self) -> int:
        """Bytes held by the key/value slots (the allocated capacity, not just the occupied part)."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))
