"""What a vLLM worker found, for ``llm.collective_rpc("triattn_report")``: the discovered layout and, per layer, the
paged KV tensor vLLM allocated for it (the part of the layout the graph cannot show)."""

from __future__ import annotations

import torch

from triattn_compile.vllm.backend import discovered


def _kv_tensor(attention: object) -> torch.Tensor | None:
    kv = getattr(attention, "kv_cache", None)
    if isinstance(kv, (list, tuple)):  # one per virtual engine in some versions
        kv = kv[0] if kv else None
    return kv if isinstance(kv, torch.Tensor) else None


def report(worker: object) -> dict:
    """JSON-able: ``{"layout": VllmLayout.as_dict() | None, "stats_tokens": int | None, "paged": {...}}``.

    ``paged`` has, per discovered layer name, the attention implementation's class and its KV tensor's shape and
    dtype, and the engine's block size (:class:`TriAttentionWorkerExtension` serves it to ``collective_rpc``).
    """
    found, stats = discovered()
    config = getattr(worker, "vllm_config", None)
    context = config.compilation_config.static_forward_context if config is not None else {}
    paged = {}
    for name in found.layer_names if found is not None else ():
        attention = context.get(name)
        kv = _kv_tensor(attention)
        paged[name] = {
            "impl": type(getattr(attention, "impl", None)).__name__,
            "kv_shape": list(kv.shape) if kv is not None else None,
            "kv_dtype": str(kv.dtype) if kv is not None else None,
        }
    return {
        "layout": found.as_dict() if found is not None else None,
        "stats_tokens": stats.tokens() if stats is not None else None,
        "block_size": config.cache_config.block_size if config is not None else None,
        "paged": paged,
    }


class TriAttentionWorkerExtension:
    """Mixed into vLLM's worker class by the plugin (``parallel_config.worker_extension_cls``) where TriAttention is
    on: ``llm.collective_rpc("triattn_report")`` returns :func:`report` from every worker."""

    def triattn_report(self) -> dict:
        return report(self)
