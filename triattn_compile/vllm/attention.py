"""vLLM's CPU attention backend with TriAttention's compaction in front of its metadata builder.

:class:`TriAttentionCPUBackend` is vLLM's ``CPU_ATTN`` with one change: its builder hands each step's
``CommonAttentionMetadata`` to the process's :class:`~triattn_compile.vllm.compaction.PagedCompressor` first, which
compacts the requests that are due and points ``seq_lens`` / block tables at the live blocks. The worker extension
(``worker.py``) registers it as ``CPU_ATTN`` in worker processes, only where TriAttention is on. The compressor is
made on the first step that needs it: discovery (``backend.py``) runs when the model is first compiled and the KV
tensors are bound after the builders are made.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionMetadataBuilder
from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

from triattn_compile.policies import TriAttention
from triattn_compile.vllm.backend import discovered, start_serving
from triattn_compile.vllm.compaction import BlockLayout, PagedCompressor
from triattn_compile.vllm.paged import PagedSchedule
from triattn_compile.vllm.settings import parse_settings

_COMPRESSORS: dict[int, PagedCompressor] = {}  # one per engine config in this process (builders may be several)


def compressor_for(vllm_config) -> PagedCompressor | None:
    """The process's compressor for ``vllm_config`` (made on first use), or ``None`` where TriAttention is off."""
    settings = parse_settings(vllm_config.additional_config)
    if settings is None:
        return None
    key = id(vllm_config)
    if key not in _COMPRESSORS:
        schedule = PagedSchedule(settings.budget, settings.divide_length, vllm_config.cache_config.block_size)
        policy = TriAttention(per_layer=settings.per_layer)
        _COMPRESSORS[key] = PagedCompressor(schedule, lambda: _sources(vllm_config), policy, settings.protect_prompt)
    return _COMPRESSORS[key]


def claim_group(compressor: PagedCompressor, kv_cache_spec, layer_names) -> bool:
    """Whether the metadata builder of the KV cache group ``layer_names`` (spec ``kv_cache_spec``) compacts: a
    sliding-window group does not (vLLM frees what leaves its window); one full-attention group does, every step,
    with its block table. A second full-attention group, or another kind, is refused in one line."""
    if isinstance(kv_cache_spec, SlidingWindowSpec):
        return False
    if not isinstance(kv_cache_spec, FullAttentionSpec):
        raise ValueError(f"TriAttention in vLLM compacts full-attention KV cache groups; this model has a "
                         f"{type(kv_cache_spec).__name__} group; serve it without the triattn setting")
    names = tuple(layer_names)
    claimed = compressor.group
    if claimed is not None and set(claimed) != set(names):
        raise ValueError(f"TriAttention in vLLM: this model's full-attention layers are split over several KV cache "
                         f"groups ({len(claimed)} and {len(names)} layers); only one such group is supported; serve "
                         "it without the triattn setting")
    compressor.group = names
    found, _ = discovered()
    if found is not None:  # discovery ran at the first compile, before vLLM made the KV cache and its builders
        check_group(found, names)
    return True


def check_group(found, group) -> None:
    """The compacting KV cache group ``group`` (layer names) must be exactly the full-attention layers of ``found``
    (a :class:`~triattn_compile.vllm.discovery.VllmLayout`); one line otherwise."""
    scored = {found.layer_names[i] for i in found.layout.scored_layers}
    if set(group) & {found.layer_names[i] for i in found.layout.windowed_layers}:
        raise ValueError("TriAttention in vLLM: the sliding-window layers share a KV cache group with the "
                         "full-attention layers (vLLM's hybrid KV cache manager is off); leave it on (drop "
                         "--disable-hybrid-kv-cache-manager)")
    if set(group) != scored:
        raise ValueError(f"TriAttention in vLLM: the KV cache group compacted ({len(group)} layers) is not the "
                         f"model's {len(scored)} full-attention layers")


