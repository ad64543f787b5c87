"""The ``vllm.general_plugins`` entry point: :func:`register` (``triattn = "triattn_compile.vllm:register"``).

vLLM calls it in every process it starts (main, EngineCore, workers). It wraps ``EngineArgs.create_engine_config``
so that, where the engine's ``additional_config`` has a ``triattn`` key (:mod:`~triattn_compile.vllm.settings`),
the settings are validated in the main process (one-line :class:`SettingsError`) and the compile backend becomes
:mod:`~triattn_compile.vllm.backend` (discovery, then vLLM's own backend), with vLLM's compile cache off
(``VLLM_DISABLE_COMPILE_CACHE=1`` unless set: a cached artifact would skip discovery). Without the key the config
is returned untouched. :func:`unregister` removes the wrapper.
"""

from __future__ import annotations

import functools
import os

from triattn_compile.vllm.settings import SETTINGS_KEY, SettingsError, parse_settings

_WRAPPED = "_triattn_wrapped"


def switch_on(vllm_config) -> None:
    """Validate ``vllm_config.additional_config["triattn"]`` and route compilation through the discovery backend;
    a config without the key is left as it is."""
    from vllm.config import CompilationMode

    from triattn_compile.vllm.backend import BACKENDS

    if parse_settings(vllm_config.additional_config) is None:
        return
    compilation = vllm_config.compilation_config
    where = f"additional_config[{SETTINGS_KEY!r}]"
    if compilation.mode == CompilationMode.NONE:
        raise SettingsError(f"{where}: TriAttention finds its sites in the graph vLLM compiles, and compilation is off "
                            "(enforce_eager, -O0 or a LoRA config); drop that setting")
    if compilation.mode != CompilationMode.DYNAMO_TRACE_ONCE or compilation.backend not in BACKENDS:
        raise SettingsError(f"{where}: only vLLM's CPU compilation (mode DYNAMO_TRACE_ONCE, backend inductor or "
                            f"eager) is supported so far; this engine uses mode {compilation.mode.name}, backend "
                            f"{compilation.backend!r}")
    compilation.backend = BACKENDS[compilation.backend]
    if not vllm_config.parallel_config.worker_extension_cls:  # llm.collective_rpc("triattn_report")
        vllm_config.parallel_config.worker_extension_cls = "triattn_compile.vllm.worker.TriAttentionWorkerExtension"
    # a compiled artifact loaded from vLLM's compile cache would skip the backend, and with it discovery; the
    # EngineCore and worker processes are started after this and inherit the setting
    os.environ.setdefault("VLLM_DISABLE_COMPILE_CACHE", "1")


def register() -> None:
    """Install the wrapper (idempotent: vLLM may load plugins more than once per process)."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, _WRAPPED, False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        config = original(self, *args, **kwargs)
        switch_on(config)
        return config

    setattr(create_engine_config, _WRAPPED, True)
    EngineArgs.create_engine_config = create_engine_config


def unregister() -> None:
    """Remove the wrapper :func:`register` installed."""
    from vllm.engine.arg_utils import EngineArgs

    current = EngineArgs.create_engine_config
    if getattr(current, _WRAPPED, False):
        EngineArgs.create_engine_config = current.__wrapped__


__all__ = ["SettingsError", "register", "switch_on", "unregister"]
