"""vLLM's CPU attention backend with TriAttention's compaction in front of its metadata builder.

:class:`TriAttentionCPUBackend` is vLLM's ``CPU_ATTN`` with one change: its builder hands each step's
``CommonAttentionMetadata`` to the process's :class:`~triattn_compile.vllm.compaction.PagedCompressor` first, which
compacts the requests that are due and points ``seq_lens`` / block tables at the live blocks. The worker extension
(``worker.py``) registers it as ``CPU_ATTN`` in worker processes, only where TriAttention is on. The compressor is
made on the first step that needs it: discovery (``backend.py``) runs when the model is first compiled and the KV
tensors are bound after the builders are made.
"""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionMetadataBuilder

from triattn_compile.policies import TriAttention
from triattn_compile.vllm.backend import discovered
from triattn_compile.vllm.compaction import PagedCompressor
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


def _sources(vllm_config):
    """``(layout, stats, kv_caches)`` of this process (``PagedCompressor``'s ``source``)."""
    found, stats = discovered()
    if found is None:
        raise RuntimeError("TriAttention in vLLM: the model was not compiled through the plugin's backend, so no "
                           "sites were found; do not set compilation_config.backend yourself")
    if stats is None:
        raise RuntimeError("TriAttention in vLLM: no statistics loaded; set additional_config['triattn']['stats'] "
                           "to a `triattn calibrate` file of this model")
    from triattn_compile.vllm.worker import kv_tensor

    context = vllm_config.compilation_config.static_forward_context
    return found.layout, stats, [kv_tensor(context[name]) for name in found.layer_names]


def compressors() -> list[PagedCompressor]:
    """This process's compressors (the worker report)."""
    return list(_COMPRESSORS.values())


class TriAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """``CPUAttentionMetadataBuilder`` whose input metadata passes through the compressor first."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device, **kwargs):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device, **kwargs)
        self.compressor = compressor_for(vllm_config)  # once: the settings are parsed here, not every step

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        if self.compressor is not None:
            common_attn_metadata = self.compressor.before_attention(common_attn_metadata)
        return super().build(common_prefix_len, common_attn_metadata, fast_build)


class TriAttentionCPUBackend(CPUAttentionBackend):
    """vLLM's CPU attention with :class:`TriAttentionMetadataBuilder`."""

    @staticmethod
    def get_builder_cls() -> type[TriAttentionMetadataBuilder]:
        return TriAttentionMetadataBuilder
