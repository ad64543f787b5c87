"""Discovery: what a traced decoder computes at its attention sites, as a frozen :class:`Layout`.

:func:`discover_layout` reads everything the rewrite, the cache and the scoring need off one Dynamo graph and its
example inputs: per layer the rotary form, pairing, rotary dims and first rotary dim, the RoPE frequencies, the
attention form, the sliding window, the cached key/value widths and (multi-head latent attention) the key
up-projection; and for the model the head counts, head_dim and attention scaling. Shapes come from the graph's
fake tensors, never from a model config; only sliding windows are read from the config transformers builds its
masks from (``sliding_window``, ``layer_types``), when there is one. It knows nothing about caches, statistics or
policies, so it can be pointed at any graph that :func:`~triattn_compile.passes.match.find_attention_sites` reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule

from triattn_compile.calibration.stats import RotarySignature, rope_fingerprint
from triattn_compile.passes.frequencies import rotary_frequencies
from triattn_compile.passes.latent import latent_projection
from triattn_compile.passes.match import AttentionSite, PassError, PatternNotFound
from triattn_compile.passes.rotary import fake_value


@dataclass(frozen=True)
class LayerLayout:
    """One attention layer as found in the graph.

    Attributes:
        index: the layer's attention site, in graph order.
        module: the module that computes it (``nn_module_stack``), for messages.
        rotary_form: the rotary form matched on the query (``passes/rotary.py``), ``"none (NoPE)"`` without RoPE.
        pairing: how the pre-RoPE query pairs its dims into bands (``"half"``/``"interleaved"``; NoPE: ``"none"``).
        key_pairing: how the rotated (cached) keys pair their dims.
        rotary_dim: rotated dims of a head (0 for NoPE); rotary_start: the first of them.
        attention: ``"sdpa"``, ``"eager"`` (matmul -> softmax -> matmul) or ``"vllm"`` (vLLM's paged attention op).
        window: sliding window (0: global attention, compressed by the policy).
        key_dim, value_dim: last dims of the cached keys and values (a latent layer caches the latent as keys and
            the rotated key part as values).
        latent: multi-head latent attention (the cache holds a latent and one shared rotated key part).
    """

    index: int
    module: str
    rotary_form: str
    pairing: str
    key_pairing: str
    rotary_dim: int
    rotary_start: int
    attention: str
    window: int
    key_dim: int
    value_dim: int
    latent: bool


@dataclass(frozen=True)
class Layout:
    """The attention layout of a traced decoder (:func:`discover_layout`).

    Attributes:
        layers: one :class:`LayerLayout` per attention site.
        num_heads, num_kv_heads, head_dim: query heads, KV heads and head width (equal in every layer).
        omega: ``[L, F]`` float64 RoPE angular frequencies per layer (zeros for NoPE layers).
        attention_scaling: magnitude of the cos/sin tables (YaRN-style scaling; 1 for plain RoPE).
        latent_maps: latent layers' key up-projections ``{layer: [H, R, P]}``.
    """

    layers: tuple[LayerLayout, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    attention_scaling: float
    omega: torch.Tensor = field(compare=False, repr=False)
    latent_maps: dict[int, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def rotary(self) -> LayerLayout:
        """The first RoPE layer (every RoPE layer shares its pairing and rotary dims)."""
        return next(layer for layer in self.layers if layer.rotary_dim)

    @property
    def windows(self) -> list[int]:
        return [layer.window for layer in self.layers]

    @property
    def windowed_layers(self) -> list[int]:
        """Sliding-window layers: they keep their most recent tokens; the policy scores the other layers."""
        return [layer.index for layer in self.layers if layer.window]

    @property
    def scored_layers(self) -> list[int]:
        """The layers the policy decides (every layer but the sliding-window ones)."""
        return [layer.index for layer in self.layers if not layer.window]

    @property
    def signature(self) -> RotarySignature:
        """What a statistics file must agree on with this layout."""
        r = self.rotary
        return RotarySignature(
            num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, rotary_dim=r.rotary_dim, pairing=r.pairing,
            rope_fingerprint=rope_fingerprint(self.omega), attention_scaling=self.attention_scaling,
            nope_layers=",".join(str(layer.index) for layer in self.layers if not layer.rotary_dim),
            rotary_start=r.rotary_start,
        )

    def describe(self) -> str:
        """What the pass recognised, in words."""
        r = self.rotary
        nope = [str(layer.index) for layer in self.layers if not layer.rotary_dim]
        parts = [f"{r.rotary_form} rotary ({r.pairing} pairs, dims {r.rotary_start}..{r.rotary_start + r.rotary_dim})"]
        if nope:
            parts.append(f"NoPE layers {','.join(nope)}")
        parts.append(f"{self.layers[0].attention} attention, {self.num_heads} query / {self.num_kv_heads} KV heads "
                     f"of {self.head_dim} over {self.num_layers} layers")
        if self.latent_maps:
            parts.append("latent (MLA) keys")
        if self.windowed_layers:
            windowed = ",".join(map(str, self.windowed_layers))
            parts.append(f"sliding window {max(self.windows)} on layers {windowed}")
        return ", ".join(parts)

    def same_as(self, other: Layout) -> bool:
        """Whether ``other`` (a later graph of the same model) has this layout. The attention scaling is measured in
        the model's dtype (bf16/fp16 graphs differ in the 3rd digit); a graph without a cache (calibration) shows
        no cached widths, and is compared on its rotary signature only."""
        mine, theirs = self.signature, other.signature
        if abs(theirs.attention_scaling - mine.attention_scaling) < 1e-2:
            theirs = dataclasses.replace(theirs, attention_scaling=mine.attention_scaling)
        cached = all(layer.key_dim for layer in other.layers)
        return theirs == mine and (not cached or other.layers == self.layers)


def sliding_windows(config: object, sites: list[AttentionSite], budget: int | None) -> list[int]:
    """Per attention site, its sliding window (0 for global attention), from a transformers config's
    ``sliding_window`` and ``layer_types``. A window layer keeps its exact window: it is masked to it and keeps its
    most recent ``budget`` tokens at each compaction, so the window must fit the budget (``None``: nothing is
    compressed, e.g. calibration; not checked)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None) or 0
    types = getattr(config, "layer_types", None) or []
    windows = []
    for site in sites:
        kind = types[site.layer] if site.layer < len(types) else None
        windows.append(window if kind in (None, "sliding_attention") else 0)
        if budget is not None and windows[-1] > budget:
            raise PassError(
                f"attention site {site.layer} ({site.module}): sliding window {window} does not fit budget {budget}; "
                f"use budget >= {window} so that window layers keep their whole window"
            )
    return windows


