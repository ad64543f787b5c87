"""Compressed KV cache: fixed capacity ``budget + divide_length`` slots per layer and KV head, allocated once.

The cache is a transformers :class:`~transformers.Cache`, so an unmodified model writes to it through its usual
``past_key_values.update(...)`` call. Keys are stored post-RoPE. ``update`` only writes the new tokens at the next
free slots; the graph pass (``passes/rewrite.py``) masks attention to the occupied slots and appends the
``triattn::advance`` op that records the new tokens' positions. Compaction runs between steps
(``kernels/compact.py``), scheduled on the host.

Two copies of the counters, so that the compiled step never syncs with the host:

* on the device, read and written only inside the graph: ``ctrl`` int64 ``[3, B]`` (per row: occupied slots =
  where the row's next token is written; tokens fed, padding included, equal in every row; left padding of the
  row's prompt) and ``slot_pos`` int64 ``[L, B, Hkv, C]`` (the row's own position of the token in each slot, ``-1``
  when empty or padding);
* on the host, Python ints advanced by :meth:`CompressedCache.record_write`: the host knows how many tokens it fed,
  so it knows when a row is full without reading the device.

Rows are independent: each has its own write pointer, positions (``fed - pad``), protected prompt and compaction
schedule, so a row of a left-padded batch evolves exactly as the same prompt alone. Padding tokens are written to
the row's last slots (``(occupied + t - pad) mod C``), marked ``-1`` and overwritten before the row is full.

Per-layer budgets (``extra``): every layer shares the ring of ``C = budget + divide_length`` slots that new tokens
are written to (one write pointer for all layers); a layer whose budget is ``budget + e`` has ``e`` more slots after
the ring, written only by compaction (its kept tokens beyond the first ``budget``). Attention reads a layer's ring
and extra slots alike, under the same mask by position.
"""

from __future__ import annotations

import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from triattn_compile.config import DIVIDE_LENGTH

OCCUPIED, SEEN, PAD = range(3)
CACHE_KEYWORDS = ("cache", "past_key_values")  # transformers >= 5.24 names it ``cache``; older ones and plain models


def cache_keyword(forward) -> str:
    """The keyword under which ``forward`` takes its KV cache: ``cache`` where it declares one, else
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def returned_cache(output) -> Cache:
    """The cache a transformers forward returned: ``output.cache`` (>= 5.24) or ``output.past_key_values``."""
    return output["cache"] if "cache" in output else output.past_key_values


def query_positions(ctrl: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, length]`` positions of the tokens a step feeds: row b's token t is at ``fed + t - pad_b`` (negative for
    left padding)."""
    return ctrl[SEEN][:, None] + torch.arange(length, device=ctrl.device) - ctrl[PAD][:, None]


def write_slots(ctrl: torch.Tensor, length: int, capacity: int) -> torch.Tensor:
    """``[B, length]`` slots the step's tokens go to: row b's token t to ``(ctrl[OCCUPIED, b] + t - lead_b) mod C``,
    ``lead_b`` being the row's padding still in this call (so a row's real tokens fill slots ``0, 1, ...``)."""
    lead = (ctrl[PAD] - ctrl[SEEN]).clamp(min=0)[:, None]  # [B, 1] padding tokens in this call
    return (ctrl[OCCUPIED][:, None] + torch.arange(length, device=ctrl.device) - lead) % capacity


