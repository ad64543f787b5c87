"""TriAttention in vLLM (issue 19): a ``vllm.general_plugins`` plugin, switched on by
``additional_config={"triattn": {...}}``, that finds the sites in the graph vLLM compiles and evicts in vLLM's paged
KV cache, giving the emptied blocks back to its pool.

Modules, in the order a step meets them: ``settings`` (the setting and its validation), ``plugin`` (the entry point:
the engine's config, the front end's prompt check), ``backend`` (the compile backend that runs discovery),
``discovery`` (sites, RoPE and layer names from vLLM's graph), ``statsfile`` (a ``triattn calibrate`` file checked
against that layout), ``paged`` (where a request's live tokens are, shared by scheduler and worker), ``scheduler``
(frees compacted blocks, caps admission), ``attention`` / ``compaction`` (the worker: score, keep, move, rewrite the
metadata), ``worker`` (the worker extension and its report), ``serve`` (``triattn serve``). See docs/vllm.md.
Importing this package does not import vLLM.
"""

from triattn_compile.vllm.plugin import register, switch_on, unregister
from triattn_compile.vllm.settings import SETTINGS_KEY, SettingsError, VllmSettings, parse_settings

__all__ = ["SETTINGS_KEY", "SettingsError", "VllmSettings", "parse_settings", "register", "switch_on", "unregister"]
