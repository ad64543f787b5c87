"""The host side of the compression schedule: what ``optimize`` attaches to a model, and when it compacts.

A :class:`Compressor` holds one optimized model's settings, its discovered :class:`~triattn_compile.passes.discover
.Layout`, its eviction policy and its query statistics. Per call it makes the step's extra inputs
(:meth:`Compressor.step_inputs`) and, after the step, advances the host counters and compacts the rows that are full
(:meth:`Compressor.after_step`): the policy scores the occupied slots (:func:`compaction_inputs`), ``keep_slots``
picks the kept ones and ``kernels/compact.py`` gathers them in place. The host knows when a row is full because it
fed the tokens: nothing is read back from the device.

``triattn_compile.inspect(model)`` returns the model's :class:`Compressor`.
"""

from __future__ import annotations

import time

import torch

from triattn_compile.cache import CompressedCache
from triattn_compile.calibration.stats import TENSOR_NAMES, QueryStats
from triattn_compile.config import TriAttentionConfig
from triattn_compile.kernels.compact import as_rows, compact, keep_slots
from triattn_compile.kernels.scoring.naive import fold_latent_query
from triattn_compile.passes.discover import Layout
from triattn_compile.passes.match import PassError
from triattn_compile.policies import CompactionInputs, Policy, make_policy


class Compressor:
    """One optimized model's compression: settings, layout, policy, statistics, and its latest cache.

    Attributes:
        config: the :class:`TriAttentionConfig` it was optimized with.
        layout: what discovery found in the model's graph.
        policy: the eviction policy.
        stats: the query statistics it scores with (a loaded file, or running sums filled online).
        online: statistics are gathered from the live queries (no file was given).
        cache: the compressed cache of the latest call (``None`` before the first).
        compaction_seconds: wall time spent compacting so far (benchmarks).
    """

    def __init__(self, config: TriAttentionConfig, layout: Layout, device: torch.device):
        self.config, self.layout, self.device = config, layout, device
        c = config
        self.policy: Policy = make_policy(c.policy, per_layer=c.per_layer, max_offset=c.max_offset, noise=c.noise,
                                          seed=c.seed)
        if layout.latent_maps and (self.policy.query_window or self.policy.accumulate_attention
                                   or self.policy.distant_attention):
            raise PassError(f"policy {self.policy.name!r} needs per-head keys, which a latent (MLA) cache does not "
                            "hold; use policy='triattention' or 'streamingllm' with this model")
        self.online = c.stats is None
        self.stats = (QueryStats(layout.signature, device) if self.online
                      else QueryStats.load(c.stats, layout.signature, device))
        self.cache: CompressedCache | None = None
        self.compaction_seconds = 0.0

    def reset_stats(self) -> None:
        """Online statistics start again from no query (e.g. before an unrelated sequence)."""
        self.stats = QueryStats(self.layout.signature, self.device)

    @property
    def capacity(self) -> int:
        """Slots per layer and KV head: ``budget + divide_length``."""
        return self.config.budget + self.config.divide_length

    # -- the compiled step's extra inputs ---------------------------------------------------------------------------
    def step_input_names(self) -> list[str]:
        """Names of :meth:`step_inputs`, in order (the backend finds them by these names)."""
        names = ["ctrl", "slot_pos", *TENSOR_NAMES]
        if self.policy.query_window:
            names.append("queries")
        if self.policy.accumulate_attention or self.policy.distant_attention:
            names.append("attention")
        if self.policy.distant_attention:
            names.append("distant_attention")
        return names

    def step_inputs(self, cache: CompressedCache) -> list[torch.Tensor]:
        """The tensors the compiled step reads beyond the model's inputs: ``cache``'s counters, slot positions and
        the policy's observations, and the statistics."""
        named = {"ctrl": cache.ctrl, "slot_pos": cache.slot_pos, "queries": cache.queries,
                 "attention": cache.attention, "distant_attention": cache.distant_attention,
                 **dict(zip(TENSOR_NAMES, self.stats.tensors()))}
        return [named[name] for name in self.step_input_names()]

    # -- cache ------------------------------------------------------------------------------------------------------
    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> CompressedCache:
        """An empty cache of :attr:`capacity` slots for ``batch`` rows, shaped by the layout."""
        layout = self.layout
        cache = CompressedCache(layout.num_layers, self.config.budget, self.config.divide_length, device, batch)
        for layer, spec in zip(cache.layers, layout.layers):
            layer.lazy_initialization(
                torch.empty(batch, layout.num_kv_heads, 0, spec.key_dim, dtype=dtype, device=device),
                torch.empty(batch, layout.num_kv_heads, 0, spec.value_dim, dtype=dtype, device=device))
        cache.allocate_positions(batch, layout.num_kv_heads)
        window = self.policy.query_window
        if window:
            cache.queries = torch.zeros(layout.num_layers, batch, layout.num_heads, window, layout.head_dim,
                                        device=device, dtype=dtype)
        if self.policy.accumulate_attention or self.policy.distant_attention:
            cache.attention = torch.zeros(layout.num_layers, batch, layout.num_kv_heads, self.capacity, device=device)
        if self.policy.distant_attention:
            cache.distant_attention = torch.zeros_like(cache.attention)
        return cache

    def after_step(self, cache: CompressedCache, tokens: int) -> None:
        """Host side of a step: advance the host counters, and compact the full rows, one call per run of rows on the
        same schedule (no device read)."""
        cache.record_write(tokens, self.config.protect_prompt)
        if cache.is_full():
            start = time.perf_counter()
            for rows in cache.full_groups():
                self.compact(cache, rows)
            if cache.ctrl.is_cuda:
                torch.cuda.synchronize(cache.ctrl.device)
            self.compaction_seconds += time.perf_counter() - start

    def compact(self, cache: CompressedCache, rows: int | slice = 0) -> torch.Tensor | None:
        """Score ``rows`` with the policy, keep the best ``budget`` slots per KV head, compact in place; returns the
        kept slots ``[X, B, Hkv, budget]`` (``None`` when every layer is a sliding-window layer)."""
        inputs = compaction_inputs(cache, self, rows)
        keep = (keep_slots(self.policy.scores(inputs), inputs.num_protected, self.policy.recent_window,
                           cache.budget) if inputs.keys else None)
        compact(cache, keep, rows, self.layout.windowed_layers)
        return keep


