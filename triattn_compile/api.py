"""Public entry points: :func:`optimize` (compress a model's KV cache) and :func:`calibrate` (offline statistics).

``optimize`` traces the model once to find its attention sites and rotary signature, loads (or prepares online)
the query statistics, and installs an instance-level ``forward`` that runs the model compiled with the TriAttention
backend over a :class:`~triattn_compile.cache.CompressedCache`. :func:`restore` removes it again.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time

import torch
from torch import nn

from triattn_compile.cache import CACHE_KEYWORDS, CompressedCache, cache_keyword, query_positions
from triattn_compile.calibration.stats import QueryStats, RotarySignature, rope_fingerprint
from triattn_compile.config import TriAttentionConfig
from triattn_compile.kernels.compact import compact, compaction_inputs
from triattn_compile.passes.backend import TriAttentionBackend
from triattn_compile.passes.frequencies import rotary_frequencies
from triattn_compile.passes.latent import latent_projection
from triattn_compile.passes.match import PassError, PatternNotFound
from triattn_compile.passes.rotary import fake_value
from triattn_compile.policies import Policy, make_policy

log = logging.getLogger(__name__)


class TriAttentionState:
    """Everything ``optimize`` attaches to a model: config, rotary signature, statistics, the live cache."""

    def __init__(self, model: nn.Module, config: TriAttentionConfig):
        self.model = model
        self.config = config
        self.capacity = config.budget + config.divide_length
        self.signature: RotarySignature | None = None
        self.omega: torch.Tensor | None = None  # [L, F] float64
        self.stats: QueryStats | None = None
        self.online = config.stats is None
        self.cache: CompressedCache | None = None
        self.original_forward = model.forward
        self.cache_keyword = cache_keyword(model.forward)
        self.device = next(model.parameters()).device  # the statistics live with the model (graph inputs)
        c = config
        self.policy: Policy = make_policy(c.policy, per_layer=c.per_layer, max_offset=c.max_offset, noise=c.noise,
                                          seed=c.seed)
        self.compaction_seconds = 0.0  # wall time spent in compact(), for benchmarks
        self.windows: list[int] = []  # per layer: sliding window (0 = global attention, compressed by the policy)
        self.key_pairing, self.rotary_start = "half", 0  # layout of the cached (rotated) keys
        self.kv_dims: list[tuple[int, int]] = []  # per layer: last dims of the cached keys and values
        self.latent_maps: dict[int, torch.Tensor] = {}  # latent (MLA) layers: key up-projection [H, R, P]

    # -- filled in by the backend -------------------------------------------------------------------------------
    def observe(self, gm, sites, example_inputs) -> None:
        """Record (first graph) or check (later graphs) the rotary signature found in a traced graph."""
        self.windows = sliding_windows(self.model, sites, self.config.budget)
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
        self.key_pairing, self.rotary_start = q.key_pairing, q.rotary_start
        if any(s.kv_dims[0] for s in sites):
            self.kv_dims = [s.kv_dims for s in sites]
        self._observe_latent(gm, sites, example_inputs)
        inv_freq = next((b for n, b in self.model.named_buffers() if n.endswith("inv_freq")), None)
        # later graphs (prefill, decode) fall back to the frequencies found on the first (the probe at positions 0, 1)
        fallbacks = list(self.omega) if self.omega is not None and len(self.omega) == len(sites) else None
        no_rope = (torch.zeros(q.rotary_dim // 2, dtype=torch.float64), None)  # NoPE layers: ω unused
        freqs = [
            rotary_frequencies(gm, s, example_inputs, fallbacks[i] if fallbacks else inv_freq)
            if s.query.rotary_dim else no_rope
            for i, s in enumerate(sites)
        ]
        omega = torch.stack([f[0] for f in freqs])
        scale = freqs[roped[0].layer][1]
        q_val = fake_value(sites[0].query.pre)
        num_kv = int(fake_value(sites[0].key_source).shape[1])  # key before repeat_kv: [B, Hkv, S, D]
        for site in sites[1:]:
            shape = (int(fake_value(site.key_source).shape[1]), int(fake_value(site.query.pre).shape[-1]))
            if shape != (num_kv, int(q_val.shape[-1])):
                raise PatternNotFound(
                    f"attention site {site.layer} ({site.module}): {shape[0]} KV heads of head_dim {shape[1]} differ "
                    f"from site 0's {num_kv} of {int(q_val.shape[-1])}; per-layer attention shapes are not supported"
                )
        signature = RotarySignature(
            num_layers=len(sites),
            num_heads=int(q_val.shape[sites[0].head_axis]),
            num_kv_heads=num_kv,
            head_dim=int(q_val.shape[-1]),
            rotary_dim=int(q.rotary_dim),
            pairing=q.pairing,
            rope_fingerprint=rope_fingerprint(omega),
            attention_scaling=round(scale, 6),
            nope_layers=",".join(str(s.layer) for s in sites if not s.query.rotary_dim),
            rotary_start=int(q.rotary_start),
        )
        nope = f", NoPE layers {signature.nope_layers}" if signature.nope_layers else ""
        windowed = ",".join(str(i) for i in self.windowed_layers)
        window = f", sliding window {max(self.windows)} on layers {windowed}" if windowed else ""
        latent = ", latent (MLA) keys" if self.latent_maps else ""
        self.forms = f"{q.form} rotary{nope}, {sites[0].form} attention{latent}{window}"  # what the pass recognised
        if self.signature is not None and abs(signature.attention_scaling - self.signature.attention_scaling) < 1e-2:
            # the scaling is measured from cos/sin in the model's dtype: bf16/fp16 graphs differ in the 3rd digit
            signature = dataclasses.replace(signature, attention_scaling=self.signature.attention_scaling)
        if self.signature is None:
            self.signature, self.omega = signature, omega
        elif signature != self.signature:
            raise PatternNotFound(f"a later graph of the model has a different attention layout: {signature}")

    def _observe_latent(self, gm, sites, example_inputs) -> None:
        """Multi-head latent attention: read each layer's key up-projection off the first graph with a cache."""
        latent = [s for s in sites if s.latent is not None and s.latent.latent is not None]
        if not latent or self.latent_maps:
            return
        if self.policy.query_window or self.policy.accumulate_attention:
            raise PassError(f"policy {self.policy.name!r} needs per-head keys, which a latent (MLA) cache does not "
                             "hold; use policy='triattention' or 'streamingllm' with this model")
        self.latent_maps = {s.layer: latent_projection(gm, s, example_inputs) for s in latent}

    def scoring_keys(self, cache: CompressedCache, layer: int, rows: slice, used: int) -> torch.Tensor:
        """A layer's occupied keys laid out like the statistics, ``[rotary ; pass-through]`` (a latent layer:
        ``[k_pe ; latent]``, scored against the folded query centre, ``kernels/scoring/naive.py``)."""
        keys = cache.layers[layer].keys[rows, :, :used]
        if layer in self.latent_maps:
            return torch.cat([cache.layers[layer].values[rows, :, :used], keys], -1)
        return keys.roll(-self.rotary_start, -1) if self.rotary_start else keys

    @property
    def windowed_layers(self) -> list[int]:
        """Sliding-window layers: they keep their most recent tokens; the policy scores the other layers."""
        return [i for i, w in enumerate(self.windows) if w]

    def find_ctrl(self, gm, example_inputs):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, example_inputs):
            if value is self.cache.ctrl:
                return node
        raise PatternNotFound("the compressed cache's counters are not an input of the traced graph")

    def empty_stats(self) -> QueryStats:
        """Statistics with no query yet, on the model's device (online calibration fills them in the graph)."""
        return QueryStats(self.signature, self.device)

    def stats_inputs(self) -> list[torch.Tensor]:
        return self.stats.tensors()

    def cache_input_names(self) -> list[str]:
        """The cache tensors the compress graph takes as extra inputs (beyond the statistics)."""
        names = ["slot_pos"]
        if self.policy.query_window:
            names.append("queries")
        if self.policy.accumulate_attention:
            names.append("attention")
        return names

    def extra_inputs(self) -> list[torch.Tensor]:
        cache = self.cache
        return [*self.stats.tensors(), *(getattr(cache, name) for name in self.cache_input_names())]

    # -- cache ------------------------------------------------------------------------------------------------------
    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> CompressedCache:
        sig = self.signature
        cache = CompressedCache(sig.num_layers, self.config.budget, self.config.divide_length, device, batch)
        for layer, (key_dim, value_dim) in zip(cache.layers, self.kv_dims):
            layer.lazy_initialization(torch.empty(batch, sig.num_kv_heads, 0, key_dim, dtype=dtype, device=device),
                                      torch.empty(batch, sig.num_kv_heads, 0, value_dim, dtype=dtype, device=device))
        cache.allocate_positions(batch, sig.num_kv_heads)
        layers, window = sig.num_layers, self.policy.query_window
        if window:
            cache.queries = torch.zeros(layers, batch, sig.num_heads, window, sig.head_dim, device=device, dtype=dtype)
        if self.policy.accumulate_attention:
            cache.attention = torch.zeros(layers, batch, sig.num_kv_heads, self.capacity, device=device)
        return cache

    def after_step(self, cache: CompressedCache, tokens: int) -> None:
        """Host side of a step: advance the host counters, and compact the full rows, one call per run of rows on the
        same schedule (no device read)."""
        cache.record_write(tokens, self.config.protect_prompt)
        if cache.is_full():
            start = time.perf_counter()
            for rows in cache.full_groups():
                compact(cache, self.policy, compaction_inputs(cache, self, rows), rows, self.windowed_layers)
            if cache.ctrl.is_cuda:
                torch.cuda.synchronize(cache.ctrl.device)
            self.compaction_seconds += time.perf_counter() - start


