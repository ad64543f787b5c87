"""Public entry points: :func:`optimize` (compress a model's KV cache), :func:`calibrate` (offline statistics),
:func:`restore`, and :func:`inspect` (what an optimized model holds).

``optimize`` traces the model once on two dummy tokens to discover its attention layout
(``passes/discover.py``), prepares the query statistics (loaded and validated, or empty for online calibration),
and installs an instance-level ``forward`` that runs the model compiled with the TriAttention backend over a
:class:`~triattn_compile.cache.CompressedCache`; the host side of the schedule is
:class:`~triattn_compile.schedule.Compressor`. :func:`restore` removes it again. Nothing outside the model changes:
each compiled step has a code object of its own (``passes/step_inputs.py``), so no Dynamo state is shared or reset.
"""

from __future__ import annotations

import inspect as _inspect
import logging
from collections.abc import Sequence

import torch
from torch import nn

from triattn_compile import pieces
from triattn_compile.cache import CACHE_KEYWORDS, CompressedCache, cache_keyword, query_positions
from triattn_compile.calibration.contexts import CalibrationReport, as_documents, context_length_of, plan_contexts
from triattn_compile.calibration.stats import TENSOR_NAMES, QueryStats
from triattn_compile.config import BUDGET, DIVIDE_LENGTH, TriAttentionConfig
from triattn_compile.own_forward import OwnCacheForward
from triattn_compile.passes.backend import Discovered, TriAttentionBackend
from triattn_compile.passes.discover import Layout
from triattn_compile.passes.match import PassError
from triattn_compile.passes.step_inputs import isolated_step
from triattn_compile.policies import make_policy, plans_layer_budgets
from triattn_compile.schedule import Compressor

log = logging.getLogger(__name__)

_ATTR = "_triattn"  # the Compressor of an optimized model (read it through inspect())


def _find(model: nn.Module) -> Compressor | OwnCacheForward | None:
    return model.__dict__.get(_ATTR)


def _kv_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _inv_freq(model: nn.Module) -> torch.Tensor | None:
    """The model's ``inv_freq`` buffer, if it has one (RoPE frequencies where a graph shows none)."""
    return next((b for n, b in model.named_buffers() if n.endswith("inv_freq")), None)


def _run_traced(fn, *args) -> None:
    """Run a compiled step, re-raising the pass's own one-line errors unwrapped and any other failure to trace as
    one line."""
    try:
        with torch.no_grad():
            fn(*args)
    except (Discovered, torch.OutOfMemoryError):
        raise
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