class CompressedLayer(CacheLayerMixin):
    """One layer's key/value slots ``[B, Hkv, C, D]``; row b's token t goes to slot
    ``(ctrl[OCCUPIED, b] + t - lead_b) mod C``, ``lead_b`` being the row's padding still in this call (so a row's real
    tokens fill slots ``0, 1, ...``)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, capacity: int, ctrl: torch.Tensor, extra: int = 0):
        super().__init__()
        self.capacity, self.extra = capacity, extra  # the ring new tokens go to; slots after it (compaction's)
        self.ctrl = ctrl
        self.mask_width: int | None = None  # the model's own mask width, where not this layer's slots

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads = key_states.shape[:2]
        slots = self.capacity + self.extra
        self.keys = key_states.new_zeros(batch, heads, slots, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, slots, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        # key_states: [B, Hkv, T, D] post-RoPE
        slots = write_slots(self.ctrl, key_states.shape[-2], self.capacity)  # [B, T]
        rows = torch.arange(slots.shape[0], device=self.device)[:, None]
        # an indexed assignment (index_put_, unlike scatter_) stays in place under Inductor: no copy of the buffer
        self.keys[rows, :, slots] = key_states.transpose(1, 2)
        self.values[rows, :, slots] = value_states.transpose(1, 2)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.mask_width or self.capacity + self.extra, 0

    def get_seq_length(self) -> torch.Tensor:
        return self.ctrl[SEEN, 0]

    def get_max_length(self) -> int:
        return self.capacity


class CompressedCache(Cache):
    """A transformers cache of fixed capacity whose contents TriAttention compacts in place.

    Args:
        num_layers: attention layers of the model (``None``: as many as the model writes to, for discovery).
        budget: tokens kept per KV head after a compaction (B).
        divide_length: decode steps between compactions; capacity is ``budget + divide_length``.
        batch: rows (sequences); each has its own write pointer, positions and compaction schedule.
        extra: per layer, slots kept beyond ``budget`` (that layer's budget is ``budget + extra[i]``); default none.
    """

    def __init__(self, num_layers: int | None, budget: int, divide_length: int = DIVIDE_LENGTH,
                 device: torch.device | str = "cpu", batch: int = 1, extra: list[int] | None = None):
        self.budget = budget
        self.capacity = budget + divide_length
        self.batch = batch
        self.extra = list(extra) if extra is not None else [0] * (num_layers or 1)
        if len(self.extra) != (num_layers or 1):
            raise ValueError(f"extra slots for {len(self.extra)} layers, the cache has {num_layers or 1}")
        self.ctrl = torch.zeros(3, batch, dtype=torch.int64, device=device)
        super().__init__(layers=[CompressedLayer(self.capacity, self.ctrl, e) for e in self.extra])
        if len(set(self.extra)) > 1:
            # transformers builds one mask for all layers from one layer's size, and layers of different widths
            # cannot share it; the pass replaces every layer's mask with its own, so ask for one that broadcasts
            for layer in self.layers:
                layer.mask_width = 1
        if num_layers is None:  # discovery's probe: a layer for every layer index the model writes
            self.layer_class_to_replicate = lambda: CompressedLayer(self.capacity, self.ctrl)
        self.slot_pos: torch.Tensor | None = None
        self.queries: torch.Tensor | None = None  # [L, B, H, W, D] last W post-RoPE queries, when a policy asks
        self.attention: torch.Tensor | None = None  # [L, B, Hkv, C] accumulated attention, when a policy asks
        self.distant_attention: torch.Tensor | None = None  # [L, B, Hkv, C] its share from distant queries
        # host mirror, per row: occupied slots, left padding, protected prompt, compaction rounds
        self.fill, self.pads, self.prompt, self.row_rounds = ([0] * batch for _ in range(4))
        self.kept_extra = [[0] * len(self.extra) for _ in range(batch)]  # per row and layer: extra slots held
        self.seen = self.peak = 0  # tokens fed (padding included); most slots a row ever held

    @property
    def occupied(self) -> int:
        """Occupied slots of the fullest row."""
        return max(self.fill)

    @property
    def rounds(self) -> int:
        """Compaction rounds of the row compacted most often."""
        return max(self.row_rounds)

    def set_padding(self, pads: list[int]) -> None:
        """Left padding of each row's prompt (before the first write)."""
        self.pads = list(pads)
        self.ctrl[PAD] = torch.tensor(self.pads, dtype=torch.int64)

    def record_write(self, tokens: int, protect: bool) -> None:
        """Host side of a forward that wrote ``tokens`` new tokens per row (the device side is ``triattn::advance``)."""
        for b, pad in enumerate(self.pads):
            real = tokens - min(max(pad - self.seen, 0), tokens)
            if self.seen == 0 and protect:
                self.prompt[b] = real
            if self.seen == 0 and pad:
                self._forget_padding(b, pad, real)
            self.fill[b] += real
        self.seen += tokens
        self.peak = max(self.peak, self.occupied)

    def _forget_padding(self, row: int, pad: int, real: int) -> None:
        """What the padding queries left in the policies' observations is cleared (as if the row ran alone)."""
        for acc in (self.attention, self.distant_attention):
            if acc is not None:
                acc[:, row, :, self.capacity - pad:self.capacity] = 0  # padding slots (each saw only itself)
        if self.queries is not None and real < self.queries.shape[3]:
            self.queries[:, row, :, : self.queries.shape[3] - real] = 0

    def reset(self) -> None:
        """Empty again, in place (the same tensors): a new sequence in a model that keeps these buffers as its own."""
        self.ctrl.zero_()
        if self.slot_pos is not None:
            self.slot_pos.fill_(-1)
        for extra in (self.queries, self.attention, self.distant_attention):
            if extra is not None:
                extra.zero_()
        self.fill, self.pads, self.prompt, self.row_rounds = ([0] * self.batch for _ in range(4))
        self.kept_extra = [[0] * len(self.extra) for _ in range(self.batch)]
        self.seen = self.peak = 0

    def repeat_rows(self, batch: int) -> None:
        """Turn a one-row cache into ``batch`` identical rows (benchmarks: the same context in every sequence)."""
        if self.batch != 1:
            raise ValueError(f"repeat_rows needs a one-row cache, this one has {self.batch} rows")
        self.ctrl = self.ctrl.repeat(1, batch)
        for layer in self.layers:
            layer.ctrl = self.ctrl
            layer.keys, layer.values = layer.keys.repeat(batch, 1, 1, 1), layer.values.repeat(batch, 1, 1, 1)
        for name in ("slot_pos", "queries", "attention", "distant_attention"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.repeat(1, batch, *[1] * (value.dim() - 2)))
        self.fill, self.pads, self.prompt, self.row_rounds = (v * batch for v in
                                                               (self.fill, self.pads, self.prompt, self.row_rounds))
        self.kept_extra = [list(self.kept_extra[0]) for _ in range(batch)]
        self.batch = batch

    def full_rows(self) -> list[int]:
        """Rows whose slots are all occupied: they must be compacted before the next step."""
        return [b for b, n in enumerate(self.fill) if n >= self.capacity]

    def full_groups(self) -> list[slice]:
        """The full rows as runs of adjacent rows that one compaction call can serve: same padding (so the same
        next position), protected prompt and round (an equal-length batch is one run)."""
        groups: list[slice] = []
        for b in self.full_rows():
            last = groups[-1].stop - 1 if groups else None
            if last == b - 1 and self._schedule(last) == self._schedule(b):
                groups[-1] = slice(groups[-1].start, b + 1)
            else:
                groups.append(slice(b, b + 1))
        return groups

    def _schedule(self, row: int) -> tuple[int, int, int]:
        return self.pads[row], self.prompt[row], self.row_rounds[row]

    def is_full(self) -> bool:
        return bool(self.full_rows())

    # transformers asks this to decide on eager mask building in generate(); the pass builds its own mask.
    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def width(self) -> int:
        """Slots of the widest layer: the ring and that layer's extra slots."""
        return self.capacity + max(self.extra)

    def allocate_positions(self, batch: int, kv_heads: int) -> torch.Tensor:
        """``slot_pos`` ``[L, B, Hkv, width]``, created on first use (the batch size is known only then); a layer with
        fewer extra slots than the widest never uses its last columns (``-1``)."""
        if self.slot_pos is None:
            self.slot_pos = torch.full(
                (len(self.layers), batch, kv_heads, self.width), -1, dtype=torch.int64, device=self.ctrl.device
            )
        return self.slot_pos

    def held_slots(self, row: int, layer: int) -> slice | torch.Tensor:
        """The slots row ``row`` of layer ``layer`` holds, in temporal order: the ring's first ``budget`` (kept at
        the last compaction), then the extra slots kept with them, then the ring's newer tokens; a slice while no
        extra slot is held (what compaction inputs index, and keep sets refer to)."""
        fill, kept = self.fill[row], self.kept_extra[row][layer]
        if not kept:
            return slice(0, fill)
        device = self.ctrl.device
        return torch.cat([torch.arange(self.budget, device=device),
                          torch.arange(self.capacity, self.capacity + kept, device=device),
                          torch.arange(self.budget, fill, device=device)])

    def layer_budget(self, layer: int) -> int:
        """Tokens layer ``layer`` keeps per KV head after a compaction."""
        return self.budget + self.extra[layer]

    def occupancy(self) -> list[int]:
        """Occupied ring slots per layer, fullest row (the same in every layer: one write pointer)."""
        return [self.occupied] * len(self.layers)

    def peak_occupancy(self) -> int:
        """Most slots ever occupied at once (measured before each compaction)."""
        return self.peak

    def compactions(self) -> int:
        """Compaction rounds done so far."""
        return self.rounds

    def tokens_seen(self) -> int:
        """Tokens fed per row, padding included (the next token's position in an unpadded row)."""
        return self.seen

    def kv_bytes(self) -> int:
        """Bytes the cache holds: key/value slots at full capacity plus its bookkeeping (``slot_pos``, the query
        ring and attention sums some policies use)."""
        kv = sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                 for t in (layer.keys, layer.values))
        extra = (self.slot_pos, self.queries, self.attention, self.distant_attention)
        return kv + sum(t.numel() * t.element_size() for t in extra if t is not None)