def sliding_windows(model: nn.Module, sites, budget: int) -> list[int]:
    """Per attention site, its sliding window (0 for global attention), from the model config's ``sliding_window``
    and ``layer_types`` (what transformers builds its masks from). A window layer keeps its exact window: it is
    masked to it and keeps its most recent ``budget`` tokens at each compaction, so the window must fit the budget."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None) or 0
    types = getattr(config, "layer_types", None) or []
    windows = []
    for site in sites:
        kind = types[site.layer] if site.layer < len(types) else None
        windows.append(window if kind in (None, "sliding_attention") else 0)
        if windows[-1] > budget:
            raise PassError(
                f"attention site {site.layer} ({site.module}): sliding window {window} does not fit budget {budget}; "
                f"use budget >= {window} so that window layers keep their whole window"
            )
    return windows


def _find_state(model: nn.Module) -> TriAttentionState | None:
    return getattr(model, "_triattn_state", None)


def _kv_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _discover(state: TriAttentionState) -> None:
    """Trace the model once on two dummy tokens (no Inductor) to learn its sites and rotary signature."""
    model = state.model
    device = next(model.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    probe = CompressedCache(_num_layers(model), state.config.budget, state.config.divide_length, device)
    state.cache = probe
    fn = torch.compile(state.original_forward, backend=TriAttentionBackend(state, "discover"), fullgraph=True)
    try:
        with torch.no_grad():
            positions = torch.arange(2, device=device)[None]
            fn(input_ids=ids, **{state.cache_keyword: probe}, position_ids=positions, use_cache=True)
    except Exception as exc:  # dynamo wraps backend errors
        cause = exc
        while (inner := getattr(cause, "inner_exception", None) or cause.__cause__) is not None:
            cause = inner
        if isinstance(cause, PassError):
            raise cause from None
        raise ValueError(
            f"the model could not be traced as one graph ({type(cause).__name__}: {str(cause).splitlines()[0]}); "
            "triattn_compile needs a decoder that torch.compile(fullgraph=True) can capture"
        ) from None
    finally:
        torch._dynamo.reset()
        state.cache = None


def _num_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("optimize() needs a transformers model (one with a .config); got " + type(model).__name__)
    return config.get_text_config().num_hidden_layers


SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_placement(model: nn.Module) -> None:
    """One device, a floating dtype the cache and scoring support: otherwise a one-line error."""
    params = list(model.parameters())
    if not params:
        raise ValueError("optimize() needs a model with parameters")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"the model spans devices {sorted(map(str, devices))}; move it to one device first "
                         "(model.to(device)): the compressed cache lives on a single device")
    if params[0].device.type == "meta":
        raise ValueError("the model's weights are on the meta device; load real weights before optimize()")
    dtype = params[0].dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"model dtype {dtype} is not supported; use float32, bfloat16 or float16 "
                         "(e.g. model.to(torch.float32))")


def optimize(model: nn.Module, budget: int = 2048, **options) -> nn.Module:
    """Give ``model`` a TriAttention-compressed KV cache of ``budget + 128`` slots per KV head.

    Args:
        model: a transformers decoder (``generate()`` keeps working). The model object is modified in place
            (an instance-level ``forward``); :func:`restore` undoes it.
        budget: tokens kept per KV head after each compaction.
        **options: further :class:`TriAttentionConfig` fields (``stats=``, ``protect_prompt=``, ``per_layer=``, ...).
    Returns:
        the same model object.

    Examples::

        model = triattn_compile.optimize(model, budget=2048)
        out = model.generate(ids, max_new_tokens=16000)
    """
    if _find_state(model) is not None:
        raise ValueError("optimize() was already applied to this model; call triattn_compile.restore(model) first")
    _check_placement(model)
    config = TriAttentionConfig(budget=budget, **options)
    state = TriAttentionState(model, config)
    _discover(state)
    if config.stats is not None:
        state.stats = QueryStats.load(config.stats, state.signature, state.device)
    else:
        state.stats = state.empty_stats()
    compiled = torch.compile(state.original_forward, backend=TriAttentionBackend(state, "compress"), fullgraph=True)

    def forward(*args, **kwargs):
        return _compressed_forward(state, compiled, *args, **kwargs)

    model._triattn_state = state
    model.forward = forward
    return model


def _compressed_forward(state: TriAttentionState, compiled, *args, **kwargs):
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    ref = ids if ids is not None else embeds
    batch, length = ref.shape[:2]
    given = [kwargs.pop(name) for name in CACHE_KEYWORDS if kwargs.get(name) is not None]
    if len(given) > 1:
        raise ValueError("a cache was passed both as `cache` and as `past_key_values`; pass it once")
    cache = given[0] if given else None
    if not isinstance(cache, CompressedCache):
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("the cache passed already holds tokens; an optimized model keeps its own: "
                             "pass no cache (or an empty one)")
        cache = state.new_cache(batch, ref.device, _kv_dtype(state.model))
    kwargs[state.cache_keyword] = cache
    fresh = cache.tokens_seen() == 0
    mask = kwargs.pop("attention_mask", None)
    if fresh:
        cache.set_padding(_left_padding(mask, batch, length))
    longest = length - min(cache.pads) if fresh else length
    if fresh and state.config.protect_prompt and longest + state.config.divide_length > state.config.budget:
        raise ValueError(
            f"prompt of {longest} tokens does not fit budget {state.config.budget} with prompt protection "
            f"(needs budget >= prompt + {state.config.divide_length}); use budget >= "
            f"{longest + state.config.divide_length} or protect_prompt=False"
        )
    if length > state.capacity - cache.occupancy()[0]:
        raise ValueError(
            f"{length} new tokens do not fit the compressed cache ({cache.occupancy()[0]}/{state.capacity} slots "
            "used); feed at most divide_length tokens per call after the prompt"
        )
    if kwargs.get("position_ids") is None:  # each row's own positions: tokens fed minus its left padding
        kwargs["position_ids"] = query_positions(cache.ctrl, length).clamp(min=0)
    kwargs["use_cache"] = True
    state.cache = cache
    if args:
        kwargs["input_ids"], args = args[0], args[1:]
    out = compiled(*args, **kwargs)
    state.after_step(cache, length)
    return out


def _left_padding(mask, batch: int, length: int) -> list[int]:
    """Per-row left padding of a prompt's 2D ``attention_mask`` (checked on the host, on the first call only)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return [0] * batch
    seen = mask.bool().cpu()
    pads = (~seen).sum(1)
    left = torch.arange(seen.shape[1]) >= pads[:, None]
    if seen.shape != (batch, length) or not torch.equal(seen, left) or bool((pads >= length).any()):
        raise ValueError(
            "attention_mask must be left padding (each row: zeros, then at least one 1, shape [batch, prompt]); "
            "right padding, holes (a prompt containing the pad token id) and empty rows are not supported: "
            "pad on the left (tokenizer.padding_side='left') or pass attention_mask=torch.ones_like(input_ids)"
        )
    return pads.tolist()