def _check_uniform(sites: list[AttentionSite]) -> None:
    """Every RoPE layer rotates like the first; every layer has the first's KV heads and head_dim."""
    roped = [s for s in sites if s.query.rotary_dim > 0]
    if not roped:
        raise PatternNotFound("no attention site applies a rotary embedding: TriAttention needs RoPE layers")
    q = roped[0].query
    for site in roped[1:]:
        if site.query.layout != q.layout:
            raise PatternNotFound(
                f"attention site {site.layer} ({site.module}): rotary {site.query.form} {site.query.pairing} "
                f"over dims {site.query.rotary_start}+{site.query.rotary_dim} differs from site "
                f"{roped[0].layer} ({q.pairing} over {q.rotary_start}+{q.rotary_dim}); per-layer rotary layouts "
                "are not supported"
            )
    first = _kv_shape(sites[0])
    for site in sites[1:]:
        shape = _kv_shape(site)
        if shape != first:
            raise PatternNotFound(
                f"attention site {site.layer} ({site.module}): {shape[0]} KV heads of head_dim {shape[1]} differ "
                f"from site 0's {first[0]} of {first[1]}; per-layer attention shapes are not supported"
            )


def _kv_shape(site: AttentionSite) -> tuple[int, int]:
    """``(KV heads, head_dim)``: the cached key is ``[B, Hkv, S, D]`` (a cache laid out ``[B, S, Hkv, D]``:
    ``site.cache_axis`` 1; vLLM's key is ``[T, Hkv, D]``); where no cache was located (calibration), the heads
    followed back from the attention's key operand (``site.kv_heads``)."""
    head_dim = int(fake_value(site.query.pre).shape[-1])
    cached = site.key_buffer is not None or site.appended is not None or site.latent is not None
    if site.form != "vllm" and not cached and site.kv_heads is not None:
        return site.kv_heads, head_dim
    axis = 1 if site.form == "vllm" else 3 - site.cache_axis
    return int(fake_value(site.key_source).shape[axis]), head_dim


