"""The worker side of TriAttention in vLLM: per request, score the cached keys, keep the top ``budget`` per KV head in
the request's leading blocks, and point attention at the live blocks (:mod:`~triattn_compile.vllm.paged`).

:class:`PagedCompressor` is called by the metadata builder of the full-attention KV cache group once per step, before
the forward (:mod:`~triattn_compile.vllm.attention`), with vLLM's :class:`CommonAttentionMetadata` (sliding-window
layers, in their own groups, are left to vLLM). It

- learns each request's prompt length from its prefill rows (``is_prefilling``), keyed by the request's first block
  (a block is owned by one request at a time, and with prefix caching off a request starts at position 0);
- compacts the rows whose step writes position ``budget + divide_length·k``: the same policy and keep-slot code as
  the HF path (``policies.py``, ``kernels/compact.keep_slots``) on the request's post-RoPE keys gathered from the
  paged tensors (per block and KV head a key region and a value region, ``[num_blocks, Hkv, 2, block_size * D]``,
  each laid out as the attention kernel's ISA wants: :class:`BlockLayout`); the kept tokens past the budget move
  into the evicted slots before it (:func:`fill_holes`: attention does not depend on slot order), so a compaction
  reads the keys once and writes at most ``divide_length`` tokens per KV head and layer;
- returns the metadata with ``seq_lens`` and block table rows rewritten to the live blocks; positions and the slot
  mapping stay absolute.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from triattn_compile.calibration.stats import QueryStats
from triattn_compile.kernels.compact import keep_slots
from triattn_compile.passes.discover import Layout
from triattn_compile.policies import CompactionInputs, Policy, TriAttention
from triattn_compile.vllm.paged import PagedSchedule
from triattn_compile.vllm.settings import ALL_WINDOWED

RECORD_ENV = "TRIATTN_VLLM_RECORD"  # tests: how many compactions the worker keeps a copy of (keys, keep sets)


@dataclass
class RequestState:
    """What the worker knows of one request: its prompt length, its kept tokens' positions ``[X, Hkv, budget]``
    (``None`` before the first compaction) and its compaction rounds."""

    prompt: int
    positions: torch.Tensor | None = None
    rounds: int = 0


@dataclass(frozen=True)
class BlockLayout:
    """Where token ``t``, dim ``d`` of one (block, KV head) sits in the attention kernel's K and V regions: flat
    offsets ``[block_size * D]``, indexed ``t * D + d`` (the CPU kernel's layout depends on its ISA: on AVX2, "vec",
    keys are stored dim-major and values token-major; found by :func:`~triattn_compile.vllm.attention.probe_layout`)."""

    key: torch.Tensor | None  # None: token-major (no reordering)
    value: torch.Tensor | None
    block_size: int
    dim: int

    @staticmethod
    def token_major(block_size: int, dim: int) -> BlockLayout:
        return BlockLayout(None, None, block_size, dim)

    @functools.cached_property
    def cells(self) -> torch.Tensor:
        """``[block_size, 2, D]``: where token ``t``'s key (``[t, 0, d]``) and value (``[t, 1, d]``) dims sit in a
        block's ``[2, block_size * D]`` K/V regions (flat offsets; made once per layout)."""
        size = self.block_size * self.dim
        plain = torch.arange(size)
        key, value = (plain if order is None else order for order in (self.key, self.value))
        return torch.stack([key.view(self.block_size, self.dim), value.view(self.block_size, self.dim) + size], 1)


def paged_view(kv: torch.Tensor) -> torch.Tensor:
    """vLLM's CPU KV tensor ``[num_blocks, Hkv, block_size, 2 * D]`` as ``[num_blocks, Hkv, 2, block_size * D]``
    (index 0: the keys' region, 1: the values'; the attention kernel reads it as ``[nb, Hkv, 2 * bs, D]``)."""
    blocks, heads, _, _ = kv.shape
    return kv.view(blocks, heads, 2, -1)