def _missing_arguments(model: nn.Module) -> list[str]:
    """What ``model.forward`` lacks of the transformers call convention (``input_ids``, ``position_ids``, a cache)."""
    params = _inspect.signature(model.forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return []
    missing = [n for n in ("input_ids", "position_ids") if n not in params]
    return missing + ([] if set(CACHE_KEYWORDS) & set(params) else ["past_key_values (or cache)"])


def _check_call_convention(model: nn.Module) -> None:
    """The model must take ``input_ids``, ``position_ids`` and a transformers-style cache: else one line."""
    missing = _missing_arguments(model)
    if missing:
        params = _inspect.signature(model.forward).parameters
        raise ValueError(
            f"this needs a model called as model(input_ids=..., position_ids=..., past_key_values=<Cache>) and "
            f"{type(model).__name__}.forward({', '.join(params)}) lacks {', '.join(missing)}; give it such a forward "
            "whose attention layers write with cache.update(k, v, layer_idx) (README: plain PyTorch decoders)"
        )


def discover(model: nn.Module, budget: int | None = BUDGET, divide_length: int = DIVIDE_LENGTH) -> Layout:
    """Trace ``model`` once on two dummy tokens (no Inductor) and return its attention :class:`Layout`.

    ``budget``: sliding windows must fit it (``None``: not checked, for calibration, which compresses nothing).

    The model is called as ``model(input_ids=ids, <cache>=probe, position_ids=positions, use_cache=True)`` with a
    probe :class:`CompressedCache` (``<cache>``: ``cache`` or ``past_key_values``, as its forward declares).
    """
    _check_call_convention(model)
    device = next(model.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    probe = CompressedCache(None, BUDGET if budget is None else budget, divide_length, device)
    backend = TriAttentionBackend("discover", model_config=getattr(model, "config", None), budget=budget,
                                  fallback_omega=_inv_freq(model))
    kwargs = {"input_ids": ids, cache_keyword(model.forward): probe,
              "position_ids": torch.arange(2, device=device)[None], "use_cache": True}
    _run_traced(torch.compile(isolated_step(), backend=backend, fullgraph=True), model.forward, [], (), kwargs)
    return backend.layout


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


def optimize(model: nn.Module, budget: int | None = None, **options) -> nn.Module:
    """Give ``model`` a TriAttention-compressed KV cache of ``budget + 128`` slots per KV head.

    Args:
        model: a decoder. Either its forward takes ``input_ids``, ``position_ids`` and a transformers-style cache
            (``cache`` or ``past_key_values``) that its attention layers ``update`` (every transformers decoder;
            ``generate()`` keeps working), or it keeps its own KV cache buffers written by position (gpt-fast,
            torchtune: set them up for ``budget + divide_length`` positions) and is called as its code calls it;
            its layout is then discovered on its first call (``own_forward.py``). The model object is modified
            in place (an instance-level ``forward``); :func:`restore` undoes it.
        budget: tokens kept per KV head after each compaction (default 2048; with ``layer_budgets=``, their mean).
        **options: further :class:`TriAttentionConfig` fields (``stats=``, ``protect_prompt=``, ``per_layer=``, ...).
    Returns:
        the same model object.

    Examples::

        model = triattn_compile.optimize(model, budget=2048)
        out = model.generate(ids, max_new_tokens=16000)
    """
    if _find(model) is not None:
        raise ValueError("optimize() was already applied to this model; call triattn_compile.restore(model) first")
    _check_placement(model)
    config = TriAttentionConfig(budget=budget, **options)
    if _missing_arguments(model):  # its own call convention and, presumably, its own KV cache
        if config.layer_budgets is not None or plans_layer_budgets(make_policy(config.policy)):
            raise ValueError("per-layer budgets (layer_budgets=, or a policy that plans them) need the model to write "
                             "a transformers-style cache; a model that keeps its own KV buffers has one size for "
                             "every layer: give budget= and another policy")
        own = OwnCacheForward(model, config, _run_traced)
        setattr(model, _ATTR, own)
        model.forward = own
        return model
    layout = discover(model, config.shared_budget, config.divide_length)
    compressor = Compressor(config, layout, next(model.parameters()).device, model)
    config = compressor.config  # with the policy's per-layer budgets, where it plans them
    backend = TriAttentionBackend(
        "compress", input_names=compressor.step_input_names(), layout=layout,
        model_config=getattr(model, "config", None), budget=config.shared_budget, capture=compressor.online,
        compiler=config.compiler, min_distance=compressor.policy.distant_attention,
    )
    compiled = torch.compile(isolated_step(), backend=backend, fullgraph=True)
    original, keyword = model.forward, cache_keyword(model.forward)

    def forward(*args, **kwargs):
        return _compressed_forward(compressor, compiled, model, original, keyword, *args, **kwargs)

    setattr(model, _ATTR, compressor)
    model.forward = forward
    return model


def _compressed_forward(compressor: Compressor, compiled, model: nn.Module, original, keyword: str, *args, **kwargs):
    config = compressor.config
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
        cache = compressor.new_cache(batch, ref.device, _kv_dtype(model))
    kwargs[keyword] = cache
    fresh = cache.tokens_seen() == 0
    mask = kwargs.pop("attention_mask", None)
    if fresh:
        cache.set_padding(_left_padding(mask, batch, length))
    longest = length - min(cache.pads) if fresh else length
    if fresh:
        config.check_prompt(longest)
    capacity = compressor.capacity
    in_pieces = length > capacity - cache.occupancy()[0]
    if in_pieces:
        pieces.check_splittable(kwargs, length, capacity)
        if fresh and max(cache.pads) >= capacity:
            raise ValueError(f"a row's left padding ({max(cache.pads)} tokens) fills the whole compressed cache "
                             f"({capacity} slots): batch prompts of similar lengths, or generate them one by one")
    if kwargs.get("position_ids") is None:  # each row's own positions: tokens fed minus its left padding
        kwargs["position_ids"] = query_positions(cache.ctrl, length).clamp(min=0)
    kwargs["use_cache"] = True
    if args:
        kwargs["input_ids"], args = args[0], args[1:]
    compressor.cache = cache
    keep_last = kwargs.get("logits_to_keep") or 0
    outputs, start = [], 0
    while start < length:  # one step, or pieces that each fill the fullest row; the full rows compact after each
        stop = min(length, start + capacity - cache.occupancy()[0])
        piece = pieces.piece_of(kwargs, start, stop, keep_last) if in_pieces else kwargs
        outputs.append(compiled(original, compressor.step_inputs(cache), args, piece))
        compressor.after_step(cache, stop - start)
        start = stop
    return pieces.join(outputs, keep_last) if in_pieces else outputs[0]


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
    input_ids: torch.Tensor | Sequence[torch.Tensor],
    context_length: int | None = None,
    memory_chunk: int | None = None,
    progress: bool = False,
) -> QueryStats:
    """Offline statistics as the paper's calibration tool makes them: every pre-RoPE query of a forward pass over
    each document, captured through the graph pass, pooled over all tokens.

    Each document is one continuous context (as one pass over the whole text), unless it is longer than
    ``context_length``: it is then run as consecutive contexts of that length. Documents are never joined.

    Args:
        model: a plain decoder called as ``model(input_ids=..., position_ids=..., <cache>=...)`` (not optimized).
        input_ids: one document's token ids ``[N]`` (or ``[1, N]``), or a list of them, one per document.
        context_length: the most tokens one context holds; default the model's ``max_position_embeddings``.
            ``context_length=1024`` reproduces this project's earlier default (independent 1,024-token chunks: no
            query sees more than 1,023 tokens before it), which is *not* the paper's procedure.
        memory_chunk: run each context in forward passes of at most this many tokens that carry the KV cache (a
            transformers ``DynamicCache``): less memory, the same statistics as one pass. Default: one pass per
            context.
        progress: show a progress bar.
    Returns:
        :class:`QueryStats` (``.save(path)`` writes the file ``optimize(model, stats=path)`` reads); its
        ``.report`` (:class:`~triattn_compile.calibration.contexts.CalibrationReport`) says what was run.

    Examples::

        docs = [tokenizer(text, return_tensors="pt").input_ids[0] for text in texts]
        stats = triattn_compile.calibrate(model, docs)
        print(stats.report.describe())  # tokens, documents, contexts, tokens per pass
        stats.save("stats.safetensors")
    """
    if _find(model) is not None:
        raise ValueError("calibrate() needs the plain model, not one returned by optimize()")
    documents = as_documents(input_ids)
    context_length = context_length_of(model, context_length)
    if memory_chunk is not None and (isinstance(memory_chunk, bool) or not isinstance(memory_chunk, int)
                                     or memory_chunk < 1):
        raise ValueError(f"memory_chunk={memory_chunk!r}: give a positive number of tokens per forward pass, or None "
                         "for one pass per context")
    layout = discover(model, budget=None)  # calibration compresses nothing: any sliding window is fine
    device = next(model.parameters()).device
    stats = QueryStats(layout.signature, device)
    stats.omega = layout.omega
    backend = TriAttentionBackend("calibrate", input_names=TENSOR_NAMES, layout=layout, capture=True,
                                  model_config=getattr(model, "config", None), budget=None, compiler="eager")
    fn = torch.compile(isolated_step(), backend=backend, fullgraph=True, dynamic=True)
    # only queries are needed: a transformers LM head need not project every position onto the vocabulary
    accepts = _inspect.signature(model.forward).parameters
    only_last = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}
    contexts, split = plan_contexts(documents, context_length)
    total = sum(c.ids.numel() for c in contexts)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="calibrating", unit="tok")
    sizes, carried = [], False
    # a cache as long as the pass (the second memory chunk) would otherwise be its own graph
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        for context in contexts:
            ran = _run_context(fn, model, stats, context.ids.to(device), memory_chunk, only_last, bar)
            sizes += ran
            carried |= len(ran) > 1
    if bar is not None:
        bar.close()
    if not bool((stats.count == total).all()):  # e.g. a step that ran without the capture op
        raise RuntimeError(f"calibration captured {stats.count.tolist()} queries per layer, expected {total}")
    stats.report = CalibrationReport(
        tokens=total, documents=len(documents), contexts=len(contexts), split_documents=split,
        context_length=context_length, longest_context=max(c.ids.numel() for c in contexts),
        forward_passes=len(sizes), tokens_per_pass=max(sizes), cache_carried=carried,
    )
    log.info("calibrated on %s", stats.report.describe())
    return stats


