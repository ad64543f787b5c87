"""Public entry points: :func:`optimize` (compress a model's KV cache) and :func:`calibrate` (offline statistics).

``optimize`` traces the model once to find its attention sites and rotary signature, loads (or prepares online)
the query statistics, and installs an instance-level ``forward`` that runs the model compiled with the TriAttention
backend over a :class:`~triattn_compile.cache.CompressedCache`. :func:`restore` removes it again.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from triattn_compile.cache import CompressedCache
from triattn_compile.calibration.stats import QueryStats, RotarySignature, rope_fingerprint
from triattn_compile.config import TriAttentionConfig
from triattn_compile.passes.backend import TriAttentionBackend
from triattn_compile.passes.frequencies import rotary_frequencies
from triattn_compile.passes.match import PatternNotFound
from triattn_compile.passes.rotary import fake_value

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

    # -- filled in by the backend -------------------------------------------------------------------------------
    def observe(self, gm, sites, example_inputs) -> None:
        """Record (first graph) or check (later graphs) the rotary signature found in a traced graph."""
        fallback = next((b for n, b in self.model.named_buffers() if n.endswith("inv_freq")), None)
        freqs = [rotary_frequencies(gm, s, example_inputs, fallback) for s in sites]
        omega = torch.stack([f[0] for f in freqs])
        scale = freqs[0][1]
        q = sites[0].query
        q_val = fake_value(q.pre)
        num_kv = int(fake_value(sites[0].key_source).shape[1])  # key before repeat_kv: [B, Hkv, S, D]
        signature = RotarySignature(
            num_layers=len(sites),
            num_heads=int(q_val.shape[sites[0].head_axis]),
            num_kv_heads=num_kv,
            head_dim=int(q_val.shape[-1]),
            rotary_dim=int(q.rotary_dim),
            pairing=q.pairing,
            rope_fingerprint=rope_fingerprint(omega),
            attention_scaling=round(scale, 6),
        )
        if signature.rotary_dim != signature.head_dim:
            raise PatternNotFound(
                f"attention site 0 ({sites[0].module}): partial rotary (rotary_dim {signature.rotary_dim} of head_dim "
                f"{signature.head_dim}) is recognised but not supported yet; use a fully rotary model"
            )
        if self.signature is None:
            self.signature, self.omega = signature, omega
        elif signature != self.signature:
            raise PatternNotFound(f"a later graph of the model has a different attention layout: {signature}")

    def find_ctrl(self, gm, example_inputs):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, example_inputs):
            if value is self.cache.ctrl:
                return node
        raise PatternNotFound("the compressed cache's counters are not an input of the traced graph")

    def compress_options(self) -> tuple:
        c = self.config
        return (c.budget, c.divide_length, c.protect_prompt, c.per_layer, self.signature.pairing,
                float(self.signature.attention_scaling), c.max_offset, float(c.noise), c.seed)

    def stats_inputs(self) -> list[torch.Tensor]:
        return self.stats.tensors()

    def extra_inputs(self) -> list[torch.Tensor]:
        return [*self.stats.tensors(), self.cache.slot_pos, self.omega]

    # -- cache ------------------------------------------------------------------------------------------------------
    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> CompressedCache:
        sig = self.signature
        cache = CompressedCache(sig.num_layers, self.config.budget, self.config.divide_length, device)
        cache.early_initialization(batch, sig.num_kv_heads, sig.head_dim, dtype, device)
        cache.allocate_positions(batch, sig.num_kv_heads)
        return cache


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
            fn(input_ids=ids, past_key_values=probe, position_ids=torch.arange(2, device=device)[None], use_cache=True)
    except Exception as exc:  # dynamo wraps backend errors
        cause = exc
        while (inner := getattr(cause, "inner_exception", None) or cause.__cause__) is not None:
            cause = inner
        if isinstance(cause, PatternNotFound):
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
    config = TriAttentionConfig(budget=budget, **options)
    state = TriAttentionState(model, config)
    _discover(state)
    if config.stats is not None:
        state.stats = QueryStats.load(config.stats, state.signature)
    else:
        state.stats = QueryStats(state.signature)
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
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, CompressedCache):
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("past_key_values already holds tokens; optimized models manage their own cache")
        cache = state.new_cache(batch, ref.device, _kv_dtype(state.model))
        kwargs["past_key_values"] = cache
    fresh = cache.tokens_seen() == 0
    if fresh and state.config.protect_prompt and length + state.config.divide_length > state.config.budget:
        raise ValueError(
            f"prompt of {length} tokens does not fit budget {state.config.budget} with prompt protection "
            f"(needs budget >= prompt + {state.config.divide_length}); use budget >= "
            f"{length + state.config.divide_length} or protect_prompt=False"
        )
    if length > state.capacity - cache.occupancy()[0]:
        raise ValueError(
            f"{length} new tokens do not fit the compressed cache ({cache.occupancy()[0]}/{state.capacity} slots "
            "used); feed at most divide_length tokens per call after the prompt"
        )
    if kwargs.get("position_ids") is None:
        pos = cache.tokens_seen() + torch.arange(length, device=ref.device)
        kwargs["position_ids"] = pos[None].expand(batch, length)
    kwargs["use_cache"] = True
    mask = kwargs.pop("attention_mask", None)
    if batch != 1:
        raise ValueError(f"batch size {batch} is not supported yet: generate one sequence at a time")
    if fresh and isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
        raise ValueError(
            "attention_mask hides some prompt tokens (padding, or a prompt that contains the pad token id); "
            "masked tokens are not supported yet: pass attention_mask=torch.ones_like(input_ids)"
        )
    state.cache = cache
    if args:
        kwargs["input_ids"], args = args[0], args[1:]
    return compiled(*args, **kwargs)


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
    state.stats = QueryStats(state.signature)
    fn = torch.compile(state.original_forward, backend=TriAttentionBackend(state, "calibrate"), fullgraph=True)
    device = next(model.parameters()).device
    chunks = list(ids.to(device).split(chunk_size))
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="calibrating", unit="chunk")
    try:
        with torch.no_grad():
            for chunk in chunks:
                fn(input_ids=chunk[None], use_cache=False)
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


