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
from dataclasses import replace

import torch

from triattn_compile.cache import CompressedCache
from triattn_compile.calibration.stats import TENSOR_NAMES, QueryStats
from triattn_compile.config import TriAttentionConfig
from triattn_compile.kernels.compact import as_rows, compact, finish_compaction, keep_slots
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

    def __init__(self, config: TriAttentionConfig, layout: Layout, device: torch.device,
                 model: torch.nn.Module | None = None):
        self.layout, self.device = layout, device
        c = config
        self.policy: Policy = make_policy(c.policy, per_layer=c.per_layer, max_offset=c.max_offset, noise=c.noise,
                                          seed=c.seed)
        planned = (None if model is None or c.layer_budgets is not None
                   else self.policy.layer_budgets(model, c.budget, layout, c.divide_length))
        if planned:  # the policy spends the same mean budget unevenly over the layers
            c = replace(c, budget=None, layer_budgets=planned, policy=self.policy)
        self.config = c
        if layout.latent_maps and (self.policy.query_window or self.policy.accumulate_attention
                                   or self.policy.distant_attention):
            raise PassError(f"policy {self.policy.name!r} needs per-head keys, which a latent (MLA) cache does not "
                            "hold; use policy='triattention' or 'streamingllm' with this model")
        self.online = c.stats is None
        self.stats = (QueryStats(layout.signature, device) if self.online
                      else QueryStats.load(c.stats, layout.signature, device))
        self.cache: CompressedCache | None = None
        self.compaction_seconds = 0.0
        self.extra = self._extra_slots()  # layer_budgets checked against the layout now, in one line

    def reset_stats(self) -> None:
        """Online statistics start again from no query (e.g. before an unrelated sequence)."""
        self.stats = QueryStats(self.layout.signature, self.device)

    @property
    def capacity(self) -> int:
        """Ring slots per layer and KV head, where new tokens go: ``shared_budget + divide_length``."""
        return self.config.shared_budget + self.config.divide_length

    def _extra_slots(self) -> list[int]:
        """Per layer, the slots kept beyond the shared budget (all 0 without ``layer_budgets``)."""
        budgets = self.config.layer_budgets
        if budgets is None:
            return [0] * self.layout.num_layers
        if len(budgets) != self.layout.num_layers:
            raise ValueError(f"layer_budgets has {len(budgets)} entries and the model {self.layout.num_layers} "
                             "attention layers: give one budget per attention layer")
        windowed = [i for i in self.layout.windowed_layers if budgets[i] != self.config.shared_budget]
        if windowed:
            raise ValueError(f"layer_budgets gives sliding-window layers {windowed} more than the smallest budget "
                             f"({self.config.shared_budget}); they keep their most recent tokens: give them that")
        return [b - self.config.shared_budget for b in budgets]

    def budget_groups(self) -> list[list[int]]:
        """The scored layers, grouped by budget (a policy scores each group as one stack; a keep set shared
        across layers is shared within its group)."""
        groups: dict[int, list[int]] = {}
        for i in self.layout.scored_layers:
            groups.setdefault(self.extra[i], []).append(i)
        return list(groups.values())

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
        cache = CompressedCache(layout.num_layers, self.config.shared_budget, self.config.divide_length, device,
                                batch, self.extra)
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
            cache.attention = torch.zeros(layout.num_layers, batch, layout.num_kv_heads, cache.width, device=device)
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

    def compact(self, cache: CompressedCache, rows: int | slice = 0) -> list[torch.Tensor]:
        """Score ``rows`` with the policy, keep each layer's budget of slots per KV head, compact in place; returns
        the kept slots of each budget group (:meth:`budget_groups`), ``[X, B, Hkv, budget]`` indices into
        :meth:`~triattn_compile.cache.CompressedCache.held_slots` (none when every layer is a sliding-window
        layer)."""
        kept, windowed = [], self.layout.windowed_layers
        for layers in self.budget_groups():
            inputs = compaction_inputs(cache, self, rows, layers)
            keep = keep_slots(self.policy.scores(inputs), inputs.num_protected, self.policy.recent_window,
                              inputs.budget)
            compact(cache, keep, rows, layers=layers)
            kept.append(keep)
        if windowed:
            compact(cache, None, rows, windowed, layers=list(windowed))
        finish_compaction(cache, rows)
        return kept


def scoring_keys(cache: CompressedCache, layout: Layout, layer: int, rows: slice,
                 held: slice | torch.Tensor) -> torch.Tensor:
    """A layer's ``held`` keys (:meth:`~triattn_compile.cache.CompressedCache.held_slots`) laid out like the
    statistics, ``[rotary ; pass-through]`` (a latent layer: ``[k_pe ; latent]``, scored against the folded query
    centre, ``kernels/scoring/naive.py``)."""
    keys = cache.layers[layer].keys[rows, :, held]
    if layer in layout.latent_maps:
        return torch.cat([cache.layers[layer].values[rows, :, held], keys], -1)
    start = layout.rotary.rotary_start
    return keys.roll(-start, -1) if start else keys


def compaction_inputs(cache: CompressedCache, compressor: Compressor, rows: int | slice = 0,
                      layers: list[int] | None = None) -> CompactionInputs:
    """What the policy sees for ``rows`` (one row, or adjacent rows on the same schedule: ``cache.full_groups()``):
    their held slots in temporal order (:meth:`~triattn_compile.cache.CompressedCache.held_slots`), position and
    protected prompt, and the compressor's statistics, for ``layers`` (layers of one budget; default the layers the
    policy decides: sliding-window layers keep their most recent tokens instead)."""
    layout, stats = compressor.layout, compressor.stats
    rows = as_rows(rows)
    first = rows.start
    layers = layout.scored_layers if layers is None else layers
    budgets = {cache.layer_budget(i) for i in layers} or {cache.budget}  # none: every layer is a window layer
    if len(budgets) > 1:
        raise ValueError(f"compaction inputs of layers with different budgets {sorted(budgets)}: score each budget "
                         "group on its own (Compressor.budget_groups)")
    held = cache.held_slots(first, layers[0]) if layers else slice(0, cache.fill[first])  # alike in a budget group
    pick = (lambda t: t) if list(layers) == list(range(len(cache.layers))) else (lambda t: t[layers])
    q_pass = pick(stats.q_pass_mean())
    if layout.latent_maps:
        q_pass = [fold_latent_query(q, layout.latent_maps[i]) if i in layout.latent_maps else q
                  for i, q in zip(layers, q_pass)]
    queries = None if cache.queries is None else pick(cache.queries)[:, rows]
    start = layout.rotary.rotary_start
    return CompactionInputs(
        keys=[scoring_keys(cache, layout, i, rows, held) for i in layers],
        positions=pick(cache.slot_pos)[:, rows][..., held],
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
        attention=None if cache.attention is None else pick(cache.attention)[:, rows][..., held],
        distant_attention=(None if cache.distant_attention is None
                           else pick(cache.distant_attention)[:, rows][..., held]),
        values=[cache.layers[i].values[rows, :, held] for i in layers],
        budget=min(budgets.pop(), held.stop if isinstance(held, slice) else held.numel()),  # more than held: all
        layers=list(layers),
    )