def scoring_keys(cache: CompressedCache, layout: Layout, layer: int, rows: slice, used: int) -> torch.Tensor:
    """A layer's occupied keys laid out like the statistics, ``[rotary ; pass-through]`` (a latent layer:
    ``[k_pe ; latent]``, scored against the folded query centre, ``kernels/scoring/naive.py``)."""
    keys = cache.layers[layer].keys[rows, :, :used]
    if layer in layout.latent_maps:
        return torch.cat([cache.layers[layer].values[rows, :, :used], keys], -1)
    start = layout.rotary.rotary_start
    return keys.roll(-start, -1) if start else keys


def compaction_inputs(cache: CompressedCache, compressor: Compressor, rows: int | slice = 0) -> CompactionInputs:
    """What the policy sees for ``rows`` (one row, or adjacent rows on the same schedule: ``cache.full_groups()``):
    their occupied slots, position and protected prompt, and the compressor's statistics, for the layers the policy
    decides (sliding-window layers keep their most recent tokens instead)."""
    layout, stats = compressor.layout, compressor.stats
    rows = as_rows(rows)
    first = rows.start
    used = cache.fill[first]
    layers = layout.scored_layers
    pick = (lambda t: t) if len(layers) == len(cache.layers) else (lambda t: t[layers])
    q_pass = pick(stats.q_pass_mean())
    if layout.latent_maps:
        q_pass = [fold_latent_query(q, layout.latent_maps[i]) if i in layout.latent_maps else q
                  for i, q in zip(layers, q_pass)]
    queries = None if cache.queries is None else pick(cache.queries)[:, rows]
    start = layout.rotary.rotary_start
    return CompactionInputs(
        keys=[scoring_keys(cache, layout, i, rows, used) for i in layers],
        positions=pick(cache.slot_pos)[:, rows, :, :used],
        next_position=cache.seen - cache.pads[first],
        num_protected=cache.prompt[first],
        round=cache.row_rounds[first],
        q_mean=pick(stats.q_mean()),
        q_abs=pick(stats.q_abs()),
        q_pass=q_pass,
        omega=pick(layout.omega),
        pairing=layout.rotary.key_pairing,
        scale=float(layout.attention_scaling),
        queries=queries.roll(-start, -1) if queries is not None and start else queries,
        attention=None if cache.attention is None else pick(cache.attention)[:, rows, :, :used],
        distant_attention=(None if cache.distant_attention is None
                           else pick(cache.distant_attention)[:, rows, :, :used]),
        values=[cache.layers[i].values[rows, :, :used] for i in layers],
        budget=cache.budget,
    )
