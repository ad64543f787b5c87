"""The forward of an optimized decoder that keeps its own KV cache (gpt-fast, torchtune, ...), called as its own
code calls it.

Nothing about such a model is known before it runs: on its first call the model is traced once to discover its
layout and its cache buffers (``passes/own_cache.py``; that graph is not run). The model's own key/value buffers,
set up by the user for ``budget + divide_length`` positions, then **are** the compressed cache's storage, and the
step is compiled with the model's cache writes retargeted to the compressed slots: RoPE keeps the positions the
model is given, attention sees the occupied slots, compaction gathers the buffers in place. A new sequence starts
when the model writes position 0 again (after its own ``setup_caches`` or ``reset_caches``): one scalar of the
step's inputs is read on the host per call to tell (or, where the model writes ``cache[:b, start:start + T]`` with a
Python-int ``start``, the int argument that equals it). A cache laid out ``[B, S, H, D]`` (Meta's reference) is the
storage too, seen transposed; the model's plain tensor attributes count as its buffers.

A model whose cache grows by ``torch.cat`` and is handed back to the caller gets a compressed cache of its own
instead (its new keys are written there, ``passes/own_cache.write_appended``); the caller keeps zero-memory
stand-ins, and a call that passes none of them back starts a new sequence.
"""

from __future__ import annotations

import torch
from torch import nn

from triattn_compile.config import TriAttentionConfig
from triattn_compile.passes.backend import Discovered, TriAttentionBackend
from triattn_compile.passes.match import PatternNotFound
from triattn_compile.passes.step_inputs import isolated_step
from triattn_compile.schedule import Compressor