def _run_context(fn, model: nn.Module, stats: QueryStats, ids: torch.Tensor, memory_chunk: int | None,
                 only_last: dict, bar) -> list[int]:
    """Run one continuous context ``ids`` ``[n]``: one pass, or passes of ``memory_chunk`` tokens that carry a
    ``DynamicCache``. Returns the tokens of each pass."""
    step = ids.numel() if memory_chunk is None else memory_chunk
    cache = _calibration_cache(model) if step < ids.numel() else None
    sizes = []
    for start in range(0, ids.numel(), step):
        chunk = ids[None, start : start + step].clone()  # no view: its offset would be guarded on
        # positions given, not left to the model's arange: the pass's length then stays symbolic (one graph)
        positions = torch.arange(start, start + chunk.shape[1], device=ids.device)[None]
        kwargs = {"input_ids": chunk, "position_ids": positions, "use_cache": cache is not None, **only_last}
        if cache is not None:
            kwargs[cache_keyword(model.forward)] = cache
        try:
            _run_traced(fn, model.forward, stats.tensors(), (), kwargs)
        except torch.OutOfMemoryError:
            raise ValueError(
                f"out of memory in a forward pass of {chunk.shape[1]} tokens: pass memory_chunk="
                f"{max(1, chunk.shape[1] // 4)} or less (the KV cache is carried: the statistics stay the same)"
            ) from None
        sizes.append(chunk.shape[1])
        if bar is not None:
            bar.update(chunk.shape[1])
    return sizes


