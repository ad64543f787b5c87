"""TriAttention in vLLM (issue 19, in progress): a ``vllm.general_plugins`` plugin that is switched on by
``additional_config={"triattn": {...}}`` and runs the project's discovery on the graph vLLM compiles.

Modules: ``settings`` (the setting and its validation), ``plugin`` (the entry point), ``backend`` (the compile
backend that runs discovery), ``discovery`` (sites, RoPE and layer names from vLLM's graph), ``statsfile``
(a ``triattn calibrate`` file checked against that layout), ``worker`` (what a worker found, for
``LLM.collective_rpc``). See docs/vllm.md. Importing this package does not import vLLM.
"""

from triattn_compile.vllm.plugin import register, switch_on, unregister
from triattn_compile.vllm.settings import SETTINGS_KEY, SettingsError, VllmSettings, parse_settings

__all__ = ["SETTINGS_KEY", "SettingsError", "VllmSettings", "parse_settings", "register", "switch_on", "unregister"]