def calibrate(
    model: nn.Module,
    input_ids: torch.Tensor,
    chunk_size: int = 1024,
    progress: bool = False,
) -> QueryStats:
    """Offline statistics: run ``model`` over ``input_ids`` ``[N]`` (any plain text, tokenized) and capture every
    pre-RoPE query through the graph pass. Chunks of ``chunk_size`` tokens run without a cache.

    Returns:
        :class:`QueryStats`; ``.save(path)`` writes the file that ``optimize(model, stats=path)`` reads.

    Examples::

        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        triattn_compile.calibrate(model, ids).save("stats.safetensors")
    """
    if _find_state(model) is not None:
        raise ValueError("calibrate() needs the plain model, not one returned by optimize()")
    ids = torch.as_tensor(input_ids).reshape(-1)
    if ids.numel() < 2:
        raise ValueError("calibration needs at least 2 tokens of text")
    state = TriAttentionState(model, TriAttentionConfig(compiler="eager"))
    _discover(state)
    state.stats = state.empty_stats()
    fn = torch.compile(state.original_forward, backend=TriAttentionBackend(state, "calibrate"), fullgraph=True)
    # only queries are needed: a transformers LM head need not project every position onto the vocabulary
    accepts = inspect.signature(state.original_forward).parameters
    only_last = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
    device = next(model.parameters()).device
    chunks = list(ids.to(device).split(chunk_size))
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="calibrating", unit="chunk")
    try:
        with torch.no_grad():
            for chunk in chunks:
                fn(input_ids=chunk[None], use_cache=False, **only_last)
    finally:
        torch._dynamo.reset()
    return state.stats


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize`: the model runs its original forward with an ordinary cache again."""
    state = _find_state(model)
    if state is None:
        raise ValueError("restore() called on a model that optimize() was not applied to")
    del model.forward
    del model._triattn_state
    return model


def cache_occupancy(model: nn.Module) -> list[int]:
    """Occupied KV slots per layer of the optimized model's current cache (empty before the first call)."""
    state = _find_state(model)
    if state is None:
        raise ValueError("cache_occupancy() needs a model returned by triattn_compile.optimize")
    return state.cache.occupancy() if state.cache is not None else []


def current_cache(model: nn.Module) -> CompressedCache | None:
    """The compressed cache of the optimized model's latest call (for inspection)."""
    state = _find_state(model)
    if state is None:
        raise ValueError("current_cache() needs a model returned by triattn_compile.optimize")
    return state.cache


def query_stats(model: nn.Module) -> QueryStats:
    """The statistics the optimized model scores with (online running sums or the loaded file)."""
    state = _find_state(model)
    if state is None:
        raise ValueError("query_stats() needs a model returned by triattn_compile.optimize")
    return state.stats