def _calibration_cache(model: nn.Module):
    """An empty transformers ``DynamicCache`` for a context run in several passes."""
    from transformers import DynamicCache

    config = getattr(model, "config", None)
    try:
        return DynamicCache(config=config) if config is not None else DynamicCache()
    except Exception:  # a config that is not a transformers one: layers are created as they are written
        return DynamicCache()


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize`: the model runs its original forward with an ordinary cache again."""
    found = _find(model)
    if found is None:
        raise ValueError("restore() called on a model that optimize() was not applied to")
    del model.forward
    delattr(model, _ATTR)
    return model


def is_optimized(model: nn.Module) -> bool:
    """Whether :func:`optimize` was applied to ``model`` (and not undone by :func:`restore`)."""
    return _find(model) is not None


def inspect(model: nn.Module) -> Compressor:
    """What an optimized model holds: its :class:`~triattn_compile.schedule.Compressor` (``.layout`` found by
    discovery, ``.config``, ``.policy``, ``.stats``, ``.cache`` of the latest call, ``.compaction_seconds``).

    Examples::

        print(triattn_compile.inspect(model).layout.describe())
    """
    compressor = _find(model)
    if compressor is None:
        raise ValueError("inspect() needs a model returned by triattn_compile.optimize")
    if isinstance(compressor, OwnCacheForward):
        if compressor.compressor is None:
            raise ValueError("this model keeps its own KV cache: its layout is discovered on its first call; call it "
                             "once before inspect()")
        return compressor.compressor
    return compressor


def cache_occupancy(model: nn.Module) -> list[int]:
    """Occupied KV slots per layer of the optimized model's current cache (empty before the first call)."""
    cache = inspect(model).cache
    return cache.occupancy() if cache is not None else []


def current_cache(model: nn.Module) -> CompressedCache | None:
    """The compressed cache of the optimized model's latest call (for inspection)."""
    return inspect(model).cache


def query_stats(model: nn.Module) -> QueryStats:
    """The statistics the optimized model scores with (online running sums or the loaded file)."""
    return inspect(model).stats
