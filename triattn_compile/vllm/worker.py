"""The worker extension the plugin names where TriAttention is on (``parallel_config.worker_extension_cls``).

vLLM imports this module in each worker process before it builds the model; importing it makes vLLM's ``CPU_ATTN``
backend :class:`~triattn_compile.vllm.attention.TriAttentionCPUBackend` in that process (the compaction in front of
attention). ``llm.collective_rpc("triattn_report")`` returns what a worker found and did: the discovered layout, per
layer the paged KV tensor vLLM allocated for it (the part of the layout the graph cannot show), and the compactions.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

from triattn_compile.calibration.stats import TENSOR_NAMES
from triattn_compile.vllm.backend import calibrating_online, discovered

register_backend(AttentionBackendEnum.CPU_ATTN, "triattn_compile.vllm.attention.TriAttentionCPUBackend")


def kv_tensor(attention: object) -> torch.Tensor | None:
    kv = getattr(attention, "kv_cache", None)
    if isinstance(kv, (list, tuple)):  # one per virtual engine in some versions
        kv = kv[0] if kv else None
    return kv if isinstance(kv, torch.Tensor) else None


def report(worker: object) -> dict:
    """JSON-able: ``{"compaction": [PagedCompressor.report()], "layout": VllmLayout.as_dict() | None,
    "stats_tokens": int | None, "online": bool, "online_stats": {name: nested list} | None, "paged": {...}}``.

    ``online_stats``: the running sums of online calibration (``calibration.stats.TENSOR_NAMES``), when on.

    ``paged`` has, per discovered layer name, the attention implementation's class and its KV tensor's shape and
    dtype, and the engine's block size (:class:`TriAttentionWorkerExtension` serves it to ``collective_rpc``).
    """
    found, stats = discovered()
    config = getattr(worker, "vllm_config", None)
    context = config.compilation_config.static_forward_context if config is not None else {}
    paged = {}
    for name in found.layer_names if found is not None else ():
        attention = context.get(name)
        kv = kv_tensor(attention)
        paged[name] = {
            "impl": type(getattr(attention, "impl", None)).__name__,
            "kv_shape": list(kv.shape) if kv is not None else None,
            "kv_dtype": str(kv.dtype) if kv is not None else None,
        }
    from triattn_compile.vllm.attention import compressors

    return {
        "compaction": [c.report() for c in compressors()],
        "layout": found.as_dict() if found is not None else None,
        "stats_tokens": stats.tokens() if stats is not None else None,
        "online": calibrating_online(),
        "online_stats": ({name: t.tolist() for name, t in zip(TENSOR_NAMES, stats.tensors())}
                         if calibrating_online() and stats is not None else None),
        "block_size": config.cache_config.block_size if config is not None else None,
        "paged": paged,
    }


class TriAttentionWorkerExtension:
    """Mixed into vLLM's worker class by the plugin (``parallel_config.worker_extension_cls``) where TriAttention is
    on: ``llm.collective_rpc("triattn_report")`` returns :func:`report` from every worker."""

    def triattn_report(self) -> dict:
        return report(self)