def slot_offsets(blocks: torch.Tensor, num_heads: int, layout: BlockLayout, heads: torch.Tensor,
                 slots: torch.Tensor) -> torch.Tensor:
    """``[M, 2, D]`` flat offsets, in one layer's paged tensor, of the key and value of request slot ``slots[i]``
    (token ``slot % bs`` of block ``blocks[slot // bs]``) of KV head ``heads[i]``."""
    cells = layout.cells.to(blocks.device)
    rows = blocks[slots // layout.block_size] * num_heads + heads
    return rows[:, None, None] * cells.numel() + cells[slots % layout.block_size]


def request_tokens(paged: list[torch.Tensor], blocks: torch.Tensor, layout: BlockLayout, kind: int) -> torch.Tensor:
    """The keys (``kind`` 0) or values (1) of ``blocks`` in every layer's paged tensor (:func:`paged_view`),
    token-major: ``[L, Hkv, len(blocks) * block_size, D]`` (one gather per layer into one new tensor)."""
    heads, n = paged[0].shape[1], len(blocks) * layout.block_size
    slots = torch.arange(n, device=blocks.device)
    index = slot_offsets(blocks, heads, layout, torch.arange(heads, device=blocks.device).repeat_interleave(n),
                         slots.repeat(heads))[:, kind].flatten()
    out = paged[0].new_empty(len(paged), index.numel())
    for i, p in enumerate(paged):
        torch.index_select(p.view(-1), 0, index, out=out[i])
    return out.view(len(paged), heads, n, layout.dim)


def fill_holes(keep: torch.Tensor, slots: int, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each kept token goes so that the kept ``keep`` ``[X, Hkv, budget]`` (slot indices of ``slots``) fill
    the first ``budget`` slots: kept tokens there stay put, each kept token past them moves into an evicted slot
    among them (attention does not depend on slot order; positions travel with the tokens). Returns ``movers`` and
    ``holes``, ``[M, 3]`` each (set, KV head, slot), pair ``i`` moving ``movers[i]`` to ``holes[i]``."""
    kept = torch.zeros(*keep.shape[:-1], slots, dtype=torch.bool, device=keep.device).scatter_(-1, keep, True)
    movers = kept[..., budget:].nonzero()
    movers[:, 2] += budget
    return movers, (~kept[..., :budget]).nonzero()  # same count per (set, head): in nonzero's order they pair up


def move_kept(paged: list[torch.Tensor], blocks: torch.Tensor, layout: BlockLayout, movers: torch.Tensor,
              holes: torch.Tensor, sets: int) -> None:
    """In place, in every layer's paged tensor: the key and value of each slot ``movers[i]`` into slot ``holes[i]``
    (:func:`fill_holes`; ``sets`` = 1: the same moves in every layer, else layer ``l`` makes set ``l``'s)."""
    heads = paged[0].shape[1]
    source, target = (slot_offsets(blocks, heads, layout, at[:, 1], at[:, 2]).flatten(1) for at in (movers, holes))
    for i, p in enumerate(paged):
        pick = slice(None) if sets == 1 else movers[:, 0] == i
        flat = p.view(-1)
        flat.index_copy_(0, target[pick].flatten(), flat.index_select(0, source[pick].flatten()))


def check_supported(layout: Layout) -> None:
    """Raise a one-line ``ValueError`` for a layout the paged compaction does not handle (checked at discovery, when
    the engine starts, and again when a compressor binds). Sliding-window layers are left to vLLM, whose
    sliding-window manager already keeps only their window; the policy decides the other layers."""
    if layout.latent_maps:
        raise ValueError("TriAttention in vLLM supports attention layers with per-head keys; this model has latent "
                         "(MLA) layers; serve it without the triattn setting, or use optimize()")
    if not layout.scored_layers:
        raise ValueError(ALL_WINDOWED)


class PagedCompressor:
    """One engine's compaction in a vLLM worker.

    Args:
        schedule: budget, divide length and block size.
        source: returns ``(layout, stats, kv_caches[, block_layout])`` when the first compaction needs them: the
            layout discovery found in vLLM's graph, the query statistics validated against it, per discovered layer
            its paged KV tensor (none of them exists yet when vLLM makes its metadata builders), and where the
            attention kernel stores a token in a block (:class:`BlockLayout`).
        policy: the eviction policy (TriAttention's score by default).
        protect_prompt: the prompt is kept whole.
    """

    def __init__(self, schedule: PagedSchedule, source: Callable[[], tuple],
                 policy: Policy | None = None, protect_prompt: bool = True):
        policy = TriAttention() if policy is None else policy
        if policy.query_window or policy.accumulate_attention or policy.distant_attention:
            raise ValueError(f"policy {policy.name!r} needs live queries or attention, which vLLM's graph does not "
                             "hand out; use a TriAttention score")
        self.schedule, self.policy, self.protect_prompt, self.source = schedule, policy, protect_prompt, source
        self.layout: Layout | None = None
        self.stats: QueryStats | None = None
        self.paged: list[torch.Tensor] = []
        self.block_layout: BlockLayout | None = None
        self.requests: dict[int, RequestState] = {}
        self.group: tuple[str, ...] | None = None  # the layer names of the KV cache group whose builder compacts
        self.compactions = 0
        self.seconds = {"compaction": 0.0, "metadata": 0.0}  # wall time in compact() / the rest of before_attention
        self.records: list[dict] = []
        self.record_limit = int(os.environ.get(RECORD_ENV, "0") or 0)

    # -- per step ---------------------------------------------------------------------------------------------------
    def before_attention(self, metadata):
        """Compact the rows due this step and return ``metadata`` (vLLM's ``CommonAttentionMetadata``) with their
        ``seq_lens`` / block table rows pointing at the live blocks."""
        start, compacting = time.perf_counter(), self.seconds["compaction"]
        out = self._rewrite(metadata)
        self.seconds["metadata"] += time.perf_counter() - start - (self.seconds["compaction"] - compacting)
        return out

    def _rewrite(self, metadata):
        s = self.schedule
        rows = metadata.num_reqs
        lengths = metadata.seq_lens[:rows].tolist()
        starts = metadata.query_start_loc_cpu[: rows + 1].tolist()
        prefilling = (metadata.is_prefilling[:rows].tolist() if metadata.is_prefilling is not None
                      else [False] * rows)
        table = metadata.block_table_tensor
        firsts = table[:rows, 0].tolist()
        changed: list[tuple[int, torch.Tensor, int]] = []
        for r in range(rows):
            n, q, first = lengths[r], starts[r + 1] - starts[r], firsts[r]
            if first == 0 or q == 0:  # padding, or the null block: not a live request
                continue
            if prefilling[r]:
                if n == q:
                    self.requests[first] = RequestState(prompt=n)
                elif first in self.requests:
                    self.requests[first].prompt = n
                continue
            state = self.requests.get(first)
            if state is None or n <= s.capacity:
                continue
            if q > 1:
                raise RuntimeError(f"TriAttention in vLLM: a request of {n} tokens was scheduled {q} tokens at once "
                                   "past its budget (recomputed after preemption, or speculative decoding); give the "
                                   "KV pool more room (VLLM_CPU_KVCACHE_SPACE) or lower max_num_seqs")
            if s.compacts_at(n - 1):
                self.compact(table[r], n - 1, state)
            changed.append((r, s.live_blocks(table[r], n), s.live_length(n)))
        if not changed:
            return metadata
        table, seq_lens = table.clone(), metadata.seq_lens.clone()
        for r, blocks, length in changed:
            table[r, : len(blocks)] = blocks
            table[r, len(blocks):] = 0
            seq_lens[r] = length
        return dataclasses.replace(metadata, block_table_tensor=table, seq_lens=seq_lens)

    # -- one request ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def compact(self, row: torch.Tensor, position: int, state: RequestState) -> torch.Tensor:
        """Keep ``budget`` tokens per KV head of the request whose block table row is ``row``, about to write
        ``position`` (its cache holds ``budget + divide_length`` tokens); returns the kept slots ``[X, 1, Hkv, B]``."""
        if self.layout is None:
            self.bind(*self.source())
        start = time.perf_counter()
        s, layout = self.schedule, self.layout
        bs = s.block_size
        blocks = torch.cat([row[: s.kept_blocks], row[(position - s.divide_length) // bs: position // bs]])
        heads = layout.num_kv_heads
        tail = torch.arange(position - s.divide_length, position, device=row.device)
        kept = (torch.arange(s.budget, device=row.device).expand(1, heads, s.budget) if state.positions is None
                else state.positions)
        positions = torch.cat([kept, tail.expand(kept.shape[0], heads, -1)], -1)  # [X, Hkv, N]
        recording = len(self.records) < self.record_limit
        keys = request_tokens(self.paged, blocks, self.block_layout, 0)  # [L, Hkv, N, D]
        values = (request_tokens(self.paged, blocks, self.block_layout, 1)
                  if self.policy.reads_values or recording else None)
        inputs = self.inputs(keys, values, positions, position, state)
        keep = keep_slots(self.policy.scores(inputs), inputs.num_protected, self.policy.recent_window, s.budget)
        if recording:
            self.records.append({"position": position, "prompt": state.prompt, "round": state.rounds,
                                 "layers": self.layout.scored_layers,
                                 "positions": positions.tolist(), "keep": keep.tolist(),
                                 "keys": keys.tolist(), "values": values.tolist()})
        sets = keep.shape[0]
        movers, holes = fill_holes(keep[:, 0], positions.shape[-1], s.budget)
        move_kept(self.paged, blocks, self.block_layout, movers, holes, sets)
        positions = positions.expand(sets, -1, -1)
        state.positions = positions[..., : s.budget].clone()
        state.positions[holes.unbind(1)] = positions[movers.unbind(1)]
        state.rounds += 1
        self.compactions += 1
        self.seconds["compaction"] += time.perf_counter() - start
        return keep

    def bind(self, layout: Layout, stats: QueryStats, kv_caches: list[torch.Tensor],
             block_layout: BlockLayout | None = None) -> None:
        """Take the layout, statistics, paged KV tensors (one per layer; the sliding-window layers' are left alone)
        and where the kernel puts a token in a block (``source``'s result; token-major where not given)."""
        check_supported(layout)
        self.layout, self.stats = layout, stats
        self.paged = [paged_view(kv_caches[i]) for i in layout.scored_layers]
        self.block_layout = block_layout or BlockLayout.token_major(self.schedule.block_size, layout.head_dim)

    def inputs(self, keys: torch.Tensor, values: torch.Tensor | None, positions: torch.Tensor, position: int,
               state: RequestState) -> CompactionInputs:
        """What the policy sees (``schedule.compaction_inputs`` of the HF path, for one request of vLLM's cache, the
        scored layers stacked: ``keys``/``values`` ``[L', Hkv, N, D]``; values only for a policy that reads them)."""
        layout, stats = self.layout, self.stats
        start = layout.rotary.rotary_start
        scored = layout.scored_layers
        pick = (lambda t: t) if len(scored) == layout.num_layers else (lambda t: None if t is None else t[scored])
        return CompactionInputs(
            keys=(keys.roll(-start, -1) if start else keys)[:, None],
            positions=positions[:, None].expand(len(scored), -1, -1, -1),
            next_position=position,
            num_protected=state.prompt if self.protect_prompt else 0,
            round=state.rounds,
            q_mean=pick(stats.q_mean()),
            q_abs=pick(stats.q_abs()),
            omega=pick(layout.omega),
            pairing=layout.rotary.key_pairing,
            scale=float(layout.attention_scaling),
            q_pass=pick(stats.q_pass_mean()),
            values=None if values is None else values[:, None],
            budget=self.schedule.budget,
        )

    def report(self) -> dict:
        """JSON-able: compactions so far, requests seen, wall seconds spent compacting and rewriting metadata, and the
        recorded compactions (``TRIATTN_VLLM_RECORD``)."""
        return {"compactions": self.compactions, "requests": len(self.requests), "seconds": dict(self.seconds),
                "records": self.records}