def _tokens(args, kwargs) -> torch.Tensor:
    """The step's token ids ``[B, T]``: its first 2-D integer tensor argument."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_floating_point():
            return value
    raise ValueError("an optimized model with its own KV cache must be called with token ids [batch, tokens]")


def _passes(tensor: torch.Tensor, value: object, depth: int = 6) -> bool:
    """Whether ``value`` (the call's arguments: containers, and plain objects such as a cache class) holds
    ``tensor``."""
    if isinstance(value, torch.Tensor):  # the step may return a view of the buffer
        return value.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
    if depth == 0 or isinstance(value, (nn.Module, str, bytes, int, float)):
        return False
    if isinstance(value, dict):
        value = list(value.values())
    elif not isinstance(value, (list, tuple)):
        value = list(vars(value).values()) if hasattr(value, "__dict__") else []
    return any(_passes(tensor, v, depth - 1) for v in value)


def _tensor_names(model: nn.Module) -> dict[int, str]:
    """``{id(tensor): name}`` of the model's buffers and of the plain tensor attributes of its modules (Meta's
    reference keeps its KV cache as ``self.cache_k = torch.zeros(...)``, not a registered buffer)."""
    names = {id(t): n for n, t in model.named_buffers()}
    for prefix, module in model.named_modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                names.setdefault(id(value), f"{prefix}.{attr}" if prefix else attr)
    return names


class OwnCacheForward:
    """``model.forward`` after ``optimize`` for a model that keeps its own KV cache buffers."""

    def __init__(self, model: nn.Module, config: TriAttentionConfig, run_traced):
        self.model, self.config, self.original, self.run_traced = model, config, model.forward, run_traced
        self.compressor: Compressor | None = None
        self.buffers: list[tuple[str, str]] = []  # per layer: names of the model's key and value buffers
        self.axis = 2  # axis of the positions in them: 2 for [B, H, S, D], 1 for [B, S, H, D]
        self.grown = False  # the model grows its cache by torch.cat: it holds the compressed cache's tensors

    def __call__(self, *args, **kwargs):
        if self.compressor is None:
            self._discover(args, kwargs)
        compressor, config = self.compressor, self.config
        cache = compressor.cache
        if self.grown:
            if cache.tokens_seen() and not _passes(self.stand_in, (args, kwargs)):
                cache.reset()  # called without the cache it returned: a new sequence
        else:
            self._adopt(cache)
            if self.first_position(args, kwargs) == 0 and cache.tokens_seen():
                cache.reset()  # the model starts a new sequence
        length = _tokens(args, kwargs).shape[1]
        if cache.tokens_seen() == 0:
            config.check_prompt(length)
        if length > compressor.capacity - cache.occupied:
            raise ValueError(f"{length} new tokens do not fit the compressed cache ({cache.occupied}/"
                             f"{compressor.capacity} slots used); feed at most divide_length tokens per call")
        inputs = compressor.step_inputs(cache)
        if self.grown:
            inputs += [self.stand_in, *(t for layer in cache.layers for t in (layer.keys, layer.values))]
        # a position counter kept as a Python int on a module (x.shape-free RoPE offsets) is traced as a graph input
        # rather than a constant, so that the step does not recompile every call
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            out = self.compiled(self.original, inputs, args, kwargs)
        compressor.after_step(cache, length)
        return out

    def _discover(self, args, kwargs) -> None:
        model, config = self.model, self.config
        inv_freq = next((b for n, b in model.named_buffers() if n.endswith("inv_freq")), None)
        options = {"model_config": getattr(model, "config", None), "budget": config.budget, "own_cache": True}
        backend = TriAttentionBackend("discover", fallback_omega=inv_freq, stop_after_discovery=True, **options)
        try:
            self.run_traced(torch.compile(isolated_step(), backend=backend, fullgraph=True), self.original, [], args,
                            kwargs)
        except Discovered:
            pass
        own, names = backend.own_cache, _tensor_names(model)
        tokens, capacity = _tokens(args, kwargs), config.budget + config.divide_length
        self.grown, self.axis = own.grown, own.axis
        for layer, pair in enumerate(own.buffers):
            if any(id(b) not in names for b in pair):
                raise PatternNotFound(f"attention site {layer}: its KV cache is neither a buffer of the model nor a "
                                      "tensor attribute of one of its modules; register it with module.register_buffer")
            shape = tuple(pair[0].shape)
            if len(shape) != 4 or shape[0] != tokens.shape[0] or shape[own.axis] != capacity:
                raise ValueError(
                    f"the model's own KV cache ({names[id(pair[0])]}) has shape {list(shape)}; set it up for batch "
                    f"{tokens.shape[0]} and budget + divide_length = {capacity} positions on its axis {own.axis} "
                    f"(gpt-fast: setup_caches(max_batch_size, {capacity}); torchtune: decoder_max_seq_len={capacity}; "
                    f"Meta's reference: ModelArgs(max_batch_size={tokens.shape[0]}, max_seq_len={capacity}); LitGPT: "
                    f"set_kv_cache(batch_size, max_seq_length={capacity}))")
            self.buffers.append((names[id(pair[0])], names[id(pair[1])]))
        if not own.grown:
            self.first_position = self._position_reader(own.positions, args, kwargs, names)
        compressor = Compressor(config, backend.layout, tokens.device)
        dtype = own.buffers[0][0].dtype if own.buffers else next(model.parameters()).dtype
        compressor.cache = compressor.new_cache(tokens.shape[0], tokens.device, dtype)
        names = compressor.step_input_names()
        if own.grown:
            layers = range(backend.layout.num_layers)
            names += ["stand_in", *(f"{kind}.{i}" for i in layers for kind in ("keys", "values"))]
            self.stand_in = torch.zeros((), dtype=dtype, device=tokens.device)
        self.compiled = torch.compile(isolated_step(), fullgraph=True, backend=TriAttentionBackend(
            "compress", input_names=names, layout=backend.layout, capture=compressor.online,
            compiler=config.compiler, min_distance=compressor.policy.distant_attention, **options))
        self.compressor = compressor

    def _get(self, name: str) -> torch.Tensor:
        """The model's tensor ``name``: a buffer, or a plain tensor attribute of a module."""
        prefix, _, attr = name.rpartition(".")
        return getattr(self.model.get_submodule(prefix), attr)

    def _adopt(self, cache) -> None:
        """The model's buffers are the cache's storage (again, if the model set up new ones), seen as ``[B, H, C, D]``
        (a ``[B, C, H, D]`` buffer transposed: a view, compacted in place all the same)."""
        for layer, names in zip(cache.layers, self.buffers):
            keys, values = (self._get(n) if self.axis == 2 else self._get(n).transpose(1, 2) for n in names)
            layer.keys, layer.values = keys, values

    def _position_reader(self, position: torch.Tensor | int, args, kwargs, names: dict):
        """How the position of the step's first write is read off a call: the first element of a tensor argument or
        buffer, or an int argument (``buffer[:b, start:start + T] = new`` with the call's ``start``)."""
        if isinstance(position, int):
            found = [(lambda a, k, i=i: a[i]) for i, v in enumerate(args) if type(v) is int and v == position]
            found += [(lambda a, k, n=n: k[n]) for n, v in kwargs.items() if type(v) is int and v == position]
            if len(found) != 1:
                raise PatternNotFound(
                    f"the cache write starts at {position}, and {len(found)} int arguments of the call equal it; the "
                    "position must be one int argument of the model (or a tensor argument or buffer)")
            return found[0]
        for i, value in enumerate(args):
            if value is position:
                return lambda a, k: int(a[i].reshape(-1)[0])
        for key, value in kwargs.items():
            if value is position:
                return lambda a, k: int(k[key].reshape(-1)[0])
        if id(position) in names:
            name = names[id(position)]
            return lambda a, k: int(self._get(name).reshape(-1)[0])
        raise PatternNotFound("the cache write position is neither an argument of the model nor a buffer of it")