def discover_layout(
    gm: GraphModule,
    sites: list[AttentionSite],
    example_inputs: list,
    *,
    config: object = None,
    budget: int | None = 0,
    fallback_omega: torch.Tensor | None = None,
    latent: bool = True,
    known: Layout | None = None,
    positions: dict | None = None,
) -> Layout:
    """The :class:`Layout` of ``gm``'s attention ``sites``.

    Args:
        config: the model's config, if any (sliding windows); budget: the compression budget (a window must fit).
        fallback_omega: RoPE frequencies to use where the graph shows none (the model's ``inv_freq``, or ``[L, F]``
            found on an earlier graph).
        latent: read latent (MLA) layers' key up-projections (needs the sites' cache buffers).
        known: the layout of an earlier graph of the same model, whose RoPE frequencies and attention scaling are
            kept (they are the model's; evaluating the cos/sin tables again would specialize a dynamic graph).
        positions: ``{placeholder: arange(T)}`` to evaluate the cos/sin tables at (``frequencies.rotary_frequencies``).
    Raises:
        PatternNotFound: layers that disagree on their rotary layout or attention shapes, or no RoPE layer.
    """
    _check_uniform(sites)
    windows = sliding_windows(config, sites, budget) if config is not None else [0] * len(sites)
    q = next(s.query for s in sites if s.query.rotary_dim)
    per_layer = fallback_omega is not None and fallback_omega.dim() == 2 and len(fallback_omega) == len(sites)
    freqs = [
        (known.omega[i], known.attention_scaling) if known is not None and s.query.rotary_dim
        else rotary_frequencies(gm, s, example_inputs, fallback_omega[i] if per_layer else fallback_omega, positions)
        if s.query.rotary_dim else (torch.zeros(q.rotary_dim // 2, dtype=torch.float64), None)
        for i, s in enumerate(sites)
    ]
    latent_sites = [s for s in sites if s.latent is not None and s.latent.latent is not None] if latent else []
    num_kv, head_dim = _kv_shape(sites[0])
    layers = tuple(
        LayerLayout(
            index=s.layer, module=s.module, rotary_form=s.query.form,
            pairing=s.query.pairing if s.query.rotary_dim else "none",
            key_pairing=s.query.key_pairing if s.query.rotary_dim else "none", rotary_dim=int(s.query.rotary_dim),
            rotary_start=int(s.query.rotary_start), attention=s.form, window=w, key_dim=s.kv_dims[0],
            value_dim=s.kv_dims[1], latent=s.latent is not None,
        )
        for s, w in zip(sites, windows)
    )
    return Layout(
        layers=layers,
        num_heads=int(fake_value(sites[0].query.pre).shape[sites[0].head_axis]),
        num_kv_heads=num_kv,
        head_dim=head_dim,
        attention_scaling=round(next(f[1] for f in freqs if f[1] is not None), 6),
        omega=torch.stack([f[0] for f in freqs]),
        latent_maps={s.layer: latent_projection(gm, s, example_inputs) for s in latent_sites},
    )