def _sources(vllm_config):
    """``(layout, stats, kv_caches, block_layout)`` of this process (``PagedCompressor``'s ``source``)."""
    found, stats = discovered()
    if found is None:
        raise RuntimeError("TriAttention in vLLM: the model was not compiled through the plugin's backend, so no "
                           "sites were found; do not set compilation_config.backend yourself")
    if stats is None or stats.tokens() == 0:
        raise RuntimeError("TriAttention in vLLM: no query statistics (none loaded, none captured online); set "
                           "additional_config['triattn']['stats'] to a `triattn calibrate` file of this model")
    from triattn_compile.vllm.worker import kv_tensor

    context = vllm_config.compilation_config.static_forward_context
    scored = [found.layer_names[i] for i in found.layout.scored_layers]
    check_group(found, compressor_for(vllm_config).group or scored)
    kv = [kv_tensor(context[name]) for name in found.layer_names]
    first = scored[0]
    return found.layout, stats, kv, probe_layout(kv_tensor(context[first]), getattr(context[first], "isa", None),
                                                 vllm_config.cache_config.cache_dtype)


DIGIT = 64  # the probe writes base-64 digits: integers below 256 are exact in bfloat16 and float16


def probe_layout(kv: torch.Tensor, isa: str | None, cache_dtype: str) -> BlockLayout:
    """Where vLLM's own cache-write op (``cpu_attn_reshape_and_cache``, the layer's ISA) puts token ``t``, dim ``d``
    of a block: it writes the digits of ``t * D + d`` as keys and values into a scratch block shaped like ``kv``'s,
    and the offsets are read back (no layout is assumed)."""
    from vllm import _custom_ops as ops

    if isa is None or cache_dtype != "auto":
        raise RuntimeError(f"TriAttention in vLLM: the CPU attention's cache layout could not be probed (isa {isa}, "
                           f"kv cache dtype {cache_dtype}); a quantized KV cache is not supported, drop kv_cache_dtype")
    _, heads, size, width = kv.shape
    dim = width // 2
    cells = size * dim
    code = torch.arange(cells).view(size, 1, dim).expand(size, heads, dim)  # token t, head h, dim d: t * D + d
    offsets = [torch.zeros(cells, dtype=torch.long) for _ in range(2)]
    places = 1
    while DIGIT**places < cells:
        places += 1
    for place in range(places):
        digit = (code // DIGIT**place % DIGIT).to(kv.dtype).contiguous()
        scratch = torch.full((2, heads, size, width), -1.0, dtype=kv.dtype).view(2, heads, 2 * size, dim)
        key_cache, value_cache = scratch.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(digit, digit, key_cache, value_cache, torch.arange(size) + size, isa)
        region = scratch[1].reshape(heads, 2, cells)[0]  # block 1, head 0: [key region ; value region]
        for kind in range(2):
            offsets[kind] += region[kind].long() * DIGIT**place
    if any(not torch.equal(o.sort().values, torch.arange(cells)) for o in offsets):
        raise RuntimeError(f"TriAttention in vLLM: the CPU attention ({isa}) does not store one value per cell of a "
                           "block; its cache layout is not supported")
    order = [torch.empty_like(o) for o in offsets]
    for kind in range(2):  # offsets[kind][j] is the code stored at cell j; invert it
        order[kind][offsets[kind]] = torch.arange(cells)
    key, value = (None if torch.equal(o, torch.arange(cells)) else o for o in order)
    return BlockLayout(key, value, size, dim)


def compressors() -> list[PagedCompressor]:
    """This process's compressors (the worker report)."""
    return list(_COMPRESSORS.values())


class TriAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """``CPUAttentionMetadataBuilder`` whose input metadata passes through the compressor first."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, **kwargs):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device, **kwargs)
        compressor = compressor_for(vllm_config)  # once: the settings are parsed here, not every step
        compacts = compressor is not None and claim_group(compressor, kv_cache_spec, layer_names)
        self.compressor = compressor if compacts else None

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        if self.compressor is not None:
            start_serving()
            common_attn_metadata = self.compressor.before_attention(common_attn_metadata)
        return super().build(common_prefix_len, common_attn_metadata, fast_build)


class TriAttentionCPUBackend(CPUAttentionBackend):
    """vLLM's CPU attention with :class:`TriAttentionMetadataBuilder`."""

    @staticmethod
    def get_builder_cls() -> type[TriAttentionMetadataBuilder]:
        return TriAttentionMetadataBuilder
